"""`qlora merge`: the merged checkpoint, loaded by transformers, gives PEFT's base+adapter logits.

Tolerances: fp32 merge vs PeftModel on the fp32 base: rtol 1e-4, atol 1e-5 on logits (the two only
differ in summation order). bf16 output: 2e-2 of the logits' scale (bf16 has 8 mantissa bits).
NF4 merge vs PeftModel on a base holding bitsandbytes' NF4 round trip: the same fp32 tolerance.
NF4 merge vs PeftModel on the transformers+bitsandbytes 4-bit base (CPU matmul rounds on its own):
at least 10x closer than the 16-bit merge, same greedy tokens.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import VARIANTS, reference_attention
from qlora.errors import QloraError
from qlora.merge import merge_adapter
from qlora.tiny import build_tiny_model
from test_moe import MOE_VARIANTS
from test_phi3 import PHI3_VARIANTS, randomize_adapters

peft = pytest.importorskip("peft")


def _make_adapter(model_dir, out_dir, kind: str, seed: int = 1):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    cfg = peft.LoraConfig(
        r=4, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0,
        use_rslora=kind == "rslora", use_dora=kind == "dora",
        # a per-module rank/alpha override, to check the scale lookup too
        alpha_pattern={} if kind == "rslora" else {"v_proj": 4},
    )
    model = peft.get_peft_model(base, cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # PEFT initialises B to zero: make the adapter do something
                p.normal_(0, 0.05)
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    model.save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    model = build_tiny_model(root / "tiny-llama", "llama", max_shard_size="100KB")
    adapters = {k: _make_adapter(model, root / f"adapter-{k}", k) for k in ("lora", "rslora", "dora")}
    return root, model, adapters


def _ids():
    torch.manual_seed(0)
    return torch.randint(0, 128, (2, 12))


def _peft_logits(model_dir, adapter_dir, quantized=False):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"dtype": torch.float32}
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    with torch.no_grad():
        base_logits = base(_ids()).logits
    model = peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return base_logits, model(_ids()).logits


def _logits(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(_ids()).logits


@pytest.mark.parametrize("kind", ["lora", "rslora", "dora"])
def test_merged_logits_match_peft_fp32(tiny, tmp_path, kind):
    _, model, adapters = tiny
    out = merge_adapter(model, adapters[kind], tmp_path / "merged", dtype="float32")
    base_logits, want = _peft_logits(model, adapters[kind])
    got = _logits(out)
    # the adapter matters: the base alone is far from the adapted logits
    assert (want - base_logits).abs().max() > 100 * 1e-4
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_merged_logits_match_peft_on_each_dense_family(tmp_path, family):
    """merge_and_unload's logits (PEFT over the fp32 base) on the families beside llama."""
    model = build_tiny_model(tmp_path / family, family)
    adapter = _make_adapter(model, tmp_path / "adapter", "lora", seed=2)
    out = merge_adapter(model, adapter, tmp_path / "merged", dtype="float32")
    base_logits, want = _peft_logits(model, adapter)
    assert (want - base_logits).abs().max() > 100 * 1e-4
    torch.testing.assert_close(_logits(out), want, rtol=1e-4, atol=1e-5)


# the tiny models test_gemma.py, test_phi3.py and test_moe.py build: model_type, config overrides
MERGE_FAMILIES = {"gemma2": VARIANTS["gemma2"], "gemma3": VARIANTS["gemma3"],
                  "phi3": ("phi3", PHI3_VARIANTS["phi3"]), "mixtral": MOE_VARIANTS["mixtral"],
                  "qwen3_moe": MOE_VARIANTS["qwen3-moe"]}  # qwen3_moe: a dense layer beside


@pytest.mark.parametrize("family", list(MERGE_FAMILIES))
def test_merge_equals_peft_merge_and_unload(tmp_path, family):
    """Our adapter (saved in PEFT's format by save_adapter, B random so the fold matters) merged
    by merge_adapter (`qlora merge`'s function, fp32) against PeftModel.merge_and_unload() on
    the fp32 base: every tensor of the state dict as transformers names it (a mixture of
    experts' stacked experts.gate_up_proj / down_proj) and the logits of each model.

    Bounds. Weights: both sides compute W + s·(B @ A) in fp32, in possibly another order (PEFT
    scales B @ A before adding; per expert or over the stacked experts). Each element is W plus
    r = 4 products, scaled and added: some r + 2 roundings of 6e-8 (fp32's unit roundoff) of
    values at most max|W'|, so <= ~4e-7 of the tensor's largest; 1e-5 of it is 25x that. A scale
    off by 1% moves each folded weight by 1% of s·B·A, which is near W's size here: 3e-3 to
    6e-3 of the tensor's largest (measured), 300x the bound. Logits: the same transformers
    forward (same attention, for Gemma 2 the eager one with its score cap) over weights that
    differ by <= 4e-7 relative; two layers grow that by no more than a few times, so rel <= 1e-5
    (max |a - b| / max |a|) holds with room, while the adapter itself moves the logits by more
    than 100x the bound (asserted).
    """
    from qlora.adapters import AdapterConfig, attach_adapters, save_adapter
    from qlora.models import load_model
    from qlora.quant import QuantConfig

    model_type, overrides = MERGE_FAMILIES[family]
    path = build_tiny_model(tmp_path / family, model_type, **overrides)
    ours = load_model(path, QuantConfig(method="none", compute_dtype=torch.float32))
    # dropout 0: PEFT's LoRA on expert parameters refuses any other
    attach_adapters(ours, AdapterConfig(r=4, alpha=8, dropout=0.0))
    randomize_adapters(ours, seed=4)  # B from zero to ~0.05: s·B·A about W's size
    save_adapter(ours, tmp_path / "adapter", str(path))
    del ours
    merged = merge_adapter(path, tmp_path / "adapter", tmp_path / "merged", dtype="float32")
    base, base_sd, base_logits = _fp32_base(path)
    want = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).merge_and_unload()
    changed = _assert_merged_as_peft(merged, want, base_sd, base_logits)
    assert ("experts.gate_up_proj" in " ".join(changed)) == (family in ("mixtral", "qwen3_moe"))


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_merge_of_peft_s_own_all_linear_on_experts_equals_peft(tmp_path, family, rslora):
    """The adapter PEFT itself makes of all-linear on a mixture of experts (peft 0.21 over
    transformers 5) names the experts' parameters bare (gate_up_proj, down_proj), adapts the
    router too (gate.weight) and gives gate_up_proj twice the rank and alpha (rank_pattern,
    alpha_pattern). Its alpha_pattern is then set out of proportion to the ranks (gate_up 40,
    the router 24: scales of 5 and 6 where lora_alpha/r is 2), so each parameter's own scale is
    tested; with rsLoRA, alpha / √r. Merged as PEFT loads and merges the saved adapter, to the
    bounds of the test above."""
    model_type, overrides = MERGE_FAMILIES[family]
    path = build_tiny_model(tmp_path / family, model_type, **overrides)
    trained = peft.get_peft_model(_fp32_base(path)[0], peft.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", use_rslora=rslora))
    randomize_adapters(trained, seed=5)
    trained.save_pretrained(str(tmp_path / "adapter"))
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    assert sorted(config["target_parameters"]) == ["down_proj", "gate.weight", "gate_up_proj"]
    assert list(config["rank_pattern"].values()) == [8]  # the form this test is about
    config["alpha_pattern"] = {r".*\.gate_up_proj": 40, "gate.weight": 24}
    config_path.write_text(json.dumps(config))
    base, base_sd, base_logits = _fp32_base(path)
    want = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    scales = {n: m.scaling["default"] for n, m in want.named_modules()
              if isinstance(getattr(m, "scaling", None), dict)}  # PEFT's layers, not attention's
    root = 8 ** 0.5 if rslora else 8  # gate_up's rank 8: the patterns reached PEFT's layers
    assert scales["base_model.model.model.layers.0.mlp.experts.base_layer"] == 40 / root
    assert scales["base_model.model.model.layers.0.mlp.gate"] == 24 / (2 if rslora else 4)
    merged = merge_adapter(path, tmp_path / "adapter", tmp_path / "merged", dtype="float32")
    changed = _assert_merged_as_peft(merged, want.merge_and_unload(), base_sd, base_logits)
    assert any(k.endswith("mlp.gate.weight") for k in changed)
    assert any(k.endswith("experts.gate_up_proj") for k in changed)
    # on the 4-bit base it cannot ride (a frozen router, one rank): refused, naming the way out
    from qlora.adapters import load_adapter
    from qlora.models import load_model
    from qlora.quant import QuantConfig

    with pytest.raises(QloraError, match=r"adapts the router.*`qlora merge` folds it"):
        load_adapter(load_model(path, QuantConfig(method="none", compute_dtype=torch.float32)),
                     tmp_path / "adapter")


def _fp32_base(path):
    """transformers' fp32 model of `path` (Gemma 2's eager attention, its score cap), a copy of
    its state dict (merge_and_unload merges in place) and its logits on _ids()."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                **reference_attention(path)).eval()
    with torch.no_grad():
        logits = base(_ids()).logits
    return base, {k: v.clone() for k, v in base.state_dict().items()}, logits


def _assert_merged_as_peft(merged, want, base_sd, base_logits) -> set[str]:
    """Our merged checkpoint, as transformers loads it, against PEFT's merged model `want`: every
    tensor and the logits to test_merge_equals_peft_merge_and_unload's bounds, the same tensors
    changed (returned), and the adapter moving the logits well past the bound."""
    from transformers import AutoModelForCausalLM

    got, info = AutoModelForCausalLM.from_pretrained(str(merged), output_loading_info=True,
                                                     dtype=torch.float32,
                                                     **reference_attention(merged))
    assert not any(info.values()), info  # every tensor read from our checkpoint, none made up
    want_sd, got_sd = want.state_dict(), got.state_dict()
    assert sorted(got_sd) == sorted(want_sd)
    assert not any("lora" in k or "base_layer" in k for k in want_sd)  # PEFT unloaded it all
    for key, w in want_sd.items():
        err = float((got_sd[key] - w).abs().max())
        assert err <= 1e-5 * float(w.abs().max()), (key, err, float(w.abs().max()))
    changed = {k for k, w in want_sd.items() if not torch.equal(w, base_sd[k])}
    assert changed == {k for k, w in got_sd.items() if not torch.equal(w, base_sd[k])}
    with torch.no_grad():
        want_logits = want.eval()(_ids()).logits
        got_logits = got.eval()(_ids()).logits
    scale = float(want_logits.abs().max())
    assert float((want_logits - base_logits).abs().max()) > 100 * 1e-5 * scale
    err = float((got_logits - want_logits).abs().max())
    assert err <= 1e-5 * scale, (err, scale)
    return changed


def test_bf16_output_is_sharded_and_complete(tiny, tmp_path):
    _, model, adapters = tiny
    out = merge_adapter(model, adapters["dora"], tmp_path / "merged", dtype="bf16", max_shard_size="60KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).exists() for s in shards)
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["torch_dtype"] == "bfloat16"
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).read_bytes() == (model / f).read_bytes()
    from safetensors import safe_open

    with safe_open(str(out / sorted(shards)[0]), "pt") as sf:
        assert all(sf.get_tensor(k).dtype == torch.bfloat16 for k in sf.keys())
    _, want = _peft_logits(model, adapters["dora"])
    got = _logits(out)
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()


def test_nf4_base_matches_4bit_peft_model(tiny, tmp_path):
    _, model, adapters = tiny
    out_nf4 = merge_adapter(model, adapters["lora"], tmp_path / "nf4", dtype="fp32", base="nf4")
    out_orig = merge_adapter(model, adapters["lora"], tmp_path / "orig", dtype="fp32")
    _, want = _peft_logits(model, adapters["lora"], quantized=True)
    got_nf4, got_orig = _logits(out_nf4), _logits(out_orig)
    # bitsandbytes' CPU 4-bit matmul rounds on its own (~1e-3 per layer), so not fp32-tight here;
    # the NF4 merge must still be >10x closer to the 4-bit adapter model than the 16-bit merge.
    err_nf4, err_orig = (got_nf4 - want).abs().max(), (got_orig - want).abs().max()
    assert err_nf4 < 0.1 * err_orig, (err_nf4, err_orig)
    assert (got_nf4.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_nf4_base_matches_peft_on_nf4_weights(tiny, tmp_path, kind):
    """Exact check: PEFT on a base holding bitsandbytes' NF4 round trip of each linear, in fp32."""
    from transformers import AutoModelForCausalLM

    from qlora.merge import is_quantized_linear

    _, model, adapters = tiny
    out = merge_adapter(model, adapters[kind], tmp_path / "nf4", dtype="fp32", base="nf4")
    base = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    import bitsandbytes.functional as bnbf

    with torch.no_grad():
        for name, p in base.named_parameters():
            if is_quantized_linear(name, tuple(p.shape)):
                q, state = bnbf.quantize_4bit(p.data, blocksize=64, quant_type="nf4", compress_statistics=True)
                p.copy_(bnbf.dequantize_4bit(q, state))
        want = peft.PeftModel.from_pretrained(base, str(adapters[kind])).eval()(_ids()).logits
    torch.testing.assert_close(_logits(out), want, rtol=1e-4, atol=1e-5)


# --- bad inputs ---------------------------------------------------------------------------------
def _clean(parent):
    return not [p for p in parent.iterdir() if "partial" in p.name]


def test_adapter_for_another_model_shapes(tiny, tmp_path):
    root, model, _ = tiny
    # same directory name, another size: the name check passes, the shape check must refuse
    other = build_tiny_model(tmp_path / "x" / "tiny-llama", "llama", hidden_size=32, intermediate_size=64)
    adapter = _make_adapter(other, tmp_path / "adapter-other", "lora")
    with pytest.raises(QloraError, match=r"layers\.0\.\S+\.lora_A\.weight \[4, \d+\] / lora_B\.weight \[\d+, 4\] do not fit base "
                       r"model\.layers\.0\.\S+\.weight \[\d+, \d+\]"):
        merge_adapter(model, adapter, tmp_path / "out", dtype="fp32")
    assert not (tmp_path / "out").exists() and _clean(tmp_path)


def test_adapter_for_another_model_name(tiny, tmp_path):
    _, model, adapters = tiny
    cfg = json.loads((adapters["lora"] / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "Qwen/Qwen2.5-7B-Instruct"
    bad = tmp_path / "adapter"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    (bad / "adapter_model.safetensors").write_bytes((adapters["lora"] / "adapter_model.safetensors").read_bytes())
    with pytest.raises(QloraError, match="Qwen2.5-7B-Instruct.*--ignore-base-name"):
        merge_adapter(model, bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    merge_adapter(model, bad, tmp_path / "out", ignore_base_name=True)  # the override works


def test_missing_files_and_existing_out(tiny, tmp_path):
    _, model, adapters = tiny
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(QloraError, match="adapter_config.json"):
        merge_adapter(model, empty, tmp_path / "o1")
    (empty / "adapter_config.json").write_text((adapters["lora"] / "adapter_config.json").read_text())
    with pytest.raises(QloraError, match="adapter_model.safetensors"):
        merge_adapter(model, empty, tmp_path / "o2")
    with pytest.raises(QloraError, match="config.json"):
        merge_adapter(empty, adapters["lora"], tmp_path / "o3")
    exists = tmp_path / "exists"
    exists.mkdir()
    (exists / "keep.txt").write_text("mine")
    with pytest.raises(QloraError, match="exists"):
        merge_adapter(model, adapters["lora"], exists)
    assert (exists / "keep.txt").read_text() == "mine"
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3)) and _clean(tmp_path)


def test_failure_midway_leaves_nothing(tiny, tmp_path, monkeypatch):
    _, model, adapters = tiny
    import qlora.merge as m

    calls = {"n": 0}
    real = m.fold

    def failing(w, mod):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("disk full")
        return real(w, mod)

    monkeypatch.setattr(m, "fold", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        merge_adapter(model, adapters["lora"], tmp_path / "out", max_shard_size="20KB")
    assert list(tmp_path.iterdir()) == []


def test_cli_merge(tiny, tmp_path, capsys):
    from qlora.cli import main

    _, model, adapters = tiny
    out = tmp_path / "merged"
    args = ["merge", "--model", str(model), "--adapter", str(adapters["rslora"]), "--out", str(out)]
    assert main(args + ["--dtype", "fp16"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    assert main(args) == 2
    assert "exists" in capsys.readouterr().err


def test_cli_merge_reads_the_adapter_once(tiny, tmp_path, capsys, monkeypatch):
    """`qlora merge` reads adapter_config.json and adapter_model.safetensors once each: the
    base-name check, the fold and the line describing the adapter take them from that read."""
    import pathlib

    import safetensors.torch

    from qlora.cli import main

    _, model, adapters = tiny
    reads = []
    read_text, load_file = pathlib.Path.read_text, safetensors.torch.load_file
    monkeypatch.setattr(pathlib.Path, "read_text",
                        lambda path, *a, **k: reads.append(path.name) or read_text(path, *a, **k))
    monkeypatch.setattr(safetensors.torch, "load_file",
                        lambda path, *a, **k: reads.append(pathlib.Path(path).name) or load_file(path, *a, **k))
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(model), "--adapter", str(adapters["dora"]), "--out", str(out),
                 "--no-check"]) == 0
    assert reads.count("adapter_config.json") == 1
    assert reads.count("adapter_model.safetensors") == 1
    assert "adapter: DoRA r=4 alpha=16" in capsys.readouterr().out


def test_shard_sizes_follow_transformers_units():
    from qlora.merge import parse_shard_size

    assert parse_shard_size("5GB") == 5 * 10**9
    assert parse_shard_size("2GiB") == 2 * 2**30
    assert parse_shard_size("500MiB") == 500 * 2**20
    with pytest.raises(QloraError, match="5GB"):
        parse_shard_size("lots")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("conv1d", [False, True])
def test_fold_in_place_has_the_bits_of_the_fold_out_of_place(dtype, dora, conv1d):
    """merge.fold builds W' in place on B @ A (one fp32 tensor of W's size) and must give the
    bits of W + scale · B @ A computed out of place, DoRA's row norms included: also where W
    is a Conv1D's transposed view, whose out-of-place sum took that layout (and DoRA's norms
    its order of summation). Exact: the same roundings, in the same order."""
    from qlora.merge import LoraModule, fold

    g = torch.Generator().manual_seed(0)
    w = torch.randn(160, 96, generator=g).to(dtype).t() if conv1d \
        else torch.randn(96, 160, generator=g).to(dtype)
    m = LoraModule("layer", scale=8 / 4 ** 0.5, A=0.1 * torch.randn(8, 160, generator=g),
                   B=0.1 * torch.randn(96, 8, generator=g),
                   magnitude=torch.rand(96, generator=g) + 0.5 if dora else None)
    want = w.float() + m.scale * (m.B @ m.A)
    if dora:
        want = (m.magnitude / torch.linalg.norm(want, dim=1)).unsqueeze(1) * want
    assert torch.equal(fold(w, m), want)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_a_trained_copy_of_a_tied_embedding_is_refused(tmp_path, family):
    """modules_to_save on the embedding of a tied model: the file would store one table for both
    the embedding and the head, so the head would change too. PEFT records the copy by its
    tensor name (model.embed_tokens.weight), not the module's; it must be refused all the same.
    Gemma 2's config.json, as transformers saves it, leaves the key out: its class ties by default."""
    from transformers import AutoModelForCausalLM

    model = build_tiny_model(tmp_path / f"tiny-{family}", family, tie_word_embeddings=True)
    config = json.loads((model / "config.json").read_text())
    if family == "gemma2":
        del config["tie_word_embeddings"]
        (model / "config.json").write_text(json.dumps(config))
    base = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                              modules_to_save=["embed_tokens"])
                        ).save_pretrained(str(tmp_path / "adapter"))
    with pytest.raises(QloraError, match=r"changes model\.embed_tokens of a model with tied embeddings"):
        merge_adapter(model, tmp_path / "adapter", tmp_path / "out", dtype="fp32")
    assert not (tmp_path / "out").exists() and _clean(tmp_path)


def test_headers_read_from_another_folder_are_refused(tiny, tmp_path):
    """merge_adapter takes the headers a caller read once; read from another checkpoint of the
    same shapes they would pass every check and write that checkpoint's tensors, silently."""
    from qlora.models.weights import read_headers

    _, model, adapters = tiny
    other = build_tiny_model(tmp_path / "other" / "tiny-llama", "llama", seed=5)
    with pytest.raises(ValueError, match=r"headers read from \S*other\S* given for"):
        merge_adapter(model, adapters["lora"], tmp_path / "out", headers=read_headers(other))
    assert not (tmp_path / "out").exists() and _clean(tmp_path)
