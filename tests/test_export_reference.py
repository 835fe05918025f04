"""The check's reference a layer at a time (export/reference.StreamedReference): the whole model's
logits and greedy tokens, a peak of live tensor bytes within what check.py sizes for it, and the
check's choice between it and the whole model (check.reference_mode)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from qlora.adapters import AdapterConfig, attach_adapters, save_adapter
from qlora.export.check import OVERHEAD, PROCESS_BYTES, reference_host_bytes
from qlora.export.reference import StreamedReference, load_check_reference, load_reference
from qlora.infer import GenerationOptions, generate
from qlora.models.load import load_model
from qlora.models.weights import read_headers
from qlora.quant import QuantConfig
from qlora.tiny import build_tiny_model

sys.path.insert(0, str(Path(__file__).parent))


def _base_and_adapter(root: Path, family: str, **sizes) -> tuple[Path, Path]:
    """A tiny bf16 checkpoint (what the CPU reference widens to float32 layer by layer) and a LoRA
    adapter on all its linears with non-zero B (a zero B would hide a layer loaded without it)."""
    base = build_tiny_model(root / family, family, dtype="bfloat16", **sizes)
    model = load_model(base, QuantConfig(method="none", compute_dtype=torch.float32))
    attach_adapters(model, AdapterConfig(r=4, alpha=8, dropout=0.0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return base, save_adapter(model, root / f"{family}-adapter", str(base))


def _sequences(lengths, vocab: int = 128, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (1, n), generator=g) for n in lengths]


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_streamed_reference_gives_the_whole_models_logits_and_tokens(tmp_path, family):
    """gemma2 besides llama: its own backbone, scaled embedding, per-window dense masks and
    soft-capped logits all go through the streamed pass. Equality is exact (no tolerance): every
    sequence runs the same modules with the same float32 weights (the same bf16 values widened)
    on the same shapes in the same order, only the layers are read at another time, and the
    CPU's kernels give the same bits for the same shapes and threads."""
    base, adapter = _base_and_adapter(tmp_path, family, num_hidden_layers=3)
    whole, _, what = load_reference(base, adapter, device="cpu")
    streamed, streamed_what = load_check_reference(base, adapter, device="cpu", streamed=True)
    assert isinstance(streamed, StreamedReference) and streamed_what == what
    sequences = _sequences([5, 17, 40])  # 17, 40: past gemma2's tiny sliding window (8)
    with torch.no_grad():
        want = [whole(ids) for ids in sequences]
    got = list(streamed.each_logits(sequences))
    for w, g in zip(want, got, strict=True):
        assert torch.equal(w, g)
    opts = GenerationOptions(max_new_tokens=6)
    prompt = sequences[1][0].tolist()
    assert generate(streamed, prompt, opts) == generate(whole, prompt, opts)  # the KV cache's path


def test_the_nf4_base_streams_to_the_same_logits(tmp_path):
    """`--base nf4`: each layer quantized to NF4 as it is read, as the whole model's load does
    (bitsandbytes' quantization is deterministic): the same logits, exactly."""
    base, adapter = _base_and_adapter(tmp_path, "llama", num_hidden_layers=2)
    whole, _, what = load_reference(base, adapter, "nf4", device="cpu")
    streamed, streamed_what = load_check_reference(base, adapter, "nf4", device="cpu", streamed=True)
    assert "NF4" in what and streamed_what == what
    ids = _sequences([12])[0]
    with torch.no_grad():
        assert torch.equal(whole(ids), next(streamed.each_logits([ids])))


def test_a_streamed_layer_is_read_with_its_adapter_and_freed(tmp_path, monkeypatch):
    from qlora.models import load as load_module
    from qlora.models import weights

    base, adapter = _base_and_adapter(tmp_path, "llama", num_hidden_layers=2)
    listed = []
    counting = lambda model_dir, _list=weights.shard_keys: listed.append(1) or _list(model_dir)
    monkeypatch.setattr(weights, "shard_keys", counting)
    monkeypatch.setattr(load_module, "shard_keys", counting)
    streamed, _ = load_check_reference(base, adapter, device="cpu", streamed=True)
    assert all(p.is_meta for n, p in streamed.shell.named_parameters() if ".layers." in n)
    layer = streamed.layer(1)
    assert not any(p.is_meta for p in layer.parameters())
    assert type(layer.self_attn.q_proj).__name__ == "LoraLinear"
    assert layer.self_attn.q_proj.lora_B.weight.abs().sum() > 0
    streamed.drop_layer(1)
    assert all(p.is_meta for p in streamed.shell.model.layers[1].parameters())
    assert len(listed) == 1  # the shards' keys listed once, for the shell and every layer


def test_the_streamed_reference_peak_stays_within_its_size(tmp_path):
    """Live tensor bytes (tests/live_bytes.py, op by op) of a streamed pass over the check's
    examples at its token limit: at most reference_host_bytes' streamed size without its 5% and
    PROCESS_BYTES (those are for the interpreter and torch), which is well under the whole
    model's float32 values."""
    from live_bytes import LiveBytes

    from qlora.export.check import MAX_TOKENS

    base, adapter = _base_and_adapter(tmp_path, "llama", num_hidden_layers=16, hidden_size=256,
                                      intermediate_size=1024)
    samples = 3
    headers = read_headers(base)
    sized = (reference_host_bytes(headers, "original", True, adapter, samples) - PROCESS_BYTES) / OVERHEAD
    whole_size = reference_host_bytes(headers, "original", False) / OVERHEAD
    sequences = _sequences([MAX_TOKENS] * samples)
    count = LiveBytes()
    with count:
        streamed, _ = load_check_reference(base, adapter, device="cpu", streamed=True)
        for logits in streamed.each_logits(sequences):
            rows = logits[0, :-1].clone()  # the compared rows, as check.logits_at_positions keeps
            del logits, rows
    assert 0 < count.peak <= sized < whole_size / 2


def test_the_streamed_pass_leaves_autograd_as_it_was(tmp_path):
    """A pass left unfinished (check.py zips its logits with the samples) must not leave grad
    mode off: the next training step would have no graph."""
    base, adapter = _base_and_adapter(tmp_path, "llama", num_hidden_layers=2)
    streamed, _ = load_check_reference(base, adapter, device="cpu", streamed=True)
    each = streamed.each_logits(_sequences([4, 5]))
    next(each)
    assert torch.is_grad_enabled()


def test_the_streamed_chat_reply_is_the_whole_models_greedy_reply(tmp_path):
    """The reference's chat reply read off one pass over the other model's reply (check.py's
    forced_greedy_reply) is the token-by-token greedy reply of the whole model, whatever the
    other replied: the same reply (one pass, nothing generated), one that parts from it, none,
    one that runs past the reference's end of turn; and without an end of turn, the budget."""
    from qlora.export.check import CHAT_TOKENS, ChatTurn, streamed_run

    base, adapter = _base_and_adapter(tmp_path, "llama", num_hidden_layers=2)
    whole, _, _ = load_reference(base, adapter, device="cpu")
    streamed, _ = load_check_reference(base, adapter, device="cpu", streamed=True)
    prompt = _sequences([9], seed=3)[0][0].tolist()
    free = generate(whole, prompt, GenerationOptions(max_new_tokens=CHAT_TOKENS))
    stop = free[10]
    want = generate(whole, prompt, GenerationOptions(max_new_tokens=CHAT_TOKENS, eos_token_ids=(stop,)))
    assert want[-1] == stop and len(want) <= 11
    turn = ChatTurn([], "", (stop,), "", prompt)
    other_token = next(t for t in range(3, 128) if t not in want)
    passes = []
    read_layer = streamed.layer
    streamed.layer = lambda i: (passes.append(i) if i == 0 else None, read_layer(i))[1]
    for other, most_passes in ((want, 1), (want[:4] + [other_token] * 6, 1 + len(want) - 5), ([], len(want)),
                               (want[:-1] + [other_token] * 9, 1)):
        passes.clear()
        got = streamed_run(streamed, [], turn, other, tmp_path, "r")[1]
        assert got["reply_ids"] == want and got["stopped_on"] == stop
        assert len(passes) <= most_passes
    unstopped = ChatTurn([], "", (), "", prompt)
    assert streamed_run(streamed, [], unstopped, free, tmp_path, "r")[1]["reply_ids"] == free


@pytest.mark.parametrize("mode", ["whole", "streamed"])
def test_an_adapter_that_does_not_attach_is_said_before_the_file_runs(tmp_path, monkeypatch, mode):
    """Streamed, the file runs first (its reply is what the reference's is read off), so the
    adapter's fit is checked before, on the model built empty; whole, the reference runs first.
    Either way a wrong adapter costs no llama.cpp run."""
    from qlora.export import check

    base, _ = _base_and_adapter(tmp_path / "a", "llama", num_hidden_layers=2)
    _, other = _base_and_adapter(tmp_path / "b", "llama", num_hidden_layers=2, intermediate_size=96)
    monkeypatch.setattr(check, "reference_mode", lambda *sizes: mode)
    monkeypatch.setattr(check, "run_gguf_in_qlora", lambda *a, **k: pytest.fail("the file ran"))
    with pytest.raises(check.ReferenceUnavailable, match="cannot run base \\+ adapter.*shape"):
        check.check_gguf(tmp_path / "m.gguf", base, "q8_0", adapter_dir=other, engine="qlora",
                         device="cpu", log=lambda _: None)


def test_the_whole_model_is_the_reference_where_it_fits():
    """reference_mode(whole bytes, streamed bytes, available bytes): the whole model wherever it
    fits (one decode step a chat token, not a pass over the checkpoint), streamed where only that
    fits, neither where nothing does; unknown memory runs the whole model, as before sizing."""
    from qlora.export.check import reference_mode

    assert reference_mode(30, 6, 40) == reference_mode(30, 6, 30) == "whole"
    assert reference_mode(30, 6, 29) == reference_mode(30, 6, 6) == "streamed"
    assert reference_mode(30, 6, 5) is None
    assert reference_mode(30, None, 29) is None  # the generic path cannot stream
    assert reference_mode(30, 40, 35) == "whole"  # a tiny model: its streamed size is the larger
    assert reference_mode(30, 6, None) == "whole"


def test_the_check_streams_only_where_the_whole_model_does_not_fit(tmp_path, monkeypatch):
    """check_gguf with the host's available memory set between the two sizes streams (the file
    first, the reference's reply read off the file's) and says so in its table; at the whole
    model's size it runs the whole model, the reference first. 8 layers: the whole model's values
    outweigh a layer's and the activations of 2 examples."""
    from qlora.export import check
    from qlora.export.gguf import export_gguf
    from qlora.memory import host

    base, adapter = _base_and_adapter(tmp_path, "llama", num_hidden_layers=8, hidden_size=256,
                                      intermediate_size=1024)
    gguf = export_gguf(base, tmp_path / "m.gguf", "f16", adapter_dir=adapter)  # quickest to write
    # the interpreter's 0.5 GiB (PROCESS_BYTES) outweighs a tiny model's whole size; left out here
    monkeypatch.setattr(check, "PROCESS_BYTES", 0)
    monkeypatch.setattr(check, "CHAT_TOKENS", 4)  # a random model's replies part: a pass a token
    headers, samples = read_headers(base), 2
    whole = check.reference_host_bytes(headers, "original", False)
    streamed = check.reference_host_bytes(headers, "original", True, adapter, samples)
    assert streamed < whole
    calls = []
    reference, file = check.run_reference, check.run_gguf_in_qlora
    monkeypatch.setattr(check, "run_reference", lambda *a: calls.append(("reference", a[7])) or reference(*a))
    monkeypatch.setattr(check, "run_gguf_in_qlora", lambda *a: calls.append("file") or file(*a))
    for available, want, order in (
            ((whole + streamed) // 2, "streamed a layer at a time", ["file", ("reference", True)]),
            (int(whole) + 1, "whole model (", [("reference", False), "file"])):
        monkeypatch.setattr(host, "host_available_bytes", lambda: int(available))
        calls.clear()
        lines = []
        report = check.check_gguf(gguf, base, "f16", adapter_dir=adapter, samples=samples,
                                  engine="qlora", device="cpu", log=lines.append)
        assert report["passed"] and want in report["reference_run"] and want in lines[-1]
        assert calls == order
