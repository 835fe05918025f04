"""Preference training (qlora.methods): the losses and metrics against TRL's trainers, the log-probs
against transformers + peft, the reference against the base model, a demo run through the CLI,
and the errors of bad preference data.

TRL is compared in fp32 with rel <= 1e-5: both sides compute the same closed-form expressions
(log-sigmoid, sigmoid, squares, log1mexp) from the same fp32 log-probs, so they differ by a few
roundings at most (different but equivalent orders of operations), far below 1e-5. TRL's losses are
called as TRL defines them: DPOTrainer._compute_loss and KTOTrainer._compute_loss (TRL 1.x has no
static dpo_loss / kto_loss) with a stand-in `self` and a stand-in model that returns the given
per-token log-probs; ORPOTrainer.odds_ratio_loss and CPOTrainer.cpo_loss with a stand-in `self`.
Whole steps, our packed micro-batch through the model against TRL's trainer on transformers + peft
with the same adapter (loss, metrics, gradients; rel 1e-4): DPOTrainer, KTOTrainer, CPOTrainer
(SimPO), ORPOTrainer (but for its NLL over the prompt too).
"""

from __future__ import annotations

import json
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from qlora.data.preference import load_preference, pair_batch, unpaired_batch
from qlora.errors import QloraError
from qlora.methods import dpo, kto, orpo, simpo
from qlora.methods.preference import (PairLogps, PreferenceOptions, RowLogps, UnpairedLogps,
                                      metric_means, metric_sums, row_logps, sequence_logps)

trl = pytest.importorskip("trl")
FP32 = torch.float32
REL = 1e-5


def close(ours, theirs, rel=REL):
    ours, theirs = torch.as_tensor(ours, dtype=torch.float64), torch.as_tensor(theirs,
                                                                                 dtype=torch.float64)
    assert torch.allclose(ours, theirs, rtol=rel, atol=1e-7), (ours, theirs)


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather(t):
        return t

    gather_for_metrics = gather


def _token_logps(rows: int, width: int, seed: int):
    """Per-token log-probs [rows, width] and the completion mask [rows, width + 1] of random
    completions of different lengths (positions 0.. are the prompt)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(rows, width + 1, dtype=torch.long)
    for r in range(rows):
        start = int(torch.randint(1, 4, (1,), generator=g))
        end = int(torch.randint(start + 2, width + 1, (1,), generator=g))
        mask[r, start:end] = 1
    logps = -torch.rand(rows, width, generator=g, dtype=FP32) * 3 * mask[:, 1:]
    return logps, mask


def _fake_outputs(per_token):
    zeros = torch.zeros_like(per_token)
    return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros,
                           is_top1=zeros.bool())


def _pairs(per_token, mask) -> PairLogps:
    shifted = mask[:, 1:]
    return PairLogps(RowLogps(per_token.sum(-1), shifted.sum(-1)))


# --- DPO -------------------------------------------------------------------------------------------
def _trl_dpo(per_token, ref_per_token, mask, beta, loss_type):
    from trl import DPOTrainer

    stub = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_Accelerator(), aux_loss_enabled=False,
        ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0,
        use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1)
    ref = ref_per_token.sum(-1)
    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask),
              "completion_mask": mask, "ref_chosen_logps": ref.chunk(2)[0],
              "ref_rejected_logps": ref.chunk(2)[1]}
    loss = DPOTrainer._compute_loss(stub, lambda **kw: _fake_outputs(per_token), inputs, False)
    return loss, {k: v[-1] for k, v in stub._metrics["train"].items()}


@pytest.mark.parametrize("loss_type", dpo.LOSS_TYPES)
def test_dpo_losses_and_metrics_equal_trl(loss_type):
    B, beta = 4, 0.3
    per_token, mask = _token_logps(2 * B, 12, seed=1)
    ref_per_token = per_token * 0.9 - 0.05 * mask[:, 1:]
    opts = PreferenceOptions(beta=beta, loss_type=loss_type)
    losses, metrics = dpo.losses(_pairs(per_token, mask), _pairs(ref_per_token, mask), opts)
    for i in range(B):  # per example: TRL on a batch of that one pair
        rows = [i, B + i]
        theirs, _ = _trl_dpo(per_token[rows], ref_per_token[rows], mask[rows], beta, loss_type)
        close(losses[i], theirs)
    theirs, their_metrics = _trl_dpo(per_token, ref_per_token, mask, beta, loss_type)
    close(losses.mean(), theirs)
    ours = metric_means(metric_sums(metrics))
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                 "logps/chosen", "logps/rejected"):
        close(ours[name], their_metrics[name])


def test_dpo_label_smoothing_is_conservative_dpo():
    """TRL 1.x's DPO sigmoid has no label smoothing; its CPO sigmoid loss is the conservative
    (label-smoothed) sigmoid of a difference, which with the log-ratios as that difference is
    cDPO, the sigmoid loss of older TRL DPOTrainers."""
    from trl.experimental.cpo import CPOTrainer

    per_token, mask = _token_logps(6, 10, seed=2)
    ref_per_token = per_token * 1.1
    policy, reference = _pairs(per_token, mask), _pairs(ref_per_token, mask)
    opts = PreferenceOptions(beta=0.2, label_smoothing=0.15)
    losses, _ = dpo.losses(policy, reference, opts)
    stub = SimpleNamespace(alpha=0.0, loss_type="sigmoid", beta=0.2, label_smoothing=0.15,
                           accelerator=_Accelerator())
    theirs, _, _ = CPOTrainer.cpo_loss(stub, policy.chosen - reference.chosen,
                                       policy.rejected - reference.rejected)
    close(losses, theirs)


# --- ORPO and SimPO --------------------------------------------------------------------------------
def test_orpo_loss_and_metrics_equal_trl():
    from trl.experimental.orpo import ORPOTrainer

    per_token, mask = _token_logps(8, 12, seed=3)
    per_token = per_token * 0.3  # averages near 0 too: both branches of log1mexp
    policy = _pairs(per_token, mask)
    opts = PreferenceOptions(beta=0.25)
    losses, metrics = orpo.losses(policy, None, opts)
    stub = SimpleNamespace(beta=0.25, accelerator=_Accelerator())
    ratio, chosen_rewards, rejected_rewards, mean_ratio, mean_log_odds = \
        ORPOTrainer.odds_ratio_loss(stub, policy.chosen_mean, policy.rejected_mean)
    # our NLL: cross-entropy over the chosen completion tokens of the batch (TRL's also covers
    # the prompt: tests/test_benchmark_train_step.py's ORPO test measures that part)
    chosen_mask = mask.chunk(2)[0][:, 1:].bool()
    nll = -per_token.chunk(2)[0][chosen_mask].mean()
    close(losses.mean(), nll - ratio.mean())
    ours = metric_means(metric_sums(metrics))
    close(ours["rewards/chosen"], chosen_rewards.mean())
    close(ours["rewards/rejected"], rejected_rewards.mean())
    close(ours["rewards/accuracies"], (chosen_rewards > rejected_rewards).float().mean())
    close(ours["rewards/margins"], (chosen_rewards - rejected_rewards).mean())
    close(ours["log_odds_ratio"], mean_ratio)
    close(ours["log_odds_chosen"], mean_log_odds)
    close(ours["nll_loss"], nll)


@pytest.mark.parametrize("label_smoothing,cpo_alpha", [(0.0, 0.0), (0.1, 1.0)])
def test_simpo_loss_equals_trl_cpo(label_smoothing, cpo_alpha):
    from trl.experimental.cpo import CPOTrainer

    per_token, mask = _token_logps(8, 12, seed=4)
    policy = _pairs(per_token, mask)
    opts = PreferenceOptions(beta=2.0, simpo_gamma=0.7, label_smoothing=label_smoothing,
                             cpo_alpha=cpo_alpha)
    losses, metrics = simpo.losses(policy, None, opts)
    stub = SimpleNamespace(alpha=0.0, loss_type="simpo", beta=2.0, simpo_gamma=0.7,
                           label_smoothing=label_smoothing, accelerator=_Accelerator())
    theirs, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(stub, policy.chosen_mean,
                                                                   policy.rejected_mean)
    nll = -per_token.chunk(2)[0][mask.chunk(2)[0][:, 1:].bool()].mean()
    if cpo_alpha == 0:
        close(losses, theirs)
    close(losses.mean(), theirs.mean() + cpo_alpha * nll)  # CPOTrainer.get_batch_loss_metrics
    ours = metric_means(metric_sums(metrics))
    close(ours["rewards/chosen"], chosen_rewards.mean())
    close(ours["rewards/margins"], (chosen_rewards - rejected_rewards).mean())


# --- KTO -------------------------------------------------------------------------------------------
def test_kto_loss_and_metrics_equal_trl():
    from trl import KTOTrainer

    B = 6
    per_token, mask = _token_logps(2 * B, 12, seed=5)  # rows 0..B-1: examples; B..: KL rows
    ref_per_token = per_token * 0.8
    label = torch.tensor([True, False, True, True, False, False])
    opts = PreferenceOptions(beta=0.2, desirable_weight=1.3, undesirable_weight=0.7)
    sums, ref_sums = per_token.sum(-1), ref_per_token.sum(-1)
    tokens = mask[:, 1:].sum(-1)
    policy = UnpairedLogps(RowLogps(sums[:B], tokens[:B]), sums[B:], label)
    reference = UnpairedLogps(RowLogps(ref_sums[:B], tokens[:B]), ref_sums[B:], label)
    losses, metrics = kto.losses(policy, reference, opts)

    ids = torch.arange(B * 13).view(B, 13)
    kl_ids = ids + 1000
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_Accelerator(), calculate_KL=True,
        aux_loss_enabled=False, precompute_ref_logps=True, loss_type="kto", beta=0.2,
        desirable_weight=1.3, undesirable_weight=0.7,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    stub._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(stub, model, batch)

    def model(input_ids, **kw):
        return _fake_outputs(per_token[B:] if torch.equal(input_ids, kl_ids) else per_token[:B])

    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "completion_mask": mask[:B], "KL_input_ids": kl_ids,
              "KL_attention_mask": torch.ones_like(ids), "KL_completion_mask": mask[B:],
              "label": label, "ref_logps": ref_sums[:B], "ref_KL_logps": ref_sums[B:]}
    theirs = KTOTrainer._compute_loss(stub, model, inputs, False)
    close(losses.mean(), theirs)
    ours = metric_means(metric_sums(metrics))
    their_metrics = {k: v[-1] for k, v in stub._metrics["train"].items()}
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
                 "logps/rejected", "kl"):
        close(ours[name], their_metrics[name])


# --- log-probs, reference ---------------------------------------------------------------------------
def _pair_data(tmp_path, rows=None):
    rows = rows or [{"prompt": f"{w} = ", "chosen": w.upper(), "rejected": w[::-1]}
                    for w in ("cat", "moon", "tree", "snow")]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _randomize(model, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _four_sequences(seed: int, short_row: int, short_from: int):
    """(logits [4, 10, 32], labels, batch) of four padded sequences: random logits and labels,
    no label on the first 4 positions (a prompt) nor on `short_row` from `short_from` (padding)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 10, 32, generator=g)
    labels = torch.randint(0, 32, (4, 10), generator=g)
    labels[:, :4] = -100
    labels[short_row, short_from:] = -100
    return logits, labels, {"labels": labels,
                            "sequence_ids": torch.arange(4)[:, None].expand(4, 10)}


def test_sequence_logps_equal_trl_get_batch_logps():
    from trl.experimental.cpo import CPOTrainer

    from qlora.data.preference import label_layout
    from qlora.models.generic import token_losses

    logits, labels, batch = _four_sequences(seed=6, short_row=1, short_from=8)
    ours = sequence_logps(-token_losses(logits, labels), label_layout(batch)[3], 4)
    close(ours.logps, CPOTrainer.get_batch_logps(logits, labels.clone()))
    close(ours.logps / ours.tokens, CPOTrainer.get_batch_logps(logits, labels.clone(),
                                                               average_log_prob=True))


def test_generic_path_logps_at_label_positions_equal_trl_get_batch_logps():
    """row_logps hands every model its labels as LabelPositions (the positions predicting them
    and their targets): the generic path's per-token losses at those positions sum to TRL's
    log-probs, and a padding slot (target IGNORE_INDEX, as a CUDA graph's label slots pad) adds
    nothing."""
    from trl.experimental.cpo import CPOTrainer

    from qlora.data.preference import label_layout
    from qlora.models.decoder import IGNORE_INDEX, LabelPositions
    from qlora.models.generic import token_losses

    logits, labels, batch = _four_sequences(seed=7, short_row=2, short_from=7)
    rows, ts, targets, sequences = label_layout(batch)
    # one padding slot more, at position 0 (a graph pads its label slots so)
    positions = torch.cat([rows * labels.shape[1] + ts, torch.zeros(1, dtype=torch.long)])
    targets = torch.cat([targets, torch.full((1,), IGNORE_INDEX)])
    losses = token_losses(logits, LabelPositions(positions, targets))
    assert losses[-1] == 0
    # fp32 log-softmax and sums, TRL's in another order: rel 1e-5 (REL)
    close(sequence_logps(-losses[:-1], sequences, 4).logps,
          CPOTrainer.get_batch_logps(logits, labels.clone()))


@pytest.mark.parametrize("use_dora", [False, True])
def test_logps_equal_peft_and_reference_equals_base(llama_dir, tmp_path, use_dora):
    """The chosen/rejected log-probs of a batch through our model and adapter equal transformers
    + peft's on the same adapter (rel 1e-4: two implementations of the same fp32 model, whose
    sums run in different orders, as tests/test_adapters.py compares logits); the reference
    (adapters off) equals the base model without adapters, exactly: the same modules run."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from trl.experimental.cpo import CPOTrainer

    from qlora.adapters import AdapterConfig, adapters_disabled, attach_adapters, save_adapter
    from qlora.models import load_model, load_tokenizer
    from qlora.quant import QuantConfig

    tok = load_tokenizer(llama_dir)
    examples, _ = load_preference(str(_pair_data(tmp_path)), tok, layout="pairs", max_len=64)
    batch = pair_batch(examples, tok.pad_token_id)
    ours = load_model(llama_dir, QuantConfig(method="none", compute_dtype=FP32))
    attach_adapters(ours, AdapterConfig(r=4, alpha=8, dropout=0.0, use_dora=use_dora))
    _randomize(ours, 7)
    save_adapter(ours, tmp_path / "adapter", str(llama_dir))
    ours.eval()
    with torch.no_grad():
        policy = PairLogps(row_logps(ours, batch))
        with adapters_disabled(ours):
            reference = PairLogps(row_logps(ours, batch))
        base = PairLogps(row_logps(load_model(llama_dir, QuantConfig(method="none",
                                                                     compute_dtype=FP32)), batch))
        hf = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=FP32).eval()
        peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
        logits = peft_model(input_ids=batch["input_ids"]).logits
        theirs = PairLogps(RowLogps(CPOTrainer.get_batch_logps(logits, batch["labels"].clone()),
                                    torch.zeros(2 * len(examples))))
    close(policy.chosen, theirs.chosen, rel=1e-4)
    close(policy.rejected, theirs.rejected, rel=1e-4)
    assert torch.equal(reference.chosen, base.chosen)
    assert torch.equal(reference.rejected, base.rejected)
    assert not torch.allclose(policy.chosen, reference.chosen)  # the adapter does change them
    # the batch: chosen rows first, loss only on the completions
    n_completion = sum(len(e["chosen"]) + len(e["rejected"]) for e in examples)
    assert int((batch["labels"] != -100).sum()) == n_completion


# --- packed batches ---------------------------------------------------------------------------------
def _lora_model(model_dir, seed=7, speed=False, scale=0.05):
    """Our tiny fp32 model with randomised LoRA (dropout 0: the layouts draw no masks); `speed`:
    the speed layer's forks, whose per-token loss is kernels/cross_entropy.py's (its torch
    reference on the CPU), in chunks of 5 tokens so that several chunks run."""
    from qlora.adapters import AdapterConfig, attach_adapters
    from qlora.models import load_model
    from qlora.quant import QuantConfig

    model = load_model(model_dir, QuantConfig(method="none", compute_dtype=FP32))
    attach_adapters(model, AdapterConfig(r=4, alpha=8, dropout=0.0))
    _randomize(model, seed, scale)
    if speed:
        from qlora.speed import SpeedPlan, apply_speed

        apply_speed(model, SpeedPlan())
    model.loss_chunk_tokens = 5
    return model.train()


def _varied_examples(layout: str) -> list[dict]:
    """Prompts and completions of different lengths (so padded rows do pad)."""
    g = torch.Generator().manual_seed(11)

    def ids(n):
        return torch.randint(3, 90, (n,), generator=g).tolist()

    if layout == "pairs":
        return [{"prompt": ids(p), "chosen": ids(c), "rejected": ids(r)}
                for p, c, r in ((3, 4, 6), (5, 2, 3), (2, 7, 1), (4, 3, 5))]
    return [{"prompt": ids(p), "completion": ids(c), "label": lab}
            for p, c, lab in ((3, 4, True), (5, 2, False), (2, 7, True), (4, 3, False))]


def _loss_metrics_grads(method, model, batch, opts):
    from qlora.methods.preference import batch_loss

    model.zero_grad()
    loss, metrics = batch_loss(method, model, batch, opts)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), metric_means(metrics), grads


# every method through the reference model; the fast path's per-token loss for a method of each
# layout (pairs, and KTO's halves)
@pytest.mark.parametrize("name,speed,share_prompt,model_name", [
    ("dpo", False, True, "llama"), ("orpo", False, True, "llama"), ("simpo", False, True, "llama"),
    ("kto", False, True, "llama"), ("dpo", True, True, "llama"), ("kto", True, True, "llama"),
    ("dpo", False, False, "llama"), ("orpo", True, False, "llama"),
    ("dpo", False, True, "mistral-window"), ("orpo", True, True, "qwen2-window")])
def test_packed_batch_gives_the_losses_and_gradients_of_padded_rows(tiny_models, name, speed,
                                                                    share_prompt, model_name):
    """A micro-batch packed into one row (no padding; sequences kept apart by their position ids
    and, each pair's prompt packed once, by the attention plan that gives the rejected completion
    its prompt's keys) gives the padded batch's loss, metrics and adapter gradients: rel 1e-5 in
    fp32, the same tokens through attention and GEMMs of other shapes, whose sums run in other
    orders. The windowed families (a window of 16 tokens; the pairs made longer than it) check
    that a rejected completion's window reaches back into its prompt as in its own sequence."""
    from qlora.data.preference import preference_batch
    from qlora.methods import PREFERENCE_METHODS

    method = PREFERENCE_METHODS[name]
    model = _lora_model(tiny_models[model_name], speed=speed)
    examples = _varied_examples(method.LAYOUT)
    if model_name != "llama":  # past the window: each prompt + completion 17 to 26 tokens
        examples = [{k: v * 3 if isinstance(v, list) else v for k, v in e.items()}
                    for e in examples]
    padded, packed = (preference_batch(examples, 0, packed=p, share_prompt=share_prompt)
                      for p in (False, True))
    assert padded["input_ids"].shape[0] == 2 * len(examples) and packed["input_ids"].shape[0] == 1
    # every token once (each prompt once where shared), no padding; padded rows pad to the longest
    assert packed["input_ids"].numel() == packed["n_tokens"] < padded["input_ids"].numel()
    # both sequences of every example (KTO's KL sequences borrow completions within the batch:
    # the same total), less each prompt's second copy where the prompt is shared
    both = sum(2 * len(e["prompt"]) + len(e.get("chosen", e.get("completion")))
               + len(e.get("rejected", e.get("completion"))) for e in examples)
    prompts = sum(len(e["prompt"]) for e in examples)
    shared = method.LAYOUT == "pairs" and share_prompt
    assert packed["n_tokens"] == (both - prompts if shared else both)
    opts = PreferenceOptions(beta=0.3)
    loss_a, metrics_a, grads_a = _loss_metrics_grads(method, model, padded, opts)
    loss_b, metrics_b, grads_b = _loss_metrics_grads(method, model, packed, opts)
    close(loss_b, loss_a)
    assert metrics_a.keys() == metrics_b.keys()
    # the metrics are log-probs and differences of them (rewards, KTO's kl): their rounding
    # scales with the log-probs (rel 1e-5 of those), not with a small difference itself
    logp_scale = max(abs(metrics_a["logps/chosen"]), abs(metrics_a["logps/rejected"]))
    for k in metrics_a:
        assert abs(metrics_b[k] - metrics_a[k]) <= 1e-5 * logp_scale, (k, metrics_a[k],
                                                                          metrics_b[k])
    assert len(grads_a) == len(grads_b) == 2 * 7 * 2  # lora_A and lora_B of 7 linears, 2 layers
    for k in grads_a:
        scale = float(grads_a[k].abs().max())
        assert scale > 0, k
        # relative to the largest entry: a near-zero entry's own digits are the sums' rounding
        assert float((grads_b[k] - grads_a[k]).abs().max()) <= 1e-5 * scale, k


@pytest.mark.parametrize("model_name", ["mistral-window", "qwen2-window"])
def test_a_shared_prompt_past_the_window_without_a_windowed_varlen_gives_the_padded_logps(
        tiny_models, monkeypatch, model_name):
    """Where torch's varlen attention takes no window (before 2.11: the GPU packs pairs there all
    the same, its full layers' plan being varlen), a windowed layer of a shared prompt's batch
    gets a dense mask of the gathered keys, as packed rows get attention_mask's: the padded rows'
    log-probs (fp32, rel 1e-5: the same tokens through attention of other shapes), the pairs
    longer than the window of 16 tokens so that it hides some of each rejected prompt."""
    from qlora.models import attention

    monkeypatch.setattr(attention, "varlen_takes_window", lambda: False)
    model = _lora_model(tiny_models[model_name])
    examples = [{k: v * 3 for k, v in e.items()} for e in _varied_examples("pairs")]
    with torch.no_grad():
        padded = row_logps(model, pair_batch(examples, 0, packed=False))
        shared = row_logps(model, pair_batch(examples, 0, packed=True))
    assert torch.equal(shared.tokens, padded.tokens)
    close(shared.logps, padded.logps)


@pytest.mark.parametrize("lengths", [((0, 3, 4), (2, 1, 1)), ((5, 1, 2),),
                                     ((3, 0, 2), (4, 2, 0), (0, 0, 3))])
def test_a_shared_prompt_batch_of_edge_pairs_gives_the_padded_logps(llama_dir, lengths):
    """An empty prompt (no label on either completion's first token, as in its own sequence),
    completions of one token, empty completions (no label: a log-prob of 0), a micro-batch of
    one pair: the padded rows' log-probs and label counts (fp32, rel 1e-5: the same tokens
    through attention of other shapes)."""
    g = torch.Generator().manual_seed(4)
    examples = [{name: torch.randint(3, 90, (n,), generator=g).tolist()
                 for name, n in zip(("prompt", "chosen", "rejected"), pair)} for pair in lengths]
    model = _lora_model(llama_dir)
    with torch.no_grad():
        padded = row_logps(model, pair_batch(examples, 0, packed=False))
        shared = row_logps(model, pair_batch(examples, 0, packed=True))
    assert torch.equal(shared.tokens, padded.tokens)
    close(shared.logps, padded.logps)


def test_shared_prompt_batch_lays_out_each_pair_as_its_prompt_then_both_completions():
    """Two pairs, prompts of 2 and 1 tokens: each pair's tokens once, positions continuing from
    the prompt in both completions, the documents (queries: prompt + chosen, then rejected; keys:
    the same, then prompt + rejected), and each label predicted from the token before it in its
    own sequence (a rejected completion's first from its prompt's last)."""
    from qlora.data.preference import label_layout, shared_prompt_batch

    batch = shared_prompt_batch([{"prompt": [1, 2], "chosen": [3, 4], "rejected": [5]},
                                 {"prompt": [6], "chosen": [7], "rejected": [8, 9]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2, 0, 1, 1, 2]]
    assert batch["sequence_ids"].tolist() == [[0, 0, 0, 0, 2, 1, 1, 3, 3]]
    plan = batch["attention"]
    assert plan.cu_seqlens.tolist() == [0, 4, 5, 7, 9] and plan.max_len == 4
    assert plan.keys.index.tolist() == [0, 1, 2, 3, 0, 1, 4, 5, 6, 5, 7, 8]
    assert plan.keys.cu_seqlens.tolist() == [0, 4, 7, 9, 12] and plan.keys.max_len == 4
    rows, ts, targets, sequences = label_layout(batch)
    assert rows.tolist() == [0] * 6
    assert ts.tolist() == [1, 2, 1, 5, 5, 7]  # 5 follows the prompt's 2 (index 1), 8 the 6
    assert targets.tolist() == [3, 4, 5, 7, 8, 9]
    assert sequences.tolist() == [0, 0, 2, 1, 3, 3]
    assert batch["n_sequences"] == 4 and batch["n_tokens"] == 9


@pytest.mark.parametrize("packed,speed", [(False, False), (True, False), (True, True)])
def test_kto_takes_what_runs_without_grad_in_one_forward_of_the_whole_batch(llama_dir, packed,
                                                                            speed):
    """Eager KTO under no_grad (an evaluation): the policy's log-probs of the examples and of
    their KL sequences come from one forward of the whole batch, and so do the reference's (2
    forwards, where TRL's KTOTrainer runs 4; a training micro-batch runs 4, one a half). The
    loss, metrics and adapter gradients are those of a forward per half (unpaired_logps without
    `both`, as the CUDA graph's rows run): the same rows through GEMMs and attention of another
    shape, whose sums may run in other orders (fp32 roundings, ~1e-7 relative), so rel 1e-5 of
    each quantity's scale, as test_packed_batch_gives_the_losses_and_gradients_of_padded_rows."""
    from qlora.data.preference import half, preference_batch
    from qlora.methods.preference import batch_loss, summed_losses, unpaired_logps

    torch.manual_seed(0)  # the adapters' init; with LoRA seed 10, z is above its clamp at 0
    model = _lora_model(llama_dir, seed=10, speed=speed)
    batch = preference_batch(_varied_examples("unpaired"), 0, packed=packed)
    examples, kl, opts = half(batch, second=False), half(batch, second=True), PreferenceOptions()
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))

    def per_half():
        return summed_losses(kto, *unpaired_logps(model, lambda **_: row_logps(model, examples),
                                                  lambda **_: row_logps(model, kl), batch["label"]),
                             opts)

    def loss_metrics_grads(run):
        model.zero_grad()
        loss, metrics = run()
        if loss.requires_grad:
            loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return float(loss.detach()), metric_means(metrics), grads

    for grad, n_forwards in ((True, 4), (False, 2)):  # a training micro-batch, an evaluation's
        with torch.set_grad_enabled(grad):
            forwards.clear()
            loss, metrics, grads = loss_metrics_grads(lambda: batch_loss(kto, model, batch, opts))
            assert len(forwards) == n_forwards
            want_loss, want_metrics, want_grads = loss_metrics_grads(per_half)
        assert abs(loss - want_loss) <= 1e-5 * abs(want_loss)
        assert metrics.keys() == want_metrics.keys() and want_metrics["kl"] > 0.05
        logp_scale = max(abs(want_metrics["logps/chosen"]), abs(want_metrics["logps/rejected"]))
        for k in metrics:  # log-probs and differences of them: rel 1e-5 of the log-probs
            assert abs(metrics[k] - want_metrics[k]) <= 1e-5 * logp_scale, k
        assert len(grads) == len(want_grads) == (2 * 7 * 2 if grad else 0)
        for k in grads:
            top = float(want_grads[k].abs().max())
            assert float((grads[k] - want_grads[k]).abs().max()) <= 1e-5 * top, k


@pytest.mark.parametrize("name", ["dpo", "kto"])
def test_an_evaluation_shard_without_a_batch_still_has_every_metric(llama_dir, name):
    """Under torchrun the evaluation's metric sums are stacked by name into one all-reduce
    (train/distributed.metric_sums_on_host): every rank must bring the same names, or the ranks'
    collectives differ (one rank skips it, the others wait on it). A rank with no batch of its
    own (fewer eval batches than ranks) runs the first batch at weight 0, as a training step's
    short rank does (distributed.micro_batches): every metric, all zero, and no examples. And
    every rank runs as many forwards (3 batches over 2 ranks: 2 each), as a sharded model's
    collectives need."""
    from qlora.methods import PREFERENCE_METHODS
    from qlora.methods.preference import evaluate

    method = PREFERENCE_METHODS[name]
    model = _lora_model(llama_dir)
    examples = _varied_examples(method.LAYOUT)  # one batch of 4: rank 1 of 2 has none
    opts = PreferenceOptions(beta=0.3)
    _, count, sums = evaluate(method, model, examples, opts, 4, 0, shard=(0, 2))
    short_total, short_count, short_sums = evaluate(method, model, examples, opts, 4, 0,
                                                    shard=(1, 2))
    assert count == 4 and sums.keys() == short_sums.keys()
    assert short_total == 0 and short_count == 0
    assert all(not v.any() for v in short_sums.values())
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    counts = []
    for rank in (0, 1):
        forwards.clear()
        counts.append(evaluate(method, model, examples[:3], opts, 1, 0, shard=(rank, 2))[1])
        counts.append(len(forwards))
    assert counts == [2, 4, 1, 4]  # examples, forwards (the policy's and the reference's)


def test_an_evaluation_reads_its_loss_to_the_host_once(llama_dir, monkeypatch):
    """The evaluation's loss is summed on the device over its batches and read to the host once
    at the end (not once a batch, each a wait for the GPU), as the metric sums stay there; the
    sum is the host's float sum of the batches' losses, to the bit."""
    from qlora.methods import preference

    examples = _varied_examples("pairs")
    model, opts = _lora_model(llama_dir), PreferenceOptions(beta=0.3)
    losses, batch_loss = [], preference.batch_loss

    def on_device(*args):
        loss, metrics = batch_loss(*args)
        losses.append(float(loss))
        return loss.as_subclass(_OnDevice), metrics

    monkeypatch.setattr(preference, "batch_loss", on_device)
    _OnDevice.reads = 0
    total, count, _ = preference.evaluate(dpo, model, examples, opts, 1, 0)
    assert len(losses) == count == len(examples) > 1
    assert _OnDevice.reads == 1
    want = 0.0
    for loss in losses:
        want += loss
    assert total == want


def _trl_args(config_class, out_dir, batch: int, **options):
    """A TRL trainer's config for one CPU step over our whole batch of examples, in fp32."""
    return config_class(output_dir=str(out_dir), per_device_train_batch_size=batch, report_to=[],
                        use_cpu=True, bf16=False, max_length=None, **options)


def _trl_pair_inputs(examples: list[dict]) -> dict:
    """TRL's DPO collator's padded batch of our token-id pairs."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    return DataCollatorForPreference(pad_token_id=0)(
        [{"prompt_ids": e["prompt"], "chosen_ids": e["chosen"], "rejected_ids": e["rejected"]}
         for e in examples])


def _trl_unpaired_inputs(examples: list[dict]) -> dict:
    """TRL's KTO collator's padded batch of our examples, each KL completion the one before's
    (the last's for the first), as unpaired_batch mismatches them."""
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    completions = [e["completion"] for e in examples]
    return DataCollatorForUnpairedPreference(pad_token_id=0)(
        [{"prompt_ids": e["prompt"], "completion_ids": e["completion"], "KL_completion_ids": kl,
          "label": e["label"]} for e, kl in zip(examples, completions[-1:] + completions[:-1])])


def _trl_peft_model(trainer_class, args, llama_dir, adapter_dir, targets="all-linear"):
    """TRL's `trainer_class` over transformers + peft on the tiny model, its fresh adapter (on
    `targets`) given ours (adapter_dir: save_adapter's); the trainer and its peft model."""
    from datasets import Dataset
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from qlora.models import load_tokenizer

    hf = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=FP32)
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}]  # the trainer wants a dataset
    trainer = trainer_class(model=hf, args=args, train_dataset=Dataset.from_list(rows),
                            processing_class=load_tokenizer(llama_dir),
                            peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                   target_modules=targets))
    loaded = set_peft_model_state_dict(
        trainer.model, load_file(str(adapter_dir / "adapter_model.safetensors")))
    assert not loaded.unexpected_keys
    return trainer, trainer.model.train()


def _padded_pairs(examples) -> dict:
    """The batch CPOTrainer and ORPOTrainer read: prompt + completion rows of each side, padded,
    the prompt's labels masked."""
    batch = {}
    for name in ("chosen", "rejected"):
        rows = [e["prompt"] + e[name] for e in examples]
        labels = [[-100] * len(e["prompt"]) + e[name] for e in examples]
        pad = [max(map(len, rows)) - len(r) for r in rows]
        batch[f"{name}_input_ids"] = torch.tensor([r + [0] * p for r, p in zip(rows, pad)])
        batch[f"{name}_attention_mask"] = torch.tensor([[1] * len(r) + [0] * p
                                                        for r, p in zip(rows, pad)])
        batch[f"{name}_labels"] = torch.tensor([lab + [-100] * p for lab, p in zip(labels, pad)])
    return batch


def _adapter_grads_agree(ours, peft_model, count=28):
    our_grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    their_grads = {n.replace("base_model.model.", "", 1).replace(".default", ""): p.grad
                   for n, p in peft_model.named_parameters() if p.grad is not None}
    assert our_grads.keys() == their_grads.keys() and len(our_grads) == count
    for name, g in our_grads.items():
        scale = float(their_grads[name].abs().max())
        assert scale > 0 and float((g - their_grads[name]).abs().max()) <= 1e-4 * scale, name


def _router_step_agrees_with_trl(ours, loss_sum, sums, n, trainer, peft_model, inputs):
    """A step with a mixture of experts' router loss against TRL's trainer on the same batch
    (`inputs`, its collator's) and adapter: TRL's loss, then its logged aux_loss, and our summed
    loss over `n` examples, our metric sums and every adapter gradient (2 layers x 4 attention
    projections x A, B) agree to rel 1e-4, as the steps without experts. Returns TRL's aux."""
    assert trainer.aux_loss_enabled
    theirs = trainer.compute_loss(peft_model, inputs)
    theirs.backward()
    their_aux = trainer._metrics["train"]["aux_loss"][-1]
    ours_loss, their_loss = float((loss_sum / n).detach()), float(theirs.detach())
    assert abs(ours_loss - their_loss) <= 1e-4 * abs(their_loss)
    assert abs(metric_means(sums)["aux_loss"] - their_aux) <= 1e-4 * their_aux
    _adapter_grads_agree(ours, peft_model, count=16)
    return their_aux


def test_packed_dpo_step_equals_trl_dpo_trainer(llama_dir, tmp_path):
    """One DPO micro-batch, packed into one row, through our model and the speed layer's per-token
    loss, against TRL's DPOTrainer (its collator's padded batch; TRL 1.16 has switched its
    padding_free off) on transformers + peft with the same adapter, the reference being the
    adapter switched off on both sides: the loss, TRL's logged metrics and every adapter gradient
    agree to rel 1e-4 (two implementations of the same fp32 model, whose sums run in different
    orders, as test_logps_equal_peft_and_reference_equals_base compares them)."""
    from trl import DPOConfig, DPOTrainer

    from qlora.adapters import save_adapter
    from qlora.methods.preference import batch_loss

    beta = 0.3
    # adapters far enough from 0 that every pair's reward margin is well away from 0, where the
    # two implementations' roundings could flip an accuracy
    ours = _lora_model(llama_dir, speed=True, scale=0.3)
    save_adapter(ours, tmp_path / "adapter", str(llama_dir))
    examples = _varied_examples("pairs")
    B = len(examples)
    ours.zero_grad()
    loss_sum, sums = batch_loss(dpo, ours, pair_batch(examples, 0, packed=True),
                                PreferenceOptions(beta=beta))
    (loss_sum / B).backward()  # TRL's loss is the batch mean

    # a fresh adapter made by the trainer (its reference is then the adapter switched off; one
    # handed over already wrapped gets a frozen copy as its reference), then given our weights
    args = _trl_args(DPOConfig, tmp_path / "trl", B, beta=beta)
    trainer, peft_model = _trl_peft_model(DPOTrainer, args, llama_dir, tmp_path / "adapter")
    inputs = _trl_pair_inputs(examples)
    theirs = trainer.compute_loss(peft_model, inputs)
    theirs.backward()
    their_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    close(loss_sum / B, theirs, rel=1e-4)
    ours_metrics = metric_means(sums)
    close(ours_metrics["logps/chosen"], their_metrics["logps/chosen"], rel=1e-4)
    close(ours_metrics["logps/rejected"], their_metrics["logps/rejected"], rel=1e-4)
    # the rewards are beta x differences of log-probs: their rounding scales with the log-probs
    scale = beta * max(abs(their_metrics["logps/chosen"]), abs(their_metrics["logps/rejected"]))
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert abs(ours_metrics[name] - their_metrics[name]) <= 1e-4 * scale, (
            name, ours_metrics[name], their_metrics[name])
    _adapter_grads_agree(ours, peft_model)


@pytest.mark.parametrize("packed", [False, True])
def test_kto_step_equals_trl_kto_trainer(llama_dir, tmp_path, packed):
    """One KTO micro-batch (its examples, then each prompt with the previous example's
    completion, as TRL pairs them for the KL estimate; padded, or packed into one row) through
    our model and the speed layer's per-token loss, against TRL's KTOTrainer on transformers +
    peft with the same adapter, the reference the adapter switched off on both sides: the loss,
    TRL's logged metrics and every adapter gradient agree to rel 1e-4, as the DPO step's."""
    from trl import KTOConfig, KTOTrainer

    from qlora.adapters import save_adapter
    from qlora.methods.preference import batch_loss

    ours = _lora_model(llama_dir, speed=True, scale=0.3)
    save_adapter(ours, tmp_path / "adapter", str(llama_dir))
    examples = _varied_examples("unpaired")
    B = len(examples)
    opts = PreferenceOptions(beta=0.2, desirable_weight=1.3, undesirable_weight=0.7)
    ours.zero_grad()
    loss_sum, sums = batch_loss(kto, ours, unpaired_batch(examples, 0, packed=packed), opts)
    (loss_sum / B).backward()

    args = _trl_args(KTOConfig, tmp_path / "trl", B, beta=0.2, desirable_weight=1.3,
                     undesirable_weight=0.7)
    trainer, peft_model = _trl_peft_model(KTOTrainer, args, llama_dir, tmp_path / "adapter")
    inputs = _trl_unpaired_inputs(examples)
    theirs = trainer.compute_loss(peft_model, inputs)
    theirs.backward()
    their_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    close(loss_sum / B, theirs, rel=1e-4)
    ours_metrics = metric_means(sums)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
                 "logps/rejected", "kl"):
        close(ours_metrics[name], their_metrics[name], rel=1e-4)
    _adapter_grads_agree(ours, peft_model)


@pytest.mark.parametrize("cpo_alpha", [0.0, 0.5])
def test_packed_simpo_step_equals_trl_cpo_trainer(llama_dir, tmp_path, cpo_alpha):
    """One SimPO micro-batch, packed into one row (each prompt once), through our model and the
    speed layer's per-token loss, against TRL's CPOTrainer (loss_type simpo) on transformers +
    peft with the same adapter and its padded concatenated batch: the loss, the logged metrics
    and every adapter gradient agree to rel 1e-4, as the DPO step's (the same fp32 model in two
    implementations, sums in other orders); with cpo_alpha, TRL's NLL over the chosen
    completions is ours (its labels mask the prompt too)."""
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    from qlora.adapters import save_adapter
    from qlora.methods.preference import batch_loss

    beta, gamma = 2.0, 0.5
    ours = _lora_model(llama_dir, speed=True, scale=0.3)
    save_adapter(ours, tmp_path / "adapter", str(llama_dir))
    examples = _varied_examples("pairs")
    B = len(examples)
    ours.zero_grad()
    opts = PreferenceOptions(beta=beta, simpo_gamma=gamma, cpo_alpha=cpo_alpha)
    loss_sum, sums = batch_loss(simpo, ours, pair_batch(examples, 0, packed=True), opts)
    (loss_sum / B).backward()

    args = CPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=B, beta=beta,
                     loss_type="simpo", simpo_gamma=gamma, cpo_alpha=cpo_alpha, report_to=[],
                     use_cpu=True, bf16=False)
    trainer, peft_model = _trl_peft_model(CPOTrainer, args, llama_dir, tmp_path / "adapter")
    theirs, their_metrics = trainer.get_batch_loss_metrics(peft_model, _padded_pairs(examples))
    theirs.backward()

    close(loss_sum / B, theirs, rel=1e-4)
    ours_metrics = metric_means(sums)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                 "logps/chosen", "logps/rejected") + (("nll_loss",) if cpo_alpha else ()):
        close(ours_metrics[name], their_metrics[name], rel=1e-4)
    _adapter_grads_agree(ours, peft_model)


def test_packed_orpo_step_equals_trl_orpo_trainer_but_for_the_prompt_nll(llama_dir, tmp_path):
    """One ORPO micro-batch, packed, against TRL's ORPOTrainer on the same model and adapter:
    the odds-ratio term and every metric of it agree to rel 1e-4 (as the DPO step's). The NLL
    terms differ by design: ours is over the chosen completion (the authors'
    --disable_prompt_loss), TRL's over prompt and completion, so the losses are compared less
    each side's logged nll_loss, and the gradients not at all."""
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from qlora.adapters import save_adapter
    from qlora.methods.preference import batch_loss

    beta = 0.25
    ours = _lora_model(llama_dir, speed=True, scale=0.3)
    save_adapter(ours, tmp_path / "adapter", str(llama_dir))
    examples = _varied_examples("pairs")
    B = len(examples)
    with torch.no_grad():
        loss_sum, sums = batch_loss(orpo, ours, pair_batch(examples, 0, packed=True),
                                    PreferenceOptions(beta=beta))
    args = ORPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=B,
                      beta=beta, report_to=[], use_cpu=True, bf16=False)
    trainer, peft_model = _trl_peft_model(ORPOTrainer, args, llama_dir, tmp_path / "adapter")
    with torch.no_grad():
        theirs, their_metrics = trainer.get_batch_loss_metrics(peft_model,
                                                               _padded_pairs(examples))
    ours_metrics = metric_means(sums)
    close(loss_sum / B - ours_metrics["nll_loss"], theirs - their_metrics["nll_loss"], rel=1e-4)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                 "logps/chosen", "logps/rejected", "log_odds_ratio", "log_odds_chosen"):
        close(ours_metrics[name], their_metrics[name], rel=1e-4)
    assert abs(float(ours_metrics["nll_loss"]) - float(their_metrics["nll_loss"])) > 1e-3


# --- data ------------------------------------------------------------------------------------------
def test_messages_rendered_with_the_chat_template(llama_dir, tmp_path):
    from qlora.models import load_tokenizer

    tok = load_tokenizer(llama_dir)
    rows = [{"prompt": [{"role": "user", "content": "cat"}],
             "chosen": [{"role": "assistant", "content": "CAT"}],
             "rejected": [{"role": "assistant", "content": "tac"}]}]
    examples, _ = load_preference(str(_pair_data(tmp_path, rows)), tok, layout="pairs",
                                  max_len=64)
    e = examples[0]
    assert tok.decode(e["prompt"]) == "<|im_start|>user\ncat<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(e["chosen"]) == "CAT<|im_end|>"
    assert tok.decode(e["rejected"]) == "tac<|im_end|>"


def _msgs(*turns):
    return [{"role": role, "content": text} for role, text in zip(("user", "assistant") * 4, turns)]


def _read_beside_explicit(tmp_path, tok, rows, explicit):
    """load_preference of `rows` (its report too) and of the same pairs with the prompt given."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    got, report = load_preference(str(_pair_data(tmp_path / "a", rows)), tok, layout="pairs",
                                  max_len=256)
    want, _ = load_preference(str(_pair_data(tmp_path / "b", explicit)), tok, layout="pairs",
                              max_len=256)
    return got, report, want


# pairs as whole conversations: (chosen, rejected, a prompt column or None)
WHOLE_CONVERSATIONS = [
    (_msgs("cat", "CAT"), _msgs("cat", "tac"), None),  # TRL's implicit prompt
    (_msgs("hi", "hello", "cat", "CAT"), _msgs("hi", "hello", "cat", "tac"), None),  # history
    (_msgs("cat", "CAT"), _msgs("cat", "tac"), "cat"),  # UltraFeedback binarized: text prompt too
    (_msgs("cat", "CAT", "more", "TAC"), _msgs("cat", "CAT"), None),  # one the other's start
]


def test_whole_conversations_read_their_shared_history_as_the_prompt(llama_dir, tmp_path):
    """Pairs given as two whole conversations (no prompt column, or a text one beside them): the
    prompt is the messages they share from the start, as TRL's maybe_extract_prompt splits them
    (its DPOTrainer's reading); each encodes as the same pair with that prompt given apart."""
    from trl.data_utils import maybe_extract_prompt

    from qlora.data.preference import shared_start
    from qlora.models import load_tokenizer

    tok = load_tokenizer(llama_dir)
    rows, explicit = [], []
    for chosen, rejected, prompt in WHOLE_CONVERSATIONS:
        row = {"chosen": chosen, "rejected": rejected}
        if prompt is not None:
            row["prompt"] = prompt
        theirs = maybe_extract_prompt(dict(row))
        ours = shared_start(chosen, rejected)
        assert ours == (theirs["prompt"], theirs["chosen"], theirs["rejected"])
        rows.append(row)
        explicit.append(dict(zip(("prompt", "chosen", "rejected"), ours)))
    got, report, want = _read_beside_explicit(tmp_path, tok, rows, explicit)
    assert got == want and len(got) == len(rows) and report.chat
    assert tok.decode(got[1]["prompt"]).endswith("cat<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(got[1]["chosen"]) == "CAT<|im_end|>"


HH_TEXTS = [  # (chosen, rejected) as hh-rlhf writes them, and the edge cases of the split
    ("\n\nHuman: hi?\n\nAssistant: I like it", "\n\nHuman: hi?\n\nAssistant: I hate it"),
    ("\n\nHuman: hi?\n\nAssistant: Sure", "\n\nHuman: hi?\n\nAssistant: Sorry"),  # mid-word
    ("Human: a Assistant: b", "Human: a Assistant: b and more"),  # one the other's start
]


def test_whole_texts_read_their_shared_start_as_the_prompt(llama_dir, tmp_path):
    """Pairs given as two whole texts with no prompt column (hh-rlhf's): the prompt is the text
    they share from the start, split where TRL's extract_prompt splits it (a shared space before
    they differ goes with the completions); each encodes as the same pair with that prompt."""
    from trl.data_utils import extract_prompt

    from qlora.data.preference import shared_start
    from qlora.models import load_tokenizer

    tok = load_tokenizer(llama_dir)
    rows, explicit = [], []
    for chosen, rejected in HH_TEXTS:
        theirs = extract_prompt({"chosen": chosen, "rejected": rejected})
        ours = shared_start(chosen, rejected)
        assert ours == (theirs["prompt"], theirs["chosen"], theirs["rejected"])
        rows.append({"chosen": chosen, "rejected": rejected})
        explicit.append(dict(zip(("prompt", "chosen", "rejected"), ours)))
    assert explicit[0]["chosen"] == " like it" and explicit[1]["chosen"] == "ure"
    got, report, want = _read_beside_explicit(tmp_path, tok, rows, explicit)
    assert got == want and len(got) == len(rows) and not report.chat


def test_pairs_without_a_prompt_must_be_conversations_sharing_one(llama_dir, tmp_path):
    from qlora.models import load_tokenizer

    tok = load_tokenizer(llama_dir)
    path = tmp_path / "pairs.jsonl"
    system = [{"role": "system", "content": "be brief"}]
    path.write_text(json.dumps({"chosen": _msgs("cat", "CAT"), "rejected": _msgs("cat", "tac")})
                    + "\n" + json.dumps({"chosen": "CAT", "rejected": "tac"}) + "\n"
                    + json.dumps({"chosen": _msgs("cat", "CAT"), "rejected": _msgs("dog", "god")})
                    + "\n" + json.dumps({"chosen": _msgs("hi", "hello", "cat", "CAT"),
                                         "rejected": _msgs("hi", "hello", "dog", "GOD")})
                    + "\n" + json.dumps({"chosen": system + _msgs("cat", "CAT"),
                                         "rejected": system + _msgs("dog", "GOD")}) + "\n")
    examples, report = load_preference(str(path), tok, layout="pairs", max_len=64)
    assert len(examples) == 1
    text = "\n".join(report.lines())
    # line 2: text without a prompt; line 3: conversations that share no first message
    assert "missing 'prompt' (without one, chosen and rejected must be whole texts or " \
           "conversations that begin alike" in text
    assert "(lines 2, 3)" in text
    # a shared history that ends before a user message is no prompt (TRL would train the user's
    # next turn as the completion, or refuse)
    assert f"{path} line 4: 'chosen' and 'rejected' first differ after message 2 (assistant)" \
        in text
    assert f"{path} line 5: 'chosen' and 'rejected' first differ after message 1 (system)" in text
    path.write_text(json.dumps({"chosen": "CAT"}) + "\n")
    with pytest.raises(QloraError, match=r"missing 'rejected'"):
        load_preference(str(path), tok, layout="pairs", max_len=64)


def test_truncated_examples_fit_every_limit(llama_dir, tmp_path):
    """An overlong example is cut to max_len tokens: the prompt from its start to
    keep = max(max_len - longest completion, max_len // 2) tokens (whole where it is no longer),
    then the completions at their end. Down to max_len 1, where keep is 0 (`prompt[-0:]`, all of
    it, once kept the whole prompt and cut the completions by a negative length); and a short
    prompt beside a long completion stays whole."""
    from qlora.models import load_tokenizer

    tok = load_tokenizer(llama_dir)
    rows = [{"prompt": "the quick brown fox = ", "chosen": "JUMPS OVER",
             "rejected": "sleeps under the dog"},
            {"prompt": "a = ", "chosen": "a long answer that runs on and on and on",
             "rejected": "no"}]
    path = _pair_data(tmp_path, rows)
    wholes, _ = load_preference(str(path), tok, layout="pairs", max_len=256)
    for max_len in (1, 2, 3, 5, 8, 13, 21):
        cut, _ = load_preference(str(path), tok, layout="pairs", max_len=max_len)
        for whole, e in zip(wholes, cut):
            names = ("chosen", "rejected")
            assert all(len(e["prompt"]) + len(e[n]) <= max_len for n in names)
            if all(len(whole["prompt"]) + len(whole[n]) <= max_len for n in names):
                assert e == whole
                continue
            keep = max(max_len - max(len(whole[n]) for n in names), max_len // 2)
            assert e["prompt"] == whole["prompt"][-keep:] if keep else e["prompt"] == []
            for n in names:
                assert len(e[n]) >= 1 and e[n] == whole[n][:len(e[n])]


def test_bad_preference_data_names_line_and_field(llama_dir, tmp_path):
    from qlora.models import load_tokenizer

    tok = load_tokenizer(llama_dir)
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "a", "chosen": "B", "rejected": "c"}) + "\n"
                    + json.dumps({"prompt": "a", "chosen": "B"}) + "\n"
                    + json.dumps({"prompt": "a", "chosen": "", "rejected": "c"}) + "\n")
    examples, report = load_preference(str(path), tok, layout="pairs", max_len=64)
    assert len(examples) == 1
    text = "\n".join(report.lines())
    assert f"{path} line 2: missing 'rejected'" in text
    assert f"{path} line 3: empty 'chosen'" in text

    path.write_text(json.dumps({"prompt": "a", "chosen": "B"}) + "\n")
    with pytest.raises(QloraError, match=r"missing 'rejected'"):
        load_preference(str(path), tok, layout="pairs", max_len=64)

    path.write_text(json.dumps({"prompt": "a", "completion": "B", "label": True}) + "\n")
    with pytest.raises(QloraError, match=r"missing 'chosen', 'rejected'.*--method kto"):
        load_preference(str(path), tok, layout="pairs", max_len=64)

    path.write_text(json.dumps({"prompt": "a", "completion": "B", "label": "maybe"}) + "\n"
                    + json.dumps({"prompt": "a", "completion": "B", "label": True}) + "\n")
    _, report = load_preference(str(path), tok, layout="unpaired", max_len=64)
    assert f"{path} line 1: 'label' is 'maybe', not a bool" in "\n".join(report.lines())


def test_kto_batch_pairs_each_prompt_with_the_previous_completion(llama_dir, tmp_path):
    from qlora.models import load_tokenizer

    tok = load_tokenizer(llama_dir)
    examples = [{"prompt": [1, 2], "completion": [10 + i], "label": i % 2 == 0}
                for i in range(3)]
    batch = unpaired_batch(examples, tok.pad_token_id)
    kl_completions = [int(batch["input_ids"][3 + i, 2]) for i in range(3)]
    assert kl_completions == [12, 10, 11]  # TRL: completions[-1:] + completions[:-1]
    assert batch["label"].tolist() == [True, False, True]


# --- a demo run through the CLI --------------------------------------------------------------------
WORDS = ("cat dog sun moon tree fish bird rain snow wind leaf rock sand star lake hill road ship "
         "king frog milk salt gold iron lamp door bell coat ring wolf bear lion hawk corn rice "
         "wine rose mint sage").split()


def test_dpo_demo_through_the_cli_raises_heldout_reward_accuracy(tmp_path, capsys):
    """`qlora train --method dpo` on uppercasing words (chosen: the word in capitals; rejected:
    the word reversed): the held-out reward accuracy climbs well above chance (0.5)."""
    from qlora.cli import main
    from qlora.tiny import build_tiny_model

    model = build_tiny_model(tmp_path / "model", "llama")
    rows = [{"prompt": f"{w} = ", "chosen": w.upper(), "rejected": w[::-1]} for w in WORDS]
    data = _pair_data(tmp_path, rows)
    out = tmp_path / "run"
    code = main(["train", "--method", "dpo", "--model", str(model), "--data", str(data),
                 "--output_dir", str(out), "--val_set_size", "12", "--max_steps", "24",
                 "--micro_batch_size", "4", "--gradient_accumulation_steps", "1",
                 "--learning_rate", "1e-2", "--beta", "0.5", "--lora_r", "8",
                 "--warmup_steps", "2", "--eval_steps", "12", "--logging_steps", "4",
                 "--save_steps", "12", "--device", "cpu", "--gradient_checkpointing", "false",
                 "--double_quant", "false", "--max_seq_length", "32"])
    assert code == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                 "logps/chosen", "logps/rejected", "loss"):
        assert name in train[-1] and name in evals[-1], name
    print("held-out reward accuracy by eval:", [r["rewards/accuracies"] for r in evals])
    assert evals[-1]["rewards/accuracies"] >= 0.9
    assert evals[-1]["rewards/margins"] > 0
    assert (out / "adapter_model.safetensors").is_file()
    assert (out / "loss.png").is_file()
    # string pairs are encoded as plain text: the run records it, so generate prompts alike
    assert json.loads((out / "prompt_format.json").read_text()) == {
        "data_format": "pairs", "chat_template": False, "chat_template_option": None}


def test_a_preference_file_of_messages_is_recorded_as_rendered_with_the_chat_template(
        llama_dir, tmp_path):
    """load_data's record of how the prompts were rendered: the layout, and the chat template
    where most examples came as messages (each such row went through Encoder._chat)."""
    from qlora.config import load_config
    from qlora.models import load_tokenizer
    from qlora.train.data import load_data

    tok = load_tokenizer(llama_dir)
    records = {}
    for kind, rows in (("text", [{"prompt": "a = ", "chosen": "A", "rejected": "b"}] * 3),
                       ("messages", [{"prompt": [{"role": "user", "content": "a"}],
                                      "chosen": [{"role": "assistant", "content": "A"}],
                                      "rejected": [{"role": "assistant", "content": "b"}]}] * 2
                        + [{"prompt": "a = ", "chosen": "A", "rejected": "b"}])):
        (tmp_path / kind).mkdir()
        data = _pair_data(tmp_path / kind, rows)
        cfg = load_config(None, dict(model=str(llama_dir), data=str(data), method="dpo",
                                     output_dir=str(tmp_path / "out"), chat_template="chatml"))
        records[kind] = load_data(cfg, tok, log=lambda _line: None)[2]
    assert records == {"text": ("pairs", False), "messages": ("pairs", True)}


def test_loss_plot_of_a_preference_run_has_its_reward_panel():
    import matplotlib

    matplotlib.use("Agg")
    from qlora.train.metrics import loss_figure

    records = [{"split": "train", "step": s, "loss": 0.7 - s / 100, "rewards/accuracies": s / 10,
                "rewards/margins": s / 5} for s in range(1, 5)]
    records.append({"split": "eval", "step": 4, "loss": 0.6, "rewards/accuracies": 0.75,
                    "rewards/margins": 0.5})
    fig = loss_figure(records)
    loss_ax, reward_ax, margin_ax = fig.axes
    assert [line.get_label() for line in loss_ax.get_lines()] == ["train loss", "eval loss"]
    assert [line.get_label() for line in reward_ax.get_lines()] == [
        "train reward accuracy", "eval reward accuracy"]
    assert [list(line.get_ydata()) for line in margin_ax.get_lines()] == [
        [0.2, 0.4, 0.6, 0.8], [0.5]]
    sft = loss_figure([{"split": "train", "step": 1, "loss": 2.0}])
    assert len(sft.axes) == 1  # SFT: the loss alone
    import matplotlib.pyplot as plt

    plt.close(fig)
    plt.close(sft)


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_a_preference_run_resumes_exactly(tmp_path, method):
    """Stop at step 3 (as Ctrl-C would), resume: every later step's loss, and the final adapter,
    equal the unbroken run's, with LoRA dropout on (its RNG state restored), accumulation 2 and
    the reference forwards (adapters off) in every step."""
    from safetensors.torch import load_file

    from qlora.config import load_config
    from qlora.tiny import build_tiny_model
    from qlora.train import loop

    model = build_tiny_model(tmp_path / "model", "llama")
    words = WORDS[:12]
    if method == "dpo":
        rows = [{"prompt": f"{w} = ", "chosen": w.upper(), "rejected": w[::-1]} for w in words]
    else:
        rows = [{"prompt": f"{w} = ", "completion": w.upper() if i % 2 else w[::-1],
                 "label": bool(i % 2)} for i, w in enumerate(words)]
    data = _pair_data(tmp_path, rows)

    def cfg(out, **extra):
        return load_config(None, dict(
            model=str(model), data=str(data), output_dir=str(out), method=method,
            max_steps=6, micro_batch_size=2, gradient_accumulation_steps=2, lora_dropout=0.1,
            learning_rate=5e-3, warmup_steps=1, logging_steps=1, eval_steps=0, save_steps=3,
            device="cpu", gradient_checkpointing=False, double_quant=False, max_seq_length=32,
            **extra))

    full = loop.train(cfg(tmp_path / "full"), progress=False)
    cut = loop.train(cfg(tmp_path / "cut"), progress=False, stop_after_steps=3)
    assert cut.stopped == "interrupted" and cut.global_step == 3
    resumed = loop.train(cfg(tmp_path / "cut", resume="latest"), progress=False)
    assert resumed.global_step == 6 and min(resumed.step_losses) == 4
    for step in range(4, 7):
        assert resumed.step_losses[step] == full.step_losses[step], step
    a = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- the step's metrics on the host ------------------------------------------------------------------
class _OnDevice(torch.Tensor):
    """A stand-in for a tensor on the GPU (the CPU has no device-to-host copy to count): counts
    what reads it to the host, each read a wait for the GPU; what a read returns is the host's."""
    reads = 0
    READS = {"__float__", "__int__", "__bool__", "__index__", "item", "tolist", "cpu", "numpy"}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) not in cls.READS:
            return super().__torch_function__(func, types, args, kwargs)
        _OnDevice.reads += 1
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        return out.as_subclass(torch.Tensor) if isinstance(out, torch.Tensor) else out


def test_a_preference_step_copies_its_metrics_to_the_host_once():
    """A step's metric sums (DPO's six, over two micro-batches) reach the progress bar and the
    train log's record in ONE copy from the device, not a read per number (a dozen waits for the
    GPU a step), and give them the means of the sums read one by one, to the bit."""
    from qlora.config import RunConfig
    from qlora.methods.preference import add_metrics, summed_losses
    from qlora.train.distributed import SINGLE
    from qlora.train.method import bar_metrics
    from qlora.train.metrics import TrainLog
    from qlora.train.step import Stepper

    g = torch.Generator().manual_seed(3)

    def pairs():
        return PairLogps(RowLogps(-30 * torch.rand(8, generator=g), torch.full((8,), 5)))

    opts, cpu = PreferenceOptions(), torch.device("cpu")
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)])
    stepper = Stepper(None, optimizer, None, None, None, RunConfig(), SINGLE, cpu, None, 0,
                      method=(dpo, opts))
    want = {}
    for _ in range(2):
        _, metrics = summed_losses(dpo, pairs(), pairs(), opts)
        add_metrics(want, metrics)
        stepper._add_metrics({k: v.as_subclass(_OnDevice) for k, v in metrics.items()}, 1.0)
    _OnDevice.reads = 0
    sums = stepper.read_metrics()
    shown = bar_metrics(sums)
    log = TrainLog()
    log.add(0.5, 100, sums)
    record = log.record(1, 0.5, 1e-3, torch.tensor(1.0), cpu)
    assert _OnDevice.reads == 1
    means = metric_means(want)
    assert len(means) == 6 and {k: record[k] for k in means} == means
    assert shown == {"acc": means["rewards/accuracies"], "margin": means["rewards/margins"]}


# --- precomputed reference log-probs -----------------------------------------------------------------
def test_precomputed_reference_run_equals_the_run_with_reference_forwards(tmp_path, monkeypatch):
    """precompute_ref_log_probs: one pass before training writes each pair's reference log-probs,
    no step runs the reference forward (the adapters are switched off once, for that pass), and
    every step's loss equals the run that takes the reference in each step (rel 1e-5 in fp32: the
    same base model over the same pairs, batched otherwise)."""
    from qlora.config import load_config
    from qlora.methods import preference
    from qlora.tiny import build_tiny_model
    from qlora.train import loop

    model = build_tiny_model(tmp_path / "model", "llama")
    rows = [{"prompt": f"{w} = ", "chosen": w.upper(), "rejected": w[::-1]} for w in WORDS[:10]]
    data = _pair_data(tmp_path, rows)
    switched_off = []
    real = preference.adapters_disabled

    def counted(m):
        switched_off.append(1)
        return real(m)

    monkeypatch.setattr(preference, "adapters_disabled", counted)

    def run(out, precompute):
        switched_off.clear()
        cfg = load_config(None, dict(
            model=str(model), data=str(data), output_dir=str(out), method="dpo",
            precompute_ref_log_probs=precompute, max_steps=4, micro_batch_size=2,
            gradient_accumulation_steps=1, lora_dropout=0.0, learning_rate=5e-3, warmup_steps=0,
            logging_steps=1, eval_steps=0, save_steps=0, device="cpu", val_set_size=2,
            gradient_checkpointing=False, quant="none", max_seq_length=32))
        result = loop.train(cfg, progress=False)
        return result, len(switched_off)

    with_forwards, calls = run(tmp_path / "a", False)
    assert calls == 4 + 1  # a reference forward in each step and in the evaluation
    precomputed, calls = run(tmp_path / "b", True)
    assert calls == 1  # the one pass before training
    for step, loss in with_forwards.step_losses.items():
        close(precomputed.step_losses[step], loss)
    close(precomputed.evals[-1]["rewards/margins"], with_forwards.evals[-1]["rewards/margins"],
          rel=1e-4)  # a difference of log-probs: rel 1e-5 of those, a few times more of it


def test_precompute_is_refused_where_there_is_no_fixed_reference():
    from qlora.config import load_config

    for method in ("kto", "orpo", "sft"):
        with pytest.raises(QloraError, match="precompute_ref_log_probs"):
            load_config(None, dict(model="m", data="d", output_dir="o", method=method,
                                   precompute_ref_log_probs=True))


@pytest.mark.parametrize("method", ["kto", "orpo", "simpo", "sft"])
def test_plan_refuses_a_precomputed_reference_as_train_does(method, tmp_path, capsys):
    """`qlora plan --precompute-ref-log-probs` is refused where `qlora train` refuses
    precompute_ref_log_probs, with the same message (methods.check_precomputed_reference)."""
    from qlora.cli import main

    out = tmp_path / "run"
    assert main(["train", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "d.jsonl"),
                 "--output_dir", str(out), "--method", method,
                 "--precompute_ref_log_probs", "true"]) == 2
    train_error = capsys.readouterr().err
    assert main(["plan", "--shape", "qwen2.5-1.5b", "--method", method,
                 "--precompute-ref-log-probs"]) == 2
    plan_error = capsys.readouterr().err
    assert "precompute_ref_log_probs` is for --method dpo" in train_error
    assert plan_error == train_error and not out.exists()


def test_plan_takes_dpo_with_a_precomputed_reference(capsys):
    from qlora.cli import main

    for precomputed in ([], ["--precompute-ref-log-probs"]):
        assert main(["plan", "--shape", "qwen2.5-1.5b", "--method", "dpo", *precomputed]) == 0
        planned = "reference forward" in capsys.readouterr().out
        assert planned == (not precomputed)  # no reference forward in the steps


# --- the memory planner -----------------------------------------------------------------------------
def test_planner_counts_two_sequences_and_the_reference_forward():
    from dataclasses import replace

    from qlora.memory import PlanConfig, plan
    from qlora.memory.preference import reference_forward_bytes
    from qlora.memory.settings import step_tokens
    from qlora.models.spec import spec_from_shape

    arch = spec_from_shape("llama-3-8b")
    sft = PlanConfig(seq_len=1024, loss="full")
    orpo_cfg, dpo_cfg = replace(sft, method="orpo"), replace(sft, method="dpo")
    assert step_tokens(orpo_cfg) == 2 * step_tokens(sft)
    a, b, c = plan(arch, sft), plan(arch, orpo_cfg), plan(arch, dpo_cfg)
    assert a.activations < b.activations == c.activations  # two sequences per example
    # DPO's reference forward is a moment of its own, ORPO has none
    assert c.reference > 0 == b.reference and "reference forward" in c.phases()
    assert c.workspace == b.workspace  # not workspace alive in every phase
    assert reference_forward_bytes(arch, orpo_cfg) == 0
    assert reference_forward_bytes(arch, replace(dpo_cfg, reference_precomputed=True)) == 0
    # KTO: the example with grad, its KL sequence under no_grad (the activations of SFT's tokens;
    # test_preference_graphs.py's test_kto_saves_the_activations_of_its_examples_only measures
    # it), and the reference forward over one half at a time, as DPO's over a pair's tokens
    kto_cfg = replace(sft, method="kto")
    assert step_tokens(kto_cfg) == step_tokens(sft)
    assert plan(arch, kto_cfg).activations == a.activations
    assert reference_forward_bytes(arch, kto_cfg) == reference_forward_bytes(arch, replace(dpo_cfg, seq_len=512))


def test_planned_preference_peaks_within_10_percent_of_the_gpu_measurements(capsys):
    """The qlora preference steps measured since the varlen k/v copies went (the runs before
    held 1.09 GiB more, docs/MEMORY.md; Qwen2.5-1.5B, 4 pairs of 512 + 512 on an H100, packed,
    attention kept) against `qlora plan` for the same step: the planner's 10% promise, as for
    SFT."""
    import json
    import re
    from pathlib import Path

    from qlora.cli import main

    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    runs = ["2026-12-06-1615-h100-varlen-pinning-orpo-longest48-export/qwen-orpo.jsonl",
            "2026-12-06-1615-h100-varlen-pinning-orpo-longest48-export/qwen-dpo.jsonl",
            "2026-12-06-1939-h100-kto-export8b-cpu16-phi4-profile/qwen-kto.jsonl"]
    records = [json.loads(line) for run in runs for line in (results / run).open()]
    records = [r for r in records if r["system"].startswith("qlora") and r["shape"] == "qwen2.5-1.5b"]
    assert {r["method"] for r in records} == {"orpo", "dpo", "kto"}
    for r in records:
        assert main(["plan", "--shape", r["shape"], "--method", r["method"], "--seq-len",
                     str(r["prompt"] + r["completion"]), "--micro-batch", str(r["pairs"]),
                     "--keep-attention"]) == 0
        planned = float(re.search(r"peak allocated \(torch.cuda.max_memory_allocated\)\s+([\d.]+)",
                                  capsys.readouterr().out).group(1))
        assert abs(planned / r["peak_alloc_gib"] - 1) <= 0.10, (r["method"], r["system"], planned)


def test_planner_counts_each_prompt_once_where_told(capsys):
    """prompt_len (`qlora plan --prompt-len`): a pair packed with its prompt once puts P + C + R
    tokens through the model, so everything sized by tokens counts micro x (2·seq_len − P); of
    kept attention, q, the output and the log-sum-exp follow, k and v stay at 2·seq_len a pair
    (the arithmetic of test_packed_rows_keep_what_the_planner_counts_of_their_attention)."""
    from dataclasses import replace

    from qlora.cli import main
    from qlora.errors import QloraError
    from qlora.memory import PlanConfig, plan
    from qlora.memory.attention import kept_attention_layer_bytes
    from qlora.memory.preference import reference_forward_bytes
    from qlora.memory.settings import key_tokens, step_tokens
    from qlora.models.spec import spec_from_shape

    arch = spec_from_shape("llama-3-8b")
    whole = PlanConfig(seq_len=1024, micro_batch=4, method="dpo", keep_attention=True, kernels="fused")
    shared = replace(whole, prompt_len=512)
    assert step_tokens(shared) == 4 * (2 * 1024 - 512) and key_tokens(shared) == step_tokens(whole)
    query_side = 2 * 2 * arch.num_heads * arch.head_dim + 4 * arch.num_heads  # q, out, lse
    saved = kept_attention_layer_bytes(arch, whole) - kept_attention_layer_bytes(arch, shared)
    assert saved == 4 * 512 * query_side
    assert reference_forward_bytes(arch, shared) == reference_forward_bytes(
        arch, replace(whole, seq_len=768))  # the same tokens a micro-batch: 4 x 1536
    assert plan(arch, shared).allocated < plan(arch, whole).allocated
    for bad in (replace(shared, prompt_len=1024), replace(shared, prompt_len=-1),
                replace(shared, method="kto"), replace(shared, method="sft")):
        with pytest.raises(QloraError, match="--prompt-len"):
            plan(arch, bad)
    assert main(["plan", "--shape", "llama-3-8b", "--prompt-len", "512"]) == 2  # a QloraError
    assert "--prompt-len is for the pair methods" in capsys.readouterr().err


def test_advice_never_shortens_a_sequence_to_its_prompt():
    """memory.advise halves --seq-len only down to just past --prompt-len (a sequence is longer
    than its prompt, which PlanConfig.validate refuses otherwise): a single change (the first
    halving, 2048, already below the prompt of 2500: not offered) and the combined fallback (its
    floor) alike."""
    from qlora.memory import GiB, PlanConfig, advise
    from qlora.models.spec import spec_from_shape

    arch = spec_from_shape("llama-3-8b")
    cfg = PlanConfig(seq_len=4096, micro_batch=8, method="dpo", prompt_len=2500)
    advice = advise(arch, cfg, 16 * GiB)  # single changes fit
    assert advice and all(a.changes.get("seq_len", cfg.seq_len) > cfg.prompt_len for a in advice)
    (fallback,) = advise(arch, cfg, 8 * GiB)  # nothing fits: it names the sequence's floor
    assert fallback.changes == {} and "--seq-len 2501 +" in fallback.text


def test_planned_shared_prompt_peaks_within_10_percent_of_the_gpu_measurements(capsys):
    """DPO with each prompt packed once (4 pairs of prompt 512 + completions 512 and 512,
    attention kept, CUDA graphs; H100, 2026-12-07, benchmarks/preference_step.py) against `qlora
    plan --prompt-len 512`, and the same pairs each sequence whole ("qlora-whole") against the plan
    without it: the planner's 10% promise (docs/MEMORY.md's preference row)."""
    import json
    import re
    from pathlib import Path

    from qlora.cli import main

    results = (Path(__file__).resolve().parents[1] / "benchmarks" / "results"
               / "2026-12-07-0240-h100-shared-prompt-dpo-orpo-gemma-moe")
    records = [json.loads(line) for run in ("llama-dpo.jsonl", "qwen-dpo.jsonl")
               for line in (results / run).open()]
    records = [r for r in records if r["system"] in ("qlora", "qlora-whole")]
    assert {(r["shape"], r["system"]) for r in records} == {
        (s, m) for s in ("llama-3-8b", "qwen2.5-1.5b") for m in ("qlora", "qlora-whole")}
    for r in records:
        shared = r["layout"] == "packed, each prompt once"
        assert shared == (r["system"] == "qlora")
        assert main(["plan", "--shape", r["shape"], "--method", r["method"], "--seq-len",
                     str(r["prompt"] + r["completion"]), "--micro-batch", str(r["pairs"]),
                     "--keep-attention", "--prompt-len", str(r["prompt"] if shared else 0)]) == 0
        planned = float(re.search(r"peak allocated \(torch.cuda.max_memory_allocated\)\s+([\d.]+)",
                                  capsys.readouterr().out).group(1))
        assert abs(planned / r["peak_alloc_gib"] - 1) <= 0.10, (r["shape"], r["system"], planned)


def test_the_reference_forward_of_gemma_counts_the_fused_loss_that_caps():
    """The fused cross-entropy applies Gemma's final soft-cap in its kernel (FastDecoderLM's
    token_losses), so Gemma 2's reference forward holds the fused loss's chunk (bf16 logits, fp32
    losses: 2·chunk·V + 4·chunk), as Llama's does, not the reference chunked loss's 10·chunk·V."""
    from dataclasses import replace

    from qlora.memory import PlanConfig, loss_chunk_tokens
    from qlora.memory.preference import reference_forward_bytes
    from qlora.models.spec import spec_from_shape

    for shape in ("llama-3-8b", "gemma-2-9b"):
        arch = spec_from_shape(shape)
        fused = PlanConfig(seq_len=1024, method="dpo", loss="chunked-fused")
        chunk, v = loss_chunk_tokens(arch.vocab_size), arch.vocab_size
        saved = reference_forward_bytes(arch, replace(fused, loss="chunked")) - reference_forward_bytes(arch, fused)
        assert saved == 10 * chunk * v - (2 * chunk * v + 4 * chunk), shape


def _varlen_gqa(monkeypatch, takes_gqa: bool) -> None:
    """The installed torch's varlen_attn with enable_gqa (2.13 here) or without (2.9 to 2.11)."""
    from qlora.models import attention

    monkeypatch.setattr(attention, "_varlen_takes_gqa", lambda: takes_gqa)


def _varlen_saving(monkeypatch, takes_gqa: bool) -> list[int]:
    """A CPU stand-in of torch's varlen_attn (with enable_gqa or, as torch 2.9 to 2.11, without:
    _varlen_gqa) that saves what torch's saves: q, k, v, the output and an fp32 log-sum-exp per
    head. Returns the list each call appends its saved bytes to."""
    from qlora.models import attention

    torch_varlen = pytest.importorskip("torch.nn.attention.varlen")  # torch >= 2.9
    saved = []

    def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size=(-1, 0), scale=None,
                    enable_gqa=False):
        assert k.shape[1] < q.shape[1], "k and v copied to every head"
        assert enable_gqa == takes_gqa, "torch 2.13 refuses grouped heads without enable_gqa"
        out = attention.varlen_reference(q, k, v, cu_q, cu_k)
        lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32)
        saved.append(sum(t.numel() * t.element_size() for t in (q, k, v, out, lse)))
        return out

    monkeypatch.setattr(torch_varlen, "varlen_attn", varlen_attn)
    monkeypatch.setattr(attention, "varlen_available", lambda device: True)
    _varlen_gqa(monkeypatch, takes_gqa)
    return saved


def test_planner_plans_a_preference_step_as_the_sft_step_of_its_tokens():
    """Packed rows hand grouped kv heads to the varlen kernel (no copies of k and v whatever the
    torch: the planner does not ask), so a preference step at Qwen2.5-1.5B (4 pairs of 512 + 512
    tokens, attention kept) plans as the SFT step of its 8,192 tokens, and DPO's reference
    forward, a moment of its own, is not where it peaks."""
    from dataclasses import replace

    from qlora.memory import PlanConfig, plan
    from qlora.models.spec import spec_from_shape

    qwen = spec_from_shape("qwen2.5-1.5b")
    orpo_cfg = PlanConfig(seq_len=1024, micro_batch=4, method="orpo", keep_attention=True,
                          kernels="fused", embedding_on_host=True)
    sft = replace(orpo_cfg, method="sft", seq_len=8192, micro_batch=1)
    orpo_plan, dpo_plan = plan(qwen, orpo_cfg), plan(qwen, replace(orpo_cfg, method="dpo"))
    assert orpo_plan.allocated == dpo_plan.allocated == plan(qwen, sft).allocated
    assert dpo_plan.peak_phase == "backward of the last layer"


def test_packed_rows_keep_what_the_planner_counts_of_their_attention(llama_dir, monkeypatch):
    """What the packed preference step's attention saves for backward (keep_attention, each
    layer), through a CPU stand-in of torch's varlen_attn that saves what torch's saves (q, k, v,
    the output, an fp32 log-sum-exp per head), equals the planner's kept-attention term, k and v
    at the kv heads, whether varlen_attn takes enable_gqa or (torch 2.11) has no such argument.
    Each prompt packed once (the default), the queries are P + C + R tokens a pair and the
    gathered keys 2P + C + R: the per-token term over 2P + C + R tokens (the planner's at
    prompt_len 0) is then over by the prompts' q, output and log-sum-exp bytes exactly, which is
    what the planner leaves out where told the prompt's length (settings.key_tokens)."""
    from qlora.adapters import AdapterConfig, attach_adapters
    from qlora.memory.attention import kept_key_bytes_per_token, kept_query_bytes_per_token
    from qlora.methods.preference import batch_loss
    from qlora.models import load_model
    from qlora.quant import QuantConfig
    from qlora.speed import SpeedPlan, apply_speed

    pairs = [{"prompt": [5, 6, 7], "chosen": [8, 9], "rejected": [10, 11, 12]},
             {"prompt": [13, 14], "chosen": [15, 16, 17], "rejected": [18]}]
    tokens = sum(2 * len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"]) for p in pairs)
    prompts = sum(len(p["prompt"]) for p in pairs)
    for takes_gqa in (True, False):
        saved = _varlen_saving(monkeypatch, takes_gqa)
        model = load_model(llama_dir, QuantConfig(method="none", compute_dtype=torch.bfloat16))
        attach_adapters(model, AdapterConfig(r=4, alpha=8, dropout=0.0))
        apply_speed(model, SpeedPlan(keep_attention=True))
        model.gradient_checkpointing = True
        query_side = kept_query_bytes_per_token(model.spec)  # q, the output, the lse
        planned = tokens * (query_side + kept_key_bytes_per_token(model.spec, repeated_kv=False))
        for share_prompt, want in ((False, planned), (True, planned - prompts * query_side)):
            saved.clear()
            batch_loss(orpo, model.train(),
                       pair_batch(pairs, 0, packed=True, share_prompt=share_prompt),
                       PreferenceOptions())
            assert saved == [want] * model.spec.num_layers


def test_unkept_attention_keeps_what_the_planner_counts_of_a_shared_prompt(llama_dir,
                                                                           monkeypatch):
    """Without checkpointing (and so nothing kept by keep_attention) a packed pair's attention
    saves q, the output and the log-sum-exp of its step tokens, k and v of its gathered keys:
    the per-token terms the planner sums for every layer (layer_activation_terms) over
    step_tokens, plus gathered_key_bytes for the rejected completions' copies of their
    prompts' keys. Two pairs of a 2-token prompt and 3-token completions: a PlanConfig of
    2 x 5 tokens, prompt_len 2 (16 step tokens, 20 keys)."""
    from qlora.adapters import AdapterConfig, attach_adapters
    from qlora.memory import PlanConfig
    from qlora.memory.activations import layer_activation_terms
    from qlora.memory.attention import gathered_key_bytes
    from qlora.memory.settings import step_tokens
    from qlora.methods.preference import batch_loss
    from qlora.models import load_model
    from qlora.quant import QuantConfig

    saved = _varlen_saving(monkeypatch, True)
    pairs = [{"prompt": [5, 6], "chosen": [8, 9, 7], "rejected": [10, 11, 12]},
             {"prompt": [13, 14], "chosen": [15, 16, 17], "rejected": [18, 19, 20]}]
    model = load_model(llama_dir, QuantConfig(method="none", compute_dtype=torch.bfloat16))
    attach_adapters(model, AdapterConfig(r=4, alpha=8, dropout=0.0))
    model.gradient_checkpointing = False
    cfg = PlanConfig(seq_len=5, micro_batch=2, prompt_len=2, method="orpo", r=4,
                     lora_dropout=0.0, kernels="eager")
    terms = layer_activation_terms(model.spec, cfg)
    attention_terms = [n for n in terms if n.startswith(("q, k, v", "attention output",
                                                         "attention logsumexp"))]
    assert len(attention_terms) == 3, sorted(terms)
    planned = (step_tokens(cfg) * sum(terms[n] for n in attention_terms)
               + gathered_key_bytes(model.spec, cfg))
    assert step_tokens(cfg) == 16 and gathered_key_bytes(model.spec, cfg) > 0
    batch_loss(orpo, model.train(), pair_batch(pairs, 0, packed=True, share_prompt=True),
               PreferenceOptions())
    assert saved == [planned] * model.spec.num_layers


def test_the_dense_mask_of_a_staged_shared_prompt_row_shows_every_query_a_key():
    """gathered_keys_mask (the dense fallback where varlen takes no window) over a staged row
    (train/graphs.stage_gathered_keys), whose padding document's keys repeat one filler token:
    255 of them for one pair with a 1-token prompt staged at pad_to 256 (the prompts' keys padded
    to 256), and the token once more as its own key: 256, which a uint8 count wrapped to 0, so the
    first padding query saw no key and SDPA could give it NaN. Every query sees at least one key, itself (bottom-right causal), and the
    mask equals the dense causal mask of each document over its own tokens plus, for the
    rejected completion, its prompt."""
    from qlora.data.preference import shared_prompt_batch
    from qlora.models.attention import GatheredKeys, Varlen, gathered_keys_mask
    from qlora.train.graphs import stage_gathered_keys

    pair = {"prompt": [5], "chosen": [6, 7], "rejected": [8, 9, 10]}
    batch = shared_prompt_batch([pair])
    plan = batch["attention"]
    staged = stage_gathered_keys(batch["input_ids"], batch["position_ids"], batch["labels"], plan,
                                 pad_to=256, pinned=False)
    length = staged.input_ids.shape[1]
    keys = staged.gathered_keys
    assert int((keys["key_index"] == 6).sum()) >= 256  # the filler: the first padding token (T=6)
    staged_plan = Varlen(staged.cu_seqlens, length,
                         keys=GatheredKeys(keys["key_index"], keys["cu_keys"], length))
    mask = gathered_keys_mask(staged_plan, 1, length, None)[0, 0]
    assert bool(mask.any(dim=1).all())
    # the real tokens: [prompt, chosen] a causal document; rejected sees the prompt, then itself
    want = torch.zeros(6, 6, dtype=torch.bool)
    want[:3, :3] = torch.ones(3, 3, dtype=torch.bool).tril()
    want[3:, 0] = True
    want[3:, 3:] = torch.ones(3, 3, dtype=torch.bool).tril()
    assert torch.equal(mask[:6, :6], want) and not bool(mask[:6, 6:].any())


@pytest.mark.parametrize("method", [dpo, kto])
def test_a_batch_works_out_its_label_layout_once_for_policy_and_reference(llama_dir, method,
                                                                          monkeypatch):
    """The policy's forward and the reference's (adapters off) read the same label positions,
    targets and attention plan: batch_loss works them out and copies them to the device once per
    batch (each half's once for KTO), not once per forward."""
    from qlora.data.preference import preference_batch
    from qlora.methods import preference
    from qlora.methods.preference import batch_loss

    calls = []
    layout = preference.label_layout
    monkeypatch.setattr(preference, "label_layout", lambda b: calls.append(1) or layout(b))
    model = _lora_model(llama_dir, speed=True, scale=0.3)
    examples = _varied_examples(method.LAYOUT)
    batch_loss(method, model, preference_batch(examples, 0, packed=False), PreferenceOptions())
    assert len(calls) == (1 if method.LAYOUT == "pairs" else 2)  # KTO: its two halves
