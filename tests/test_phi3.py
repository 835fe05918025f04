"""Phi-3 (model_type phi3) against transformers, bitsandbytes and PEFT: its fused qkv_proj and
gate_up_proj, partial rotary, LongRoPE and sliding window; training, merge and GGUF export."""

from __future__ import annotations

import pytest
import torch

from qlora.models import load_model
from qlora.quant import QuantConfig

FP32 = torch.float32
HEAD_DIM = 16  # the tiny sizes' hidden 64 over 4 heads
ORIGINAL = 32  # LongRoPE's original context in the tests: rows of 24 use the short factors


def longrope(rotary_dim: int) -> dict:
    """LongRoPE parameters with factors unlike each other and unlike 1, so that a model that
    picks the wrong list, or ignores them, is caught."""
    pairs = rotary_dim // 2
    return {"rope_type": "longrope", "rope_theta": 10000.0,
            "short_factor": [1.0 + 0.25 * i for i in range(pairs)],
            "long_factor": [2.0 + 1.5 * i for i in range(pairs)]}


# name → config overrides of a tiny phi3
PHI3_VARIANTS = {
    "phi3": {},
    "phi3-partial": {"partial_rotary_factor": 0.5},
    # max_position_embeddings / original = 16: an attention factor of sqrt(1 + ln 16 / ln 32)
    "phi3-longrope": {"rope_parameters": {**longrope(HEAD_DIM // 2),
                                          "partial_rotary_factor": 0.5},
                      "original_max_position_embeddings": ORIGINAL},
    "phi3-su": {"rope_scaling": {**longrope(HEAD_DIM), "type": "su"},
                "original_max_position_embeddings": ORIGINAL},
    "phi3-window": {"sliding_window": 12},
}


@pytest.fixture(scope="module")
def phi3_models(tmp_path_factory) -> dict:
    from qlora.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("phi3")
    return {name: build_tiny_model(root / name, "phi3", seed=i, **overrides)
            for i, (name, overrides) in enumerate(PHI3_VARIANTS.items())}


def hf_model(path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=FP32, **kwargs).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def token_batch(seed: int = 0, batch: int = 2, length: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(6, 128, (batch, length), generator=g)


def fp32_model(path):
    return load_model(path, QuantConfig(method="none", compute_dtype=FP32))


# fp32 on both sides, the same weights and the same operations in the same order (fused
# projections split, RoPE tables computed in fp32 from the same frequencies): what differs is
# only the attention kernel's and matmuls' summation order, ~1e-7 relative; 1e-5 leaves room for
# that and catches any wrong split, factor or window (each moves the logits by 1e-2 or more)
@pytest.mark.parametrize("variant", list(PHI3_VARIANTS))
@pytest.mark.parametrize("length", [24, 40])  # shorter and longer than LongRoPE's ORIGINAL
def test_logits_match_transformers(phi3_models, variant, length):
    path = phi3_models[variant]
    ids = token_batch(length=length)
    with torch.no_grad():
        expected = hf_model(path)(ids).logits
        got = fp32_model(path)(ids)
    assert got.shape == expected.shape
    assert rel_err(expected, got) <= 1e-5


def test_spec_names_phi3_s_fused_linears(phi3_models):
    from qlora.models import read_spec

    spec = read_spec(phi3_models["phi3"])
    assert spec.block_linears() == ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    assert spec.linear_shapes()["qkv_proj"] == ((4 + 2 * 2) * HEAD_DIM, 64)
    assert spec.linear_shapes()["gate_up_proj"] == (2 * 128, 64)
    hf = hf_model(phi3_models["phi3"])
    assert spec.num_params() == sum(p.numel() for p in hf.parameters())
    assert read_spec(phi3_models["phi3-window"]).layer_windows == (12, 12)


def test_unsupported_rope_type_is_refused(phi3_models, tmp_path):
    import json
    import shutil

    from qlora.errors import QloraError
    from qlora.models import read_spec

    shutil.copytree(phi3_models["phi3"], tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QloraError, match="longrope"):
        read_spec(tmp_path / "m")


@pytest.mark.parametrize("variant", ["phi3", "phi3-longrope"])
def test_nf4_bytes_and_logits_match_bitsandbytes(phi3_models, variant):
    from transformers import BitsAndBytesConfig

    from conftest import fp32_bnb_reference

    path = phi3_models[variant]
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                    bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=FP32)
    ref = fp32_bnb_reference(hf_model(path, quantization_config=bnb_config, device_map="cpu"))
    ours = load_model(path, QuantConfig(method="nf4", double_quant=True, compute_dtype=FP32))
    ref_state, our_state = ref.state_dict(), ours.state_dict()
    quantized = [k for k in ref_state if k.endswith("_proj.weight") or ".weight." in k]
    assert any("qkv_proj.weight." in k for k in quantized)
    assert any("gate_up_proj.weight." in k for k in quantized)
    for key in quantized:
        assert torch.equal(ref_state[key], our_state[key]), f"{key} differs from bitsandbytes'"
    qkv = ours.model.layers[0].self_attn.qkv_proj.weight
    assert qkv.dtype == torch.uint8 and qkv.quant_state.quant_type == "nf4"
    ids = token_batch(1)
    with torch.no_grad():
        assert rel_err(ref(ids).logits, ours(ids)) <= 1e-4


def randomize_adapters(model, seed: int) -> None:
    """B starts at zero, which would make every comparison pass trivially."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_our_all_linear_adapter_loads_in_peft_with_equal_logits(phi3_models, tmp_path):
    from peft import PeftModel

    from qlora.adapters import AdapterConfig, attach_adapters, save_adapter

    path = phi3_models["phi3-partial"]
    ours = fp32_model(path)
    wrapped = attach_adapters(ours, AdapterConfig(r=8, alpha=16, dropout=0.0))
    assert sorted({n.rsplit(".", 1)[-1] for n in wrapped}) == [
        "down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    assert len(wrapped) == 2 * 4
    randomize_adapters(ours, 1)
    save_adapter(ours, tmp_path / "adapter", str(path))
    peft_model = PeftModel.from_pretrained(hf_model(path), tmp_path / "adapter").eval()
    ids = token_batch(2, length=24)
    with torch.no_grad():
        assert rel_err(peft_model(ids).logits, ours(ids)) <= 1e-5


def test_peft_adapter_loads_here_with_equal_loss(phi3_models, tmp_path):
    from peft import LoraConfig, get_peft_model

    from qlora.adapters import load_adapter

    path = phi3_models["phi3-longrope"]
    peft_cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                          target_modules="all-linear")
    peft_model = get_peft_model(hf_model(path), peft_cfg)
    randomize_adapters(peft_model, 2)
    peft_model.save_pretrained(tmp_path / "peft-adapter")
    ours = fp32_model(path)
    load_adapter(ours, tmp_path / "peft-adapter")
    ids = token_batch(3, length=40)
    labels = ids.clone()
    labels[:, :6] = -100
    with torch.no_grad():
        ref = peft_model.eval()(input_ids=ids, labels=labels).loss
        got = ours(ids, labels=labels) / (labels[:, 1:] != -100).sum()
    assert abs(float(ref) - float(got)) <= 1e-5 * abs(float(ref))


# The long variant's generation passes LongRoPE's original 32 positions: the step that crosses
# it runs the whole sequence again, every key rotated with the long factors (transformers' rule,
# Phi3ForCausalLM.prepare_inputs_for_generation). transformers 5.17's generate drops its cache
# there but then feeds only the last token (its cache_position slicing), so its own tokens past
# that step are not the rule's; the reference there is its forward over the whole sequence.
@pytest.mark.parametrize("variant", ["phi3", "phi3-longrope", "phi3-window"])
def test_greedy_generation_matches_transformers(phi3_models, variant):
    from qlora.infer import GenerationOptions, generate
    from qlora.models import load_tokenizer

    path = phi3_models[variant]
    prompt = load_tokenizer(path)("Once upon a time")["input_ids"]
    got = generate(fp32_model(path), prompt, GenerationOptions(max_new_tokens=30))
    ref = hf_model(path)
    if variant == "phi3-longrope":
        assert len(prompt) < ORIGINAL < len(prompt) + 30
        want, seq = [], list(prompt)
        with torch.no_grad():
            for _ in range(30):
                want.append(int(ref(torch.tensor([seq])).logits[0, -1].argmax()))
                seq.append(want[-1])
    else:
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
        want = out[0, len(prompt):].tolist()
    assert got == want


@pytest.mark.parametrize("variant", ["phi3-longrope", "phi3-su"])
def test_apply_speed_gives_the_reference_loss_and_adapter_gradients(phi3_models, variant,
                                                                    monkeypatch):
    """The plan a CUDA run of `qlora train` takes (4-bit fast base, grouping, kept attention,
    checkpointing), here on the CPU without Triton, for a partial and a full rotary: the forks
    change no number, and the checkpoint's rerun computes no attention (it was kept)."""
    from qlora.adapters import AdapterConfig, attach_adapters
    from qlora.models.attention import Attention
    from qlora.speed import SpeedPlan, apply_speed
    from qlora.speed.fast_decoder import (FastPhi3Attention, FastPhi3DecoderLayer, FastPhi3LM,
                                          FastRMSNorm)

    attended = []
    sdpa = Attention.sdpa
    monkeypatch.setattr(Attention, "sdpa", lambda self, *a: attended.append(1) or sdpa(self, *a))

    def step(speed: bool):
        torch.manual_seed(0)
        attended.clear()
        model = load_model(phi3_models[variant],
                           QuantConfig(method="nf4", compute_dtype=FP32))
        attach_adapters(model, AdapterConfig(r=4, alpha=8, dropout=0.0))
        randomize_adapters(model, 4)
        model.gradient_checkpointing = True
        model.train()
        if speed:
            applied = apply_speed(model, SpeedPlan(fast_base=True, grouped=True,
                                                   keep_attention=True, seeded_dropout=True))
            assert applied.fast_layers == 2 * 4
            assert type(model) is FastPhi3LM
            assert type(model.model.layers[0]) is FastPhi3DecoderLayer
            assert type(model.model.norm) is FastRMSNorm
            assert type(model.model.layers[0].self_attn) is FastPhi3Attention
            assert model.model.layers[0].self_attn.grouped  # qkv_proj: a group of one
            assert type(model.model.layers[0].mlp).__name__ == "FastPhi3MLP"
        ids = token_batch(5, length=40)
        loss = model(ids, labels=ids)
        loss.backward()
        # 2 layers, each run twice by the checkpoint; kept, the rerun attends no more
        assert len(attended) == (2 if speed else 4)
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    ref_loss, ref_grads = step(False)
    loss, grads = step(True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert rel_err(ref_grads[name], grad) <= 1e-4, name


def test_qlora_train_then_merge_on_a_tiny_phi3(phi3_models, tmp_path, capsys):
    """`qlora train` end to end (NF4, checkpointing), then `qlora merge`: the merged model's
    logits are the base's with the trained adapter."""
    import json

    from qlora.adapters import load_adapter
    from qlora.cli import main

    path = phi3_models["phi3-longrope"]
    rows = [{"instruction": "Repeat the word.", "input": w, "output": w}
            for w in ("alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta")]
    data = tmp_path / "alpaca.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    rc = main(["train", "--model", str(path), "--data", str(data), "--output_dir", str(out),
               "--max_steps", "3", "--micro_batch_size", "2", "--gradient_accumulation_steps",
               "1", "--lora_r", "8", "--learning_rate", "1e-2", "--val_set_size", "0",
               "--device", "cpu", "--max_seq_length", "256"])
    assert rc == 0, capsys.readouterr().err
    saved = json.loads((out / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]

    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(path), "--adapter", str(out), "--out", str(merged),
                 "--dtype", "fp32"]) == 0, capsys.readouterr().err
    adapted = fp32_model(path)
    load_adapter(adapted, out)
    adapted.eval()  # the attached LoRA layers come in training mode (their dropout)
    ids = token_batch(6, length=40)
    with torch.no_grad():
        want, base, got = adapted(ids), fp32_model(path)(ids), fp32_model(merged)(ids)
    assert (want - base).abs().max() > 1e-3  # the adapter learned something
    assert rel_err(want, got) <= 1e-5


def test_gguf_export_writes_phi3_s_fused_tensors(phi3_models, tmp_path):
    gguf = pytest.importorskip("gguf")
    from safetensors.torch import load_file

    from qlora.export.gguf import export_gguf

    path = phi3_models["phi3-partial"]
    r = gguf.GGUFReader(str(export_gguf(path, tmp_path / "m.gguf", "f16")))
    assert r.fields["general.architecture"].contents() == "phi3"
    assert r.fields["phi3.rope.dimension_count"].contents() == HEAD_DIM // 2
    tensors = {t.name: t for t in r.tensors}
    source = load_file(str(path / "model.safetensors"))
    # llama.cpp's phi3: attn_qkv holds q, k, v stacked; ffn_up holds gate then up (its SwiGLU
    # takes the first half as the gate), as transformers' fused weights are
    for ours, theirs in (("blk.1.attn_qkv.weight", "model.layers.1.self_attn.qkv_proj.weight"),
                         ("blk.1.ffn_up.weight", "model.layers.1.mlp.gate_up_proj.weight"),
                         ("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj.weight")):
        got = torch.from_numpy(tensors[ours].data.copy()).reshape(source[theirs].shape)
        assert torch.equal(got, source[theirs].half()), ours


@pytest.mark.parametrize("variant", ["phi3-longrope", "phi3-su"])
def test_gguf_export_writes_longrope_as_llama_cpp_reads_it(phi3_models, tmp_path, variant):
    """llama.cpp's phi3 (convert_hf_to_gguf.py's layout): the short and long factors as F32
    tensors rope_factors_short / rope_factors_long, one divisor per rotated frequency; the
    attention factor and the original context (past which llama.cpp takes the long factors) as
    keys. The factors read back are the ones our model (and transformers) rotates with: the GGUF's
    1 / (factor · theta^(2i / rotary_dim)) equal Phi3Rotary's frequencies."""
    import math

    import numpy as np

    gguf = pytest.importorskip("gguf")
    from qlora.export.gguf import export_gguf
    from qlora.models.families.phi3_blocks import Phi3Rotary
    from qlora.models.spec import read_spec

    path = phi3_models[variant]
    r = gguf.GGUFReader(str(export_gguf(path, tmp_path / "m.gguf", "q8_0")))
    field = lambda key: r.fields[key].contents()  # noqa: E731
    rotary = HEAD_DIM // 2 if variant == "phi3-longrope" else HEAD_DIM
    assert field("phi3.rope.dimension_count") == rotary
    assert field("phi3.rope.freq_base") == 10000.0
    assert field("phi3.context_length") == 512  # the tiny sizes' max_position_embeddings
    assert field("phi3.rope.scaling.original_context_length") == ORIGINAL
    # 512 / 32 = 16 times the original context: sqrt(1 + ln 16 / ln 32), as transformers scales
    # cos and sin (read from its rotary embedding); stored as f32, hence rel 1e-6
    hf_scale = hf_model(path).model.rotary_emb.attention_scaling
    assert hf_scale == pytest.approx(math.sqrt(1 + math.log(16) / math.log(32)), rel=1e-12)
    assert field("phi3.rope.scaling.attn_factor") == pytest.approx(hf_scale, rel=1e-6)
    tensors = {t.name: t for t in r.tensors}
    ours = Phi3Rotary(read_spec(path))
    base = 10000.0 ** (np.arange(0, rotary, 2) / rotary)
    for kind, frequencies in (("short", ours.inv_freq), ("long", ours.long_inv_freq)):
        t = tensors[f"rope_factors_{kind}.weight"]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and t.data.shape == (rotary // 2,)
        assert t.data.tolist() == longrope(rotary)[f"{kind}_factor"]  # exact: small binary fractions
        # float32 frequencies against float64 arithmetic: rel 1e-6
        np.testing.assert_allclose(1.0 / (t.data * base), frequencies.double().numpy(), rtol=1e-6)


def test_gguf_export_of_plain_rope_phi3_writes_no_factors(phi3_models, tmp_path):
    """Phi-3 without LongRoPE: the original context still written (llama.cpp's converter does so
    for every phi3), no factor tensors and no attention factor."""
    gguf = pytest.importorskip("gguf")
    from qlora.export.gguf import export_gguf

    r = gguf.GGUFReader(str(export_gguf(phi3_models["phi3"], tmp_path / "m.gguf", "f16")))
    assert not [t.name for t in r.tensors if t.name.startswith("rope_factors")]
    assert "phi3.rope.scaling.attn_factor" not in r.fields
    assert r.fields["phi3.rope.scaling.original_context_length"].contents() == 4096  # Phi3Config's default

FUSED_ROPE_CHECK = r"""
import json, torch
from qlora.kernels import fused
from qlora.models.load import random_model
from qlora.models.spec import spec_from_config
from qlora.adapters import AdapterConfig, attach_adapters
from qlora.quant import QuantConfig
from qlora.speed import SpeedPlan, apply_speed

calls = {"rope": 0, "swiglu_packed": 0}
for name in calls:
    def counted(*args, _name=name, _fn=getattr(fused, name)):
        calls[_name] += 1
        return _fn(*args)
    setattr(fused, name, counted)

out = {}
for name, extra in (("full", {}), ("partial", {"partial_rotary_factor": 0.5})):
    torch.manual_seed(0)
    cfg = dict(model_type="phi3", hidden_size=64, intermediate_size=96, num_hidden_layers=1,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
               max_position_embeddings=128, **extra)
    model = random_model(spec_from_config(cfg), QuantConfig(method="none",
                                                            compute_dtype=torch.float32), seed=1)
    attach_adapters(model, AdapterConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.train()
    model.gradient_checkpointing = True
    ids = torch.randint(0, 97, (1, 16))  # small: the interpreter runs every program in Python
    runs = []
    for on in (False, True):
        apply_speed(model, SpeedPlan(fused_kernels=on, keep_attention=True, seeded_dropout=True))
        model.zero_grad()
        before = dict(calls)
        loss = model(ids, labels=ids)
        loss.backward()
        runs.append(dict(loss=float(loss), rope=calls["rope"] - before["rope"],
                         swiglu=calls["swiglu_packed"] - before["swiglu_packed"],
                         grads=[p.grad.clone() for p in model.parameters() if p.requires_grad]))
    off, on = runs
    out[name] = dict(loss_off=off["loss"], loss_on=on["loss"], rope_off=off["rope"],
                     rope_on=on["rope"], swiglu_off=off["swiglu"], swiglu_on=on["swiglu"],
                     grad_rel=max(float((a - b).abs().max() / b.abs().max())
                                  for a, b in zip(on["grads"], off["grads"])))
print(json.dumps(out))
"""


def test_fused_rope_runs_where_the_rotary_is_full():
    """Under Triton's interpreter: Phi-3's RoPE goes through the Triton kernel where it rotates
    whole heads (Phi-3, Phi-4) and stays torch for a partial rotary, its SwiGLU through the packed
    kernel over gate_up_proj's output in both; either way the step (loss and adapter gradients,
    attention kept for the rerun) is the one with the kernels off. fp32: the kernels round each
    product to x's dtype as the reference does, so only the fused RMSNorm's summation order
    differs, ~1e-7; 1e-5 of the largest entry leaves room for it."""
    from test_dequant_kernel import interpreted

    out = interpreted(FUSED_ROPE_CHECK)
    # q and k, forward only: the kept attention's rerun rotates nothing
    assert out["full"]["rope_on"] == 2 and out["full"]["rope_off"] == 0, out
    assert out["partial"]["rope_on"] == 0, out
    # the MLP run twice (the checkpoint's rerun), in both rotaries
    assert all(r["swiglu_on"] == 2 and r["swiglu_off"] == 0 for r in out.values()), out
    for r in out.values():
        assert abs(r["loss_on"] - r["loss_off"]) <= 1e-5 * abs(r["loss_off"]), r
        assert r["grad_rel"] <= 1e-5, r
