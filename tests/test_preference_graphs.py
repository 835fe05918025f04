"""A preference method's micro-batch as a CUDA graph holds it (train/graphs.py with a preference
body): the batch staged on the host (rows padded, label positions in slots padded to a fixed
count, sequence slots, token counts; KTO's examples and KL sequences as two sets of rows, its
labels in a slot), then the body the capture records, called directly on the CPU. It must give
batch_loss's loss, metric sums and adapter gradients on the unstaged batch; the GPU comparison of
a real replay is benchmarks/gpu_check.py's check_preference_graphed."""

from __future__ import annotations

import pytest
import torch

from qlora.data.preference import half, pair_batch, unpaired_batch
from qlora.methods import PREFERENCE_METHODS
from qlora.data.preference import label_layout
from qlora.methods.preference import (PreferenceOptions, batch_loss, label_slots, metric_means,
                                      sequence_logps)
from qlora.models.decoder import IGNORE_INDEX
from qlora.train.graphs import GraphedSteps, _Graph, stage_preference
from test_preference import _lora_model  # the tiny fp32 llama with randomised LoRA

PAD_TO = 16  # small, so that the rows and the label slots both get padding


def _examples(reference: bool) -> list[dict]:
    """Pairs of different lengths (padded rows pad; 33 label tokens fill no multiple of 16)."""
    g = torch.Generator().manual_seed(11)

    def ids(n):
        return torch.randint(3, 90, (n,), generator=g).tolist()

    examples = [{"prompt": ids(p), "chosen": ids(c), "rejected": ids(r)}
                for p, c, r in ((3, 4, 6), (5, 2, 3), (2, 7, 1), (4, 3, 7))]
    if reference:  # precomputed reference log-probs (any numbers: the loss only reads them)
        for k, e in enumerate(examples):
            e["ref_chosen"], e["ref_rejected"] = -20.0 - k, -25.0 + 2 * k
    return examples


def _unpaired(labels: tuple[bool, ...] = (True, False, False, True)) -> list[dict]:
    """KTO examples of different lengths, desirable or not by `labels`."""
    g = torch.Generator().manual_seed(12)

    def ids(n):
        return torch.randint(3, 90, (n,), generator=g).tolist()

    return [{"prompt": ids(p), "completion": ids(c), "label": good}
            for (p, c), good in zip(((3, 4), (5, 2), (2, 7), (4, 9)), labels)]


def _batch(name: str, packed: bool, reference: bool = False,
           labels: tuple[bool, ...] = (True, False, False, True)) -> dict:
    if name == "kto":
        return unpaired_batch(_unpaired(labels), 0, packed=packed)
    return pair_batch(_examples(reference), 0, packed=packed)


def _model(llama_dir, speed: bool = False):
    """_lora_model with the adapters' initial draw from a fixed global seed (their random
    offsets are _lora_model's own): KTO's KL estimate z is clamped at 0, and with these adapters
    it is not (0.14), so the KL rows' log-probs reach the loss."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return _lora_model(llama_dir, speed=speed)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _graph_body(model, method, opts, batch: dict, pad_to: int = PAD_TO):
    """(loss sum, metric sums, gradients) of the graph's body on the CPU: the staged batch copied
    into a _Graph's buffers, then GraphedSteps._body, which the capture records."""
    steps = GraphedSteps.__new__(GraphedSteps)  # no CUDA pool on a CPU
    steps.model, steps.preference, steps.pad_to = model, (method, opts), pad_to
    staged = stage_preference(batch, pad_to, pinned=False,
                              router=getattr(model, "adds_router_loss", False))
    g = _Graph(staged, torch.device("cpu"))
    steps._fill(g, staged, 1.0)
    model.zero_grad()
    loss = steps._body(g)
    return staged, loss, g.metrics, _grads(model)


@pytest.mark.parametrize("name,packed,reference,speed", [
    ("dpo", True, False, False), ("dpo", False, False, True), ("dpo", True, True, True),
    ("dpo", False, True, False), ("orpo", True, False, True), ("orpo", False, False, False),
    ("simpo", True, False, False), ("simpo", False, False, True), ("kto", True, False, True),
    ("kto", False, False, False)])
def test_graph_body_equals_batch_loss(llama_dir, name, packed, reference, speed):
    """The graph's body from the staged batch = batch_loss on the batch: loss, every metric sum,
    every adapter gradient. fp32, rel 1e-5 of each quantity's scale: the same tokens and GEMMs,
    over rows longer by a padding document, and per-sequence sums that also add the padding
    slots' zeros, so the sums run in other orders (~1e-6 relative in fp32)."""
    method = PREFERENCE_METHODS[name]
    model = _model(llama_dir, speed=speed)
    batch = _batch(name, packed, reference)
    opts = PreferenceOptions(beta=0.3, desirable_weight=1.3, undesirable_weight=0.7)
    model.zero_grad()
    want_loss, want_metrics = batch_loss(method, model, batch, opts)
    want_loss.backward()
    want_grads = _grads(model)
    staged, loss, metrics, grads = _graph_body(model, method, opts, batch)
    # the staging padded both: a padding document after the rows, and label slots that add 0
    rows = half(batch, second=False) if name == "kto" else batch
    assert staged.input_ids.shape[1] > rows["input_ids"].shape[1]
    labelled = int((batch["labels"] != IGNORE_INDEX).sum())
    if name == "kto":  # two sets of rows: the examples' (with the labels' slot), the KL ones'
        assert staged.kl is not None and "kl" in staged.key
        assert float(want_metrics["kl"][0]) > 0  # z unclamped: the KL rows count
        assert torch.equal(staged.slots["label"], batch["label"])
        assert staged.slots["positions"].numel() + staged.kl.slots["positions"].numel() \
            > labelled
    else:
        assert staged.kl is None and staged.slots["positions"].numel() > labelled
    assert ("ref_logps", 8) in staged.key if reference else "ref_logps" not in staged.slots
    want_loss = float(want_loss.detach())
    assert abs(float(loss) - want_loss) <= 1e-5 * abs(want_loss)
    assert metrics.keys() == want_metrics.keys()
    # the metrics are log-probs and differences of them: their rounding scales with the log-probs
    scale = max(float(want_metrics[k][0].abs()) for k in ("logps/chosen", "logps/rejected"))
    for k, v in want_metrics.items():
        assert float(metrics[k][1]) == float(v[1]), k  # the counts exactly
        assert abs(float(metrics[k][0]) - float(v[0])) <= 1e-5 * scale, (k, metrics[k], v)
    assert grads.keys() == want_grads.keys() and len(grads) == 2 * 7 * 2  # A, B; 7 linears, 2 layers
    for k, want in want_grads.items():
        top = float(want.abs().max())
        assert top > 0, k
        assert float((grads[k] - want).abs().max()) <= 1e-5 * top, k


def test_kto_graph_body_of_desirable_examples_only(llama_dir):
    """A KTO micro-batch without an undesirable example: the masked metric sums count 0 for the
    rejected metrics, as the eager ones do, and their means are left out; loss and z as eagerly
    (fp32, rel 1e-5: as test_graph_body_equals_batch_loss)."""
    method = PREFERENCE_METHODS["kto"]
    model = _model(llama_dir)
    batch = _batch("kto", packed=False, labels=(True, True, True, True))
    opts = PreferenceOptions(beta=0.3)
    want_loss, want_metrics = batch_loss(method, model, batch, opts)
    want_loss = float(want_loss.detach())
    _, loss, metrics, _ = _graph_body(model, method, opts, batch)
    assert abs(float(loss) - want_loss) <= 1e-5 * abs(want_loss)
    for k in ("rewards/rejected", "logps/rejected"):
        assert metrics[k].tolist() == want_metrics[k].tolist() == [0.0, 0.0], k
    means = metric_means(metrics)
    assert "rewards/rejected" not in means and "rewards/chosen" in means
    assert means["kl"] > 0
    assert means["kl"] == pytest.approx(metric_means(want_metrics)["kl"], rel=1e-5)


@pytest.mark.parametrize("packed,share_prompt", [(True, True), (True, False), (False, True)])
def test_label_slots_hold_what_the_eager_path_reads(packed, share_prompt):
    """label_slots puts in what label_layout / sequence_logps / the model's label selection
    give the eager path: each label's sequence and target at the position that predicts it (in
    the padded rows), the tokens per sequence; padding slots predict IGNORE_INDEX into slot S.
    Where labels say it by position (no shared prompt), each target is the label after the
    predicting position, of that label's sequence."""
    batch = pair_batch(_examples(reference=False), 0, packed=packed, share_prompt=share_prompt)
    rows, T = batch["input_ids"].shape
    length = T + 5
    slots = label_slots(batch, length, PAD_TO)
    label_rows, ts, targets, sequences = label_layout(batch)
    n, count, S = sequences.numel(), sequences.numel(), batch["n_sequences"]
    assert slots["positions"].numel() % PAD_TO == 0 and slots["positions"].numel() > count
    assert torch.equal(slots["sequences"][:n], sequences)
    assert torch.equal(slots["targets"][:n], targets)
    want_tokens = sequence_logps(torch.zeros(n), sequences, S).tokens
    assert torch.equal(slots["tokens"], want_tokens)
    # the position before each label, in the rows padded to `length`
    r, t = slots["positions"][:n] // length, slots["positions"][:n] % length
    assert torch.equal(r, label_rows) and torch.equal(t, ts)
    if not (packed and share_prompt):
        assert torch.equal(targets, batch["labels"][r, t + 1])
        assert torch.equal(batch["sequence_ids"][r, t + 1], sequences)
    assert (slots["targets"][n:] == IGNORE_INDEX).all() and (slots["sequences"][n:] == S).all()
    assert "ref_logps" not in slots


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_the_loop_through_the_graph_body_trains_as_the_eager_loop(tmp_path, monkeypatch, method):
    """`qlora train --method dpo|kto` with the CUDA-graph glue of the loop on the CPU: each
    micro-batch staged with its label slots a step ahead (Stepper.prepare), run at the window's
    scale, its metric sums taken from the runner; the 'capture' stands in by running the body it
    would record at each replay. Step losses, logged metrics and adapters equal the eager run's:
    rel 1e-5 of the loss (fp32, sums in other orders), 1e-4 for the adapters after 3 Adam steps."""
    import json

    from safetensors.torch import load_file

    from qlora.config import load_config
    from qlora.tiny import build_tiny_model
    from qlora.train import fast_paths, loop

    model = build_tiny_model(tmp_path / "model", "llama")
    words = "cat dog sunshine moon tree fishing bird raincoat snow windmill".split()
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"{w} = ", "chosen": w.upper(), "rejected": w[::-1] * 2} for w in words]
    if method == "kto":  # unpaired: each word's upper case desirable, its reverse not
        rows = [{"prompt": r["prompt"], "completion": r["chosen" if k % 3 else "rejected"],
                 "label": bool(k % 3)} for k, r in enumerate(rows)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def run(out):
        cfg = load_config(None, dict(
            model=str(model), data=str(data), output_dir=str(out), method=method, max_steps=3,
            micro_batch_size=2, gradient_accumulation_steps=2, lora_dropout=0.0,
            learning_rate=5e-3, warmup_steps=0, logging_steps=1, eval_steps=0, save_steps=0,
            device="cpu", val_set_size=0, quant="none", max_seq_length=32))
        return loop.train(cfg, progress=False)

    eager = run(tmp_path / "eager")
    bodies = []

    def stand_in(model, optimizer, plan, env, sharded, device, scaler, log, max_len,
                 preference=None):
        steps = GraphedSteps.__new__(GraphedSteps)  # no CUDA pool on a CPU
        # rows padded to a multiple of 4 tokens: the micro-batches take several shapes
        steps.model, steps.device, steps.pad_to, steps.log = model, device, 4, log
        steps.preference, steps.failed, steps.graphs, steps.metrics = preference, None, {}, {}
        return steps

    def capture(self, g):  # a "replay" runs the body the capture would have recorded
        def replay():
            bodies.append(g)
            g.loss_sum = self._body(g)
        g.graph = type("Replayed", (), {"replay": staticmethod(replay)})()

    monkeypatch.setattr(fast_paths, "graphed_steps", stand_in)
    monkeypatch.setattr(GraphedSteps, "_capture", capture)
    graphed = run(tmp_path / "graphed")
    # every micro-batch through a body: 10 pairs, 2 a micro-batch, steps of 2, 2 and the epoch's
    # last 1; in graphs of more than one shape
    assert len(bodies) == 5 and len({id(g) for g in bodies}) > 1
    for step, loss in eager.step_losses.items():
        assert graphed.step_losses[step] == pytest.approx(loss, rel=1e-5), step

    def records(out):
        return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                if r["split"] == "train"]

    for a, b in zip(records(tmp_path / "eager"), records(tmp_path / "graphed"), strict=True):
        assert {k for k in a if "/" in k} == {k for k in b if "/" in k}  # rewards/*, logps/*
        for k in a:
            if "/" in k or k in ("loss", "grad_norm", "kl"):  # log-probs of ~-30: 1e-5 rel of those
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-4), k
    want = load_file(str(tmp_path / "eager" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "graphed" / "adapter_model.safetensors"))
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6)


def test_kto_saves_the_activations_of_its_examples_only(llama_dir):
    """What the planner counts for KTO (memory.settings.step_tokens: one sequence with grad per
    example): the tensors autograd saves over a whole KTO batch_loss (examples with grad, their KL
    sequences and both references under no_grad) are exactly those of the examples' forward
    alone, to the byte, and fewer than if the KL sequences ran with grad."""
    from qlora.data.preference import half
    from qlora.methods.preference import row_logps

    model = _model(llama_dir)
    batch = _batch("kto", packed=True)

    def saved_bytes(run) -> int:
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
        return sum(storages.values())

    whole = saved_bytes(lambda: batch_loss(PREFERENCE_METHODS["kto"], model, batch, PreferenceOptions()))
    examples = saved_bytes(lambda: row_logps(model, half(batch, second=False)))
    both = saved_bytes(lambda: (row_logps(model, half(batch, second=False)),
                                row_logps(model, half(batch, second=True))))
    # the loss's own few scalars-per-example (log-ratios, z) are saved on top: a few hundred bytes
    assert examples <= whole < examples + 1024 < both


def test_a_shared_prompt_batch_stages_its_gathered_keys_at_a_fixed_length():
    """The graph's key index: the batch's own gathered keys, then filler and the padding tokens
    (the padding document's keys end with its own queries, so each padding query sees at least
    itself); its length the padded row's plus the prompts' keys rounded up to a power of two of
    at least PAD_TO; the offsets of queries and keys rounded up to a power of two of documents,
    the unused ones empty."""
    from qlora.train.graphs import stage_gathered_keys

    batch = pair_batch(_examples(reference=False), 0, packed=True)
    plan, T = batch["attention"], batch["input_ids"].shape[1]
    staged = stage_gathered_keys(batch["input_ids"], batch["position_ids"], batch["labels"],
                                 plan, PAD_TO, pinned=False)
    length, prompts = staged.input_ids.shape[1], sum(len(e["prompt"]) for e in _examples(False))
    assert T % PAD_TO and length == -(-T // PAD_TO) * PAD_TO
    assert plan.keys.index.numel() == T + prompts
    key_length = length + max(PAD_TO, 1 << (prompts - 1).bit_length())
    assert staged.key == (1, length, 16, "keys", key_length)  # 8 documents and the padding: 16
    index, cu_keys = staged.gathered_keys["key_index"], staged.gathered_keys["cu_keys"]
    assert index.numel() == key_length
    assert torch.equal(index[:T + prompts], plan.keys.index)
    assert torch.equal(index[-(length - T):], torch.arange(T, length))
    assert (index[T + prompts:key_length - (length - T)] == T).all()
    assert staged.cu_seqlens.tolist() == plan.cu_seqlens.tolist() + [length] * 8
    assert cu_keys.tolist() == plan.keys.cu_seqlens.tolist() + [key_length] * 8


def test_a_shared_prompt_row_of_whole_pad_to_multiples_gets_a_few_padding_tokens(llama_dir):
    """Two pairs of 32 tokens each (prompt once): a 64-token row staged at pad_to 64 gets
    ALIGNED_PADDING tokens of padding document (80 tokens), not a whole pad_to more (128), and
    the graph's body over it still equals batch_loss: loss and every adapter gradient (fp32, rel
    1e-5 as test_graph_body_equals_batch_loss)."""
    from qlora.train.graphs import ALIGNED_PADDING

    g = torch.Generator().manual_seed(13)

    def ids(n):
        return torch.randint(3, 90, (n,), generator=g).tolist()

    pairs = [{"prompt": ids(p), "chosen": ids(c), "rejected": ids(r)}
             for p, c, r in ((10, 12, 10), (8, 12, 12))]
    batch = pair_batch(pairs, 0, packed=True)
    assert batch["input_ids"].shape[1] == 64 and batch["attention"].keys is not None
    method, opts = PREFERENCE_METHODS["dpo"], PreferenceOptions(beta=0.3)
    model = _model(llama_dir)
    model.zero_grad()
    want_loss, _ = batch_loss(method, model, batch, opts)
    want_loss.backward()
    want_grads = _grads(model)
    staged, loss, _, grads = _graph_body(model, method, opts, batch, pad_to=64)
    assert staged.input_ids.shape[1] == 64 + ALIGNED_PADDING < 128
    want_loss = float(want_loss.detach())
    assert abs(float(loss) - want_loss) <= 1e-5 * abs(want_loss)
    for k, want in want_grads.items():
        assert float((grads[k] - want).abs().max()) <= 1e-5 * float(want.abs().max()), k
