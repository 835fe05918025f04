"""The fused RMSNorm (alone and after the residual add), SwiGLU and RoPE kernels (qlora.kernels.fused) against decoder.py's torch
code, run by Triton's interpreter on the CPU: forward outputs and backward gradients on random
inputs, fp32 and bf16, and a tiny model's loss and adapter gradients with fused_kernels on and off.

TRITON_INTERPRET=1 must be set before triton is imported, so each check runs in a subprocess that
prints one JSON line. fp32 must agree to float rounding; bf16 within a few roundings (the
interpreter rounds to bf16 by truncation, torch to nearest).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

FP32_BOUND = 1e-5  # max |fused - reference| / max |reference|
BF16_BOUND = 2**-5  # a few bf16 roundings (2^-8 relative each), truncated vs to nearest


def interpreted(code: str) -> dict:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=3600)  # stops a hung run only, never a slow one
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# Shared by the kernel checks: run fused and reference on the same inputs and upstream gradient,
# record max |a - b| / max |b| for the output and each input gradient.
PRELUDE = r"""
import json, torch
import torch.nn.functional as F
from qlora.kernels import fused
from qlora.models import decoder

def rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max())

def compare(fn, ref, inputs, grad):
    got, want = fn(*inputs), ref(*inputs)
    wanted = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    g_got = torch.autograd.grad(got, wanted, grad)
    g_want = torch.autograd.grad(want, wanted, grad)
    return dict(out=rel(got, want), grads=[rel(a, b) for a, b in zip(g_got, g_want)],
                dtype=str(got.dtype), ref_dtype=str(want.dtype), strides=[got.stride(), want.stride()])

results = []
"""

RMSNORM_CHECK = PRELUDE + r"""
for dtype in (torch.float32, torch.bfloat16):
    for shape in [(3, 5, 48), (4, 100), (2, 64)]:  # 48 and 100: rows not a power of two
        torch.manual_seed(len(results))
        n = shape[-1]
        x = (torch.randn(shape) * 3).to(dtype).requires_grad_()
        norm = decoder.RMSNorm(n, 1e-5).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(torch.rand(n) + 0.5)
        # an upstream gradient along the output too, so the rstd term of dx matters
        grad = (torch.randn(shape) + norm(x).detach().float()).to(dtype)
        for trainable in (True, False):
            norm.weight.requires_grad_(trainable)
            r = compare(lambda a, w: fused.rms_norm(a, w, 1e-5), lambda a, w: norm(a),
                        [x, norm.weight], grad)
            results.append(dict(r, dtype_in=str(dtype), shape=shape, trainable=trainable))
# frozen weight: no weight gradient is made (and asking autograd for one is an error)
x = torch.randn(4, 100, requires_grad=True)
w = torch.ones(100)
fused.rms_norm(x, w, 1e-5).sum().backward()
extra = dict(frozen_weight_grad_is_none=w.grad is None)
# weight in fp32, input in bf16: the output is promoted to fp32, as torch's product is
wf = torch.rand(100) + 0.5
xb = torch.randn(4, 100).to(torch.bfloat16)
ref = decoder.RMSNorm(100, 1e-5)
with torch.no_grad():
    ref.weight.copy_(wf)
    extra["mixed"] = dict(dtype=str(fused.rms_norm(xb, wf, 1e-5).dtype), ref_dtype=str(ref(xb).dtype),
                          rel=rel(fused.rms_norm(xb, wf, 1e-5), ref(xb)))
print(json.dumps(dict(results=results, **extra)))
"""

SWIGLU_CHECK = PRELUDE + r"""
for dtype in (torch.float32, torch.bfloat16):
    for shape in [(3, 37, 100), (2, 1024), (5,)]:  # 11100: blocks of 1024 and a partial tail
        torch.manual_seed(len(results))
        gate = (torch.randn(shape) * 4).to(dtype).requires_grad_()
        up = torch.randn(shape).to(dtype).requires_grad_()
        grad = torch.randn(shape).to(dtype)
        r = compare(fused.swiglu, lambda g, u: F.silu(g) * u, [gate, up], grad)
        results.append(dict(r, dtype_in=str(dtype), shape=shape))
print(json.dumps(dict(results=results)))
"""

SWIGLU_PACKED_CHECK = PRELUDE + r"""
from qlora.errors import QloraError
extra = dict(same_as_swiglu=[], grad_layout=[], saved=[])
for dtype in (torch.float32, torch.bfloat16):
    # I = 100: rows straddle the 1024-element blocks; I = 1024: one row a block; I = 3: tiny rows
    for shape in [(3, 37, 200), (2, 2048), (5, 6)]:
        torch.manual_seed(len(results))
        gu = (torch.randn(shape) * 4).to(dtype).requires_grad_()
        I = shape[-1] // 2
        grad = torch.randn(shape[:-1] + (I,)).to(dtype)
        # the reference is decoder.MLP's torch code on the halves
        assert torch.equal(fused.swiglu_packed_reference(gu), F.silu(gu[..., :I]) * gu[..., I:])
        r = compare(fused.swiglu_packed, fused.swiglu_packed_reference, [gu], grad)
        results.append(dict(r, dtype_in=str(dtype), shape=shape))
        # the same kernel numerics as swiglu on the two (copied) halves: bit for bit
        got = fused.swiglu_packed(gu)
        (dgu,) = torch.autograd.grad(got, gu, grad)
        gate, up = (h.detach().clone().requires_grad_() for h in gu.chunk(2, dim=-1))
        split = fused.swiglu(gate, up)
        dgate, dup = torch.autograd.grad(split, (gate, up), grad)
        extra["same_as_swiglu"].append(bool(torch.equal(got, split)
                                            and torch.equal(dgu, torch.cat([dgate, dup], -1))))
        extra["grad_layout"].append(dgu.is_contiguous() and dgu.shape == gu.shape)
        # autograd keeps gu itself for backward, and nothing else
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            fused.swiglu_packed(gu)
        extra["saved"].append([(t.data_ptr() == gu.data_ptr(), tuple(t.shape) == shape)
                               for t in kept])
try:
    fused.swiglu_packed(torch.randn(4, 7))
    extra["odd"] = "no error"
except QloraError as e:
    extra["odd"] = str(e)
empty = torch.zeros(0, 8)
extra["empty_shape"] = list(fused.swiglu_packed(empty).shape)
print(json.dumps(dict(results=results, **extra)))
"""

ROPE_CHECK = PRELUDE + r"""
from qlora.models.spec import spec_from_config
for dtype in (torch.float32, torch.bfloat16):
    # (B, T, heads, head_dim, cos batch): 3 heads and a half of 6 are not powers of two
    for B, T, H, D, cos_b in [(2, 5, 3, 12, 2), (1, 9, 4, 16, 1), (3, 4, 2, 8, 1)]:
        torch.manual_seed(len(results))
        spec = spec_from_config(dict(model_type="llama", hidden_size=H * D, intermediate_size=8,
                                     num_hidden_layers=1, num_attention_heads=H, vocab_size=8,
                                     rope_theta=10000.0))
        pos = torch.randint(0, 500, (cos_b, T))
        cos, sin = decoder.Rotary(spec)(pos, dtype)
        # as Attention has it: the [B, heads, T, hd] transposed view of a [B, T, heads, hd] tensor
        x = torch.randn(B, T, H, D).to(dtype).requires_grad_()
        grad = torch.randn(B, H, T, D).to(dtype)
        r = compare(lambda a: fused.rope(a.transpose(1, 2), cos, sin),
                    lambda a: decoder.apply_rope(a.transpose(1, 2), cos, sin), [x], grad)
        results.append(dict(r, dtype_in=str(dtype), shape=(B, T, H, D)))
print(json.dumps(dict(results=results)))
"""


def check_results(results: list[dict]) -> None:
    assert results
    for r in results:
        bound = FP32_BOUND if r["dtype_in"] == "torch.float32" else BF16_BOUND
        assert r["out"] <= bound, r
        assert r["grads"] and max(r["grads"]) <= bound, r
        assert r["dtype"] == r["ref_dtype"], r


def test_fused_rmsnorm_equals_decoder_rmsnorm_forward_and_backward():
    result = interpreted(RMSNORM_CHECK)
    check_results(result["results"])
    assert {len(r["grads"]) for r in result["results"] if r["trainable"]} == {2}  # dx and dweight
    assert result["frozen_weight_grad_is_none"]
    mixed = result["mixed"]
    assert mixed["dtype"] == mixed["ref_dtype"] == "torch.float32" and mixed["rel"] <= BF16_BOUND


GEMMA_RMSNORM_CHECK = PRELUDE + r"""
from qlora.models.families.gemma import GemmaRMSNorm
for dtype in (torch.float32, torch.bfloat16):
    for shape in [(3, 5, 48), (4, 100), (2, 3, 4, 32)]:  # the last: Gemma 3's per-head q/k norm
        torch.manual_seed(len(results))
        n = shape[-1]
        x = (torch.randn(shape) * 3).to(dtype).requires_grad_()
        norm = GemmaRMSNorm(n, 1e-6)  # its weight stays fp32, as the loaded model's may not
        with torch.no_grad():
            norm.weight.copy_(torch.randn(n) * 0.5)  # the offset from 1, of either sign
        grad = (torch.randn(shape) + norm(x).detach().float()).to(dtype)
        for trainable in (True, False):
            norm.weight.requires_grad_(trainable)
            r = compare(lambda a, w: fused.gemma_rms_norm(a, w, 1e-6), lambda a, w: norm(a),
                        [x, norm.weight], grad)
            results.append(dict(r, dtype_in=str(dtype), shape=shape, trainable=trainable))
print(json.dumps(dict(results=results)))
"""


def test_fused_gemma_rmsnorm_equals_gemma_rmsnorm_forward_and_backward():
    """Gemma's (1 + w) norm, fp32 inside and rounded once at the end, in x's dtype: the same
    bounds as Llama's norm (the kernel's rounding points are the reference's)."""
    result = interpreted(GEMMA_RMSNORM_CHECK)
    check_results(result["results"])
    assert {len(r["grads"]) for r in result["results"] if r["trainable"]} == {2}


ADD_RMSNORM_CHECK = PRELUDE + r"""
from qlora.errors import QloraError
EPS = 1e-5
extra = dict(reference_is_decoder=[], saved=[], shared_grad=[], unused_grads=[])
for dtype in (torch.float32, torch.bfloat16):
    for shape in [(3, 5, 48), (4, 100), (2, 64)]:  # 48 and 100: rows not a power of two
        torch.manual_seed(len(results))
        n = shape[-1]
        x = (torch.randn(shape) * 3).to(dtype).requires_grad_()
        res = (torch.randn(shape) * 2).to(dtype).requires_grad_()
        weight = (torch.rand(n) + 0.5).to(dtype)
        # the reference is decoder.RMSNorm on torch's sum, bit for bit
        norm = decoder.RMSNorm(n, EPS).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(weight)
            total, normed = fused.add_rms_norm_reference(x, res, weight, EPS)
            extra["reference_is_decoder"].append(
                bool(torch.equal(total, x + res) and torch.equal(normed, norm(x + res))))
        # upstream gradients along the outputs too, so the rstd term of dx matters
        g_total = torch.randn(shape).to(dtype)
        g_normed = (torch.randn(shape) + normed.float()).to(dtype)
        for trainable in (True, False):
            weight.requires_grad_(trainable)
            inputs = [x, res, weight] if trainable else [x, res]
            got = fused.add_rms_norm(x, res, weight, EPS)
            want = fused.add_rms_norm_reference(x, res, weight, EPS)
            # both outputs used; normed alone (total's gradient None); total alone (normed's None)
            for used, pick in (("both", (0, 1)), ("normed", (1,)), ("total", (0,))):
                grads = [(g_total, g_normed)[i] for i in pick]
                g_got = torch.autograd.grad([got[i] for i in pick], inputs, grads,
                                            retain_graph=True, allow_unused=True)
                g_want = torch.autograd.grad([want[i] for i in pick], inputs, grads,
                                             retain_graph=True, allow_unused=True)
                if used == "total":  # the weight gets no gradient from total, in both
                    extra["unused_grads"].append([[g is None for g in g_got[2:]],
                                                  [g is None for g in g_want[2:]]])
                    g_got, g_want = g_got[:2], g_want[:2]
                extra["shared_grad"].append(bool(torch.equal(g_got[0], g_got[1])))
                results.append(dict(out=max(rel(got[0], want[0]), rel(got[1], want[1])),
                                    grads=[rel(a, b) for a, b in zip(g_got, g_want)],
                                    dtype=str(got[1].dtype), ref_dtype=str(want[1].dtype),
                                    total_dtype=[str(got[0].dtype), str(want[0].dtype)],
                                    dtype_in=str(dtype), shape=shape, trainable=trainable,
                                    used=used))
        # autograd keeps total (the output's storage), the weight and one fp32 rstd per row
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            total, _ = fused.add_rms_norm(x, res, weight, EPS)
        rows = total.numel() // n
        extra["saved"].append(sorted([
            "total" if t.data_ptr() == total.data_ptr() and t.shape == total.shape
            else "weight" if t.data_ptr() == weight.data_ptr()
            else "rstd" if t.dtype == torch.float32 and tuple(t.shape) == (rows,)
            else f"other {tuple(t.shape)}" for t in kept]))
# weight in fp32, input in bf16: normed is promoted to fp32, as torch's product is; total is not
wf = torch.rand(100) + 0.5
xb, rb = torch.randn(4, 100).to(torch.bfloat16), torch.randn(4, 100).to(torch.bfloat16)
got, want = fused.add_rms_norm(xb, rb, wf, EPS), fused.add_rms_norm_reference(xb, rb, wf, EPS)
extra["mixed"] = dict(dtypes=[str(t.dtype) for t in got], ref_dtypes=[str(t.dtype) for t in want],
                      rel=max(rel(got[0], want[0]), rel(got[1], want[1])))
try:
    fused.add_rms_norm(torch.randn(4, 100), torch.randn(4, 100).to(torch.bfloat16), wf, EPS)
    extra["mismatch"] = "no error"
except QloraError as e:
    extra["mismatch"] = str(e)
print(json.dumps(dict(results=results, **extra)))
"""


def test_fused_add_rmsnorm_equals_the_residual_add_then_decoder_rmsnorm():
    """add_rms_norm's (total, normed) and the gradients of x, residual and the weight against the
    torch reference (itself decoder.RMSNorm on x + residual), with both outputs used or either
    alone; total, the weight and rstd the only tensors kept for backward."""
    out = interpreted(ADD_RMSNORM_CHECK)
    results = out["results"]
    check_results(results)
    assert len(results) == 2 * 3 * 2 * 3
    for r in results:
        assert r["total_dtype"] == [r["dtype_in"]] * 2, r
        assert len(r["grads"]) == (3 if r["trainable"] and r["used"] != "total" else 2), r
    assert out["reference_is_decoder"] == [True] * 6, out["reference_is_decoder"]
    assert all(out["shared_grad"]), out["shared_grad"]
    # total alone: the trainable weight's gradient is None, as the reference's (frozen: none asked)
    assert out["unused_grads"] == [[[True], [True]], [[], []]] * 6, out["unused_grads"]
    assert out["saved"] == [["rstd", "total", "weight"]] * 6, out["saved"]
    mixed = out["mixed"]
    assert mixed["dtypes"] == mixed["ref_dtypes"] == ["torch.bfloat16", "torch.float32"], mixed
    assert mixed["rel"] <= BF16_BOUND, mixed
    assert "add_rms_norm" in out["mismatch"] and "torch.bfloat16" in out["mismatch"], out["mismatch"]


def test_fused_swiglu_equals_silu_times_up_forward_and_backward():
    check_results(interpreted(SWIGLU_CHECK)["results"])


def test_fused_packed_swiglu_equals_the_reference_and_swiglu_on_the_halves():
    """swiglu_packed on one [.., 2·I] tensor: the torch reference's output and gradient (as
    swiglu's tolerances), swiglu's own bits, the gradient as one contiguous [.., 2·I] tensor, and
    only the packed input kept for backward."""
    out = interpreted(SWIGLU_PACKED_CHECK)
    check_results(out["results"])
    assert len(out["same_as_swiglu"]) == 6 and all(out["same_as_swiglu"]), out
    assert all(out["grad_layout"]), out
    assert out["saved"] == [[[True, True]]] * 6, out["saved"]
    assert "swiglu_packed" in out["odd"] and "(4, 7)" in out["odd"], out["odd"]
    assert out["empty_shape"] == [0, 4]


def test_fused_rope_equals_apply_rope_forward_and_backward():
    results = interpreted(ROPE_CHECK)["results"]
    check_results(results)
    for r in results:  # the output keeps the input's layout, as the reference's does
        assert r["strides"][0] == r["strides"][1], r


MODEL_CHECK = r"""
import json, torch
from qlora.adapters import AdapterConfig, attach_adapters
from qlora.kernels import fused
from qlora.models.load import random_model
from qlora.models.spec import spec_from_config
from qlora.quant import QuantConfig
from qlora.speed import SpeedPlan, apply_speed

calls = {"rms_norm": 0, "add_rms_norm": 0, "swiglu": 0, "rope": 0}
for name in calls:  # count the fused ops the decoder routes through, so "on" is known to be on
    def counted(*args, _name=name, _fn=getattr(fused, name)):
        calls[_name] += 1
        return _fn(*args)
    setattr(fused, name, counted)

def tiny(family, dtype):
    torch.manual_seed(0)
    cfg = dict(model_type=family, hidden_size=48, intermediate_size=100, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=97, rms_norm_eps=1e-5,
               rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=False)
    model = random_model(spec_from_config(cfg), QuantConfig(method="none", compute_dtype=dtype), seed=1)
    attach_adapters(model, AdapterConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # norms away from 1 and B away from 0: every path carries gradient
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape) + 0.5)
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model.train()

out = {}
for family, dtype in (("llama", torch.float32), ("qwen3", torch.float32), ("llama", torch.bfloat16)):
    model = tiny(family, dtype)
    ids = torch.randint(0, 97, (2, 24))
    runs = []
    for on in (False, True):
        apply_speed(model, SpeedPlan(fused_kernels=on))
        model.gradient_checkpointing = on  # the fused ops recomputed under checkpointing too
        model.zero_grad()
        before = dict(calls)
        loss = model(ids, labels=ids)
        loss.backward()
        grads = [p.grad.float().clone() for p in model.parameters() if p.requires_grad]
        runs.append(dict(loss=float(loss), grads=grads,
                         calls={k: calls[k] - before[k] for k in calls}))
    off, on = runs
    out[f"{family}-{dtype}"] = dict(
        loss_off=off["loss"], loss_on=on["loss"], calls_off=off["calls"], calls_on=on["calls"],
        n_grads=len(on["grads"]),
        grad_rel=max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(on["grads"], off["grads"])))
print(json.dumps(out))
"""


def test_tiny_model_trains_the_same_with_fused_kernels_on_and_off():
    out = interpreted(MODEL_CHECK)
    for name, r in out.items():
        assert sum(r["calls_off"].values()) == 0, r
        # per layer 1 norm (+2 q/k norms on qwen3), the residual add with the second norm,
        # 1 SwiGLU, 2 RoPE, each twice (the forward, then checkpointing's recompute in backward);
        # + the final norm once
        norms = 3 if name.startswith("qwen3") else 1
        assert r["calls_on"] == {"rms_norm": 2 * 2 * norms + 1, "add_rms_norm": 2 * 2,
                                 "swiglu": 2 * 2, "rope": 2 * 2 * 2}, r
        assert r["n_grads"] == 2 * 7 * 2, r
        fp32 = "float32" in name
        assert abs(r["loss_on"] - r["loss_off"]) <= (1e-5 if fp32 else 2e-2) * abs(r["loss_off"]), r
        assert r["grad_rel"] <= (1e-4 if fp32 else 0.1), r


def test_fused_kernels_is_on_by_default_and_falls_back_to_torch_where_triton_does_not_run(
        monkeypatch):
    """`qlora train` turns them on (measured faster on the H100, docs/BENCHMARKS.md); on the CPU
    without the interpreter the switch changes nothing: the reference code runs."""
    from qlora.config import RunConfig
    from qlora.models.load import random_model
    from qlora.models.spec import spec_from_config
    from qlora.quant import QuantConfig
    from qlora.speed import SpeedPlan, apply_speed

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert RunConfig().fused_kernels is True
    assert SpeedPlan.for_run(RunConfig(), torch.device("cpu")).fused_kernels is True
    assert SpeedPlan().fused_kernels is False
    spec = spec_from_config(dict(model_type="qwen3", hidden_size=32, intermediate_size=40,
                                 num_hidden_layers=1, num_attention_heads=2, vocab_size=50))
    model = random_model(spec, QuantConfig(method="none", compute_dtype=torch.float32), seed=2)
    assert not any(getattr(m, "fused", False) for m in model.modules())
    ids = torch.randint(0, 50, (1, 10))
    with torch.no_grad():
        off = model(ids)
        apply_speed(model, SpeedPlan(fused_kernels=True))
        fused = [m for m in model.modules() if hasattr(type(m), "fused")]
        assert fused and all(m.fused for m in fused)
        assert torch.equal(model(ids), off)


PLANNER_CHECK = r"""
import json, sys, torch
sys.path.insert(0, TESTS_DIR)
from saved_bytes import layer_saved_bytes
from qlora import memory
from qlora.adapters import AdapterConfig, attach_adapters
from qlora.memory import PlanConfig, arch_from_config
from qlora.models.load import random_model
from qlora.models.spec import spec_from_config
from qlora.quant import QuantConfig
from qlora.speed import SpeedPlan, apply_speed

out = []
# phi3: its fork's fused SwiGLU and v copied out of qkv_proj; gemma3_text: its (1 + w) norm
# kernel (Gemma 2's capped scores take flex_attention on CUDA only, not here)
for family, dropout in (("llama", 0.0), ("qwen2", 0.1), ("qwen3", 0.0), ("phi3", 0.0),
                        ("gemma3_text", 0.0)):
    config = dict(model_type=family, hidden_size=128, intermediate_size=352, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                  tie_word_embeddings=False, max_position_embeddings=256, rms_norm_eps=1e-6,
                  rope_theta=10000.0)
    r, tokens = 8, 64
    model = random_model(spec_from_config(config), QuantConfig(method="nf4", double_quant=True,
                                                                compute_dtype=torch.bfloat16))
    attach_adapters(model, AdapterConfig(r=r, alpha=16, dropout=dropout))
    model.train()
    # what qlora train runs on CUDA with fused kernels
    seed = apply_speed(model, SpeedPlan(fused_kernels=True, fast_base=True, grouped=True,
                                        seeded_dropout=True)).dropout_seed
    x = model.model.embed_tokens(torch.randint(0, 300, (1, tokens))).detach().requires_grad_(True)
    cos, sin = model.model.rotary_emb(torch.arange(tokens)[None], x.dtype)
    tables = [*cos.values(), *sin.values()] if isinstance(cos, dict) else [cos, sin]  # Gemma's
    # unlike the eager norm (which keeps an fp32 copy), the fused one keeps the layer's input x
    # itself: counted here (not left out), as the planner counts it (it is the norm's kept input)
    saved = layer_saved_bytes(model.model.layers[0], x, cos, sin,
                              [*model.parameters(), *model.buffers(), seed, *tables])
    cfg = PlanConfig(r=r, lora_dropout=dropout, seq_len=tokens, alloc_rounding=False,
                     seeded_dropout=True, kernels="fused")
    arch = arch_from_config(config)
    planned = (sum(memory.activations.layer_activation_terms(arch, cfg).values()) * tokens
               + sum(memory.weights.layer_weight_terms(arch, cfg).values()))
    out.append(dict(family=family, dropout=dropout, saved=saved, planned=planned))
print(json.dumps(out))
"""


def test_fused_layer_keeps_what_the_memory_planner_counts_for_fused_kernels():
    """One NF4 + LoRA bf16 layer with fused_kernels on and the fast path (fast_base, grouped:
    projections, LoRA dropout drawn inside the products), as qlora train runs it on CUDA: the
    storages autograd saves (as tests/test_memory.py counts them for the eager layer) equal
    PlanConfig(kernels="fused").
    Seeded dropout keeps no mask, so the CPU's dropout noise tensor does not enter the count."""
    for r in interpreted(PLANNER_CHECK.replace("TESTS_DIR", repr(str(Path(__file__).parent)))):
        assert r["saved"] == r["planned"], r


RERUN_CHECK = r"""
import json, sys, torch
sys.path.insert(0, TESTS_DIR)
from dataclasses import replace
from saved_bytes import layer_saved_bytes
from qlora import memory
from qlora.adapters import AdapterConfig, attach_adapters
from qlora.kernels import kept_weights, lora
from qlora.memory import PlanConfig, arch_from_config
from qlora.models.load import random_model
from qlora.models.spec import spec_from_config
from qlora.quant import QuantConfig, dequantize_weight
from qlora.speed import SpeedPlan, apply_speed
from qlora.speed.checkpointing import CheckpointedLayer

config = dict(model_type="llama", hidden_size=128, intermediate_size=352, num_hidden_layers=1,
              num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
              tie_word_embeddings=False, max_position_embeddings=256, rms_norm_eps=1e-6,
              rope_theta=10000.0)
r, tokens, tile = 8, 64, 16
out = []
for keep, targets in ((True, "all-linear"), (False, "all-linear"), (False, "q_proj,v_proj")):
    torch.manual_seed(0)
    model = random_model(spec_from_config(config), QuantConfig(method="nf4", double_quant=True,
                                                                compute_dtype=torch.bfloat16))
    attach_adapters(model, AdapterConfig(r=r, alpha=16, dropout=0.0, target_modules=targets))
    model.train()
    seed = apply_speed(model, SpeedPlan(fused_kernels=True, fast_base=True, grouped=True,
                                        seeded_dropout=True, tile_mlp=tile)).dropout_seed
    x = model.model.embed_tokens(torch.randint(0, 300, (1, tokens))).detach().requires_grad_(True)
    cos, sin = model.model.rotary_emb(torch.arange(tokens)[None], x.dtype)
    layer = CheckpointedLayer(model.model.layers[0], keep_attention=keep)
    with lora.products_for_rerun(None):
        lora.drop_kept_products()
    layer(x, cos, sin, "causal")  # the first run: keeps the LoRA products (and the attention)
    # alive before the rerun, whatever it does: the layer input, the kept products and attention
    shared = [x, *lora._h_kept.values()]
    if keep:
        shared += [*layer.kept.inputs, layer.kept.output]
    # the rerun, as the checkpoint runs it in backward: what it saves that is not alive already
    saved = layer_saved_bytes(layer, x, cos, sin,
                              [*model.parameters(), *model.buffers(), seed, cos, sin, *shared])
    kept_dense = sum(t.untyped_storage().nbytes() for t in kept_weights._kept.values())
    # which linears' weights those are: each attention linear's own, dequantized by bitsandbytes
    attention = model.model.layers[0].self_attn
    kept_linears = sorted(
        name for name in ("q_proj", "k_proj", "v_proj", "o_proj")
        if hasattr(getattr(attention, name, None), "base_layer")  # (not in a grouped q/k/v)
        and any(t.shape == w.shape and torch.equal(t, w) for t in kept_weights._kept.values()
                for w in [dequantize_weight(getattr(attention, name).base_layer).to(t.dtype)]))
    cfg = PlanConfig(r=r, lora_dropout=0.0, seq_len=tokens, alloc_rounding=False,
                     seeded_dropout=True, kernels="fused", tile_mlp=tile, keep_attention=keep,
                     targets=targets)
    arch = arch_from_config(config)
    terms = memory.activations.layer_activation_terms(arch, cfg)
    rerun = sum(memory.activations.rerun_terms(arch, cfg, terms, keep, tiled=True).values())
    attention = replace(cfg, targets=tuple(  # the rerun's adapter copies: attention's targets
        n for n in ("q_proj", "k_proj", "v_proj", "o_proj")
        if targets == "all-linear" or n in targets.split(",")))
    planned = ((rerun - memory.activations.split_mlp_terms(terms)[1]) * tokens
               + sum(memory.weights.layer_weight_terms(arch, attention).values()))
    out.append(dict(keep=keep, targets=targets, saved=saved, planned=planned, kept_dense=kept_dense,
                    kept_linears=kept_linears,
                    planned_dense=memory.weights.rerun_dense_weights(arch, cfg, keep, True)[0]))
print(json.dumps(out))
"""


def test_a_checkpointed_layers_rerun_makes_what_the_planner_counts_new():
    """The backward of a checkpointed layer on the fast path (fused kernels, 4-bit fast base,
    grouped projections, MLP in tiles), with and without its attention kept: what its rerun
    saves, leaving out what is alive before it (the layer input, which the fused norm's saved
    input is; the LoRA products kept from the first run; the kept attention), equals the
    planner's rerun terms to the byte (memory.activations.rerun_terms: no layer input, no products, and no
    q, k, v, output or log-sum-exp where attention is kept); and the dense weights the rerun
    keeps for its backward are o_proj's, with q, k, v's where attention is rerun, never the
    tiled MLP's (memory.weights.rerun_dense_weights). The tiled MLP's adapter copies are made per tile,
    so only attention's are in the rerun's count. With q and v alone targeted, only theirs are
    kept (the other linears run through bitsandbytes, which keeps none): 0.5× all-linear's here,
    where counting every linear planned all four; and the tiled MLP, no LoRA of it reading its
    input, still keeps that input for its tiles (the plan counted it only for gate/up's LoRA)."""
    results = interpreted(RERUN_CHECK.replace("TESTS_DIR", repr(str(Path(__file__).parent))))
    assert [(r["keep"], r["targets"]) for r in results] == [
        (True, "all-linear"), (False, "all-linear"), (False, "q_proj,v_proj")]
    for r in results:
        assert r["saved"] == r["planned"], r
        assert r["kept_dense"] == r["planned_dense"] > 0, r
    assert 2 * results[2]["kept_dense"] == results[1]["kept_dense"]  # q + v against q, k, v, o
    assert results[2]["kept_linears"] == ["q_proj", "v_proj"]  # theirs, by value
    assert results[1]["kept_linears"] == ["o_proj"]  # q, k, v kept as one grouped weight
