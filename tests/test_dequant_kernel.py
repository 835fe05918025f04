"""The Triton dequantize kernel (kernels/dequant.py) against the torch reference and bitsandbytes,
run by Triton's interpreter on the CPU; the 4-bit matmul's addend (kernels/matmul_4bit.py); and a tiny model's loss and
adapter gradients through the fast path (LoRA product added inside the base GEMM) vs the default.

TRITON_INTERPRET=1 must be set before triton is imported, so the kernel checks run in a subprocess
that prints one JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qlora.adapters import set_dropout_seed
from qlora.kernels.dequant import dequantize_4bit, packed_from_bnb
from qlora.kernels.matmul_4bit import matmul_4bit
from qlora.speed import SpeedPlan, apply_speed

from test_step_parts import tiny_model  # noqa: E402  (tests/ is on the path, as saved_bytes)


def interpreted(code: str) -> dict:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = str(Path(__file__).parent) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=3600)  # stops a hung run only, never a slow one
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


KERNEL_CHECK = r"""
import json, torch, bitsandbytes as bnb
from qlora.kernels.dequant import (Packed4bit, dequantize, dequantize_4bit, dequantize_4bit_triton,
                                   packed_from_bnb)
from qlora.kernels.dropout import use_triton

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
results = {}

def versus_reference(name, p):
    for dtype in DTYPES:
        got, want = dequantize_4bit_triton(p, dtype), dequantize_4bit(p, dtype)
        results[f"{name}-{dtype}"] = got.dtype == want.dtype and torch.equal(got, want)

g = torch.Generator().manual_seed(0)

def quantized(shape, blocksize, quant_type, nested, dtype=torch.float32):
    weight = torch.randn(*shape, generator=g).to(dtype)
    return bnb.nn.Params4bit(weight, requires_grad=False, blocksize=blocksize,
                             compress_statistics=nested, quant_type=quant_type).to("cpu")

VARIANTS = [(q, nested) for q in ("nf4", "fp4") for nested in (False, True)]
# Against bitsandbytes, (shape, blocksize): rows of whole blocks, as in real models; odd counts
# (33·17, 5·999), whose last block is partial. Not blocks that straddle rows of an even width:
# there bitsandbytes' native CPU kernel is wrong (e.g. 64 x 96 in blocks of 64: errors of 2.0 on
# N(0, 1) weights, where its generic path, our reference and CUDA agree).
for shape, blocksize in [((64, 128), 64), ((33, 17), 64), ((24, 256), 128), ((3, 4096), 4096),
                         ((5, 999), 4096)]:
    for quant_type, nested in VARIANTS:
        for dtype in DTYPES:  # bitsandbytes dequantizes to the dtype it quantized from
            param = quantized(shape, blocksize, quant_type, nested, dtype)
            want = bnb.functional.dequantize_4bit(param.data, param.quant_state)
            got = dequantize(packed_from_bnb(param))  # the dispatcher, under the interpreter
            results[f"bnb-{shape}-{blocksize}-{quant_type}-{nested}-{dtype}"] = (
                got.dtype == want.dtype and torch.equal(got, want))
# Against the reference: the above, and blocks that straddle rows, partial last blocks of 128
# and 4096
for shape, blocksize in [((64, 128), 64), ((33, 17), 64), ((24, 256), 128), ((3, 4096), 4096),
                         ((5, 999), 4096), ((64, 96), 64), ((24, 200), 128), ((40, 300), 4096)]:
    for quant_type, nested in VARIANTS:
        versus_reference(f"{shape}-{blocksize}-{quant_type}-{nested}",
                         packed_from_bnb(quantized(shape, blocksize, quant_type, nested)))

# every byte value, random scales, a nested group size other than bnb's 256 and an offset
n = 64 * 37 + 10
data = torch.randint(0, 256, ((n + 1) // 2,), generator=g, dtype=torch.uint8)
blocks = -(-n // 64)
synthetic = Packed4bit(
    data=data, absmax=torch.randint(0, 256, (blocks,), generator=g, dtype=torch.uint8),
    code=torch.randn(16, generator=g), blocksize=64, shape=(1, n), dtype=torch.bfloat16,
    nested_absmax=torch.rand(-(-blocks // 8), generator=g) + 0.5,
    nested_code=torch.randn(256, generator=g).sort().values, nested_blocksize=8, offset=0.3)
versus_reference("synthetic-nested", synthetic)
plain = Packed4bit(data=data, absmax=torch.rand(blocks, generator=g) * 3, code=synthetic.code,
                   blocksize=64, shape=(1, n), dtype=torch.float32)
versus_reference("synthetic-plain", plain)
print(json.dumps(dict(results=results, kernel_runs=use_triton(data))))
"""


def test_dequantize_kernel_equals_reference_and_bitsandbytes_bit_for_bit():
    out = interpreted(KERNEL_CHECK)
    assert out["kernel_runs"]  # the dispatcher took the kernel
    results = out["results"]
    assert len(results) == 5 * 4 * 3 + 8 * 4 * 3 + 2 * 3
    assert all(results.values()), [case for case, same in results.items() if not same]


def quantized_weight(out_features: int, in_features: int, seed: int):
    import bitsandbytes as bnb

    g = torch.Generator().manual_seed(seed)
    return bnb.nn.Params4bit(torch.randn(out_features, in_features, generator=g),
                             requires_grad=False, blocksize=64, compress_statistics=True,
                             quant_type="nf4").to("cpu")


def test_matmul_4bit_adds_the_addend_and_passes_its_gradient_through():
    """x @ Wᵀ + scale·(h @ Bᵀ) + bias with the LoRA product as the addend: the same output and
    gradients (x, B, and through B the addend's producer) as the plain torch expression."""
    param = quantized_weight(48, 64, seed=0)
    weight = dequantize_4bit(packed_from_bnb(param))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 64, generator=g, requires_grad=True)
    h = torch.randn(3, 5, 4, generator=g, requires_grad=True)
    B = torch.randn(48, 4, generator=g, requires_grad=True)
    bias = torch.randn(48, generator=g)
    dy = torch.randn(3, 5, 48, generator=g)

    want = x @ weight.t() + F.linear(h, B * 0.5) + bias
    want_grads = torch.autograd.grad(want, (x, h, B), dy)
    got = matmul_4bit(x, packed_from_bnb(param), bias, addend=F.linear(h, B * 0.5))
    got_grads = torch.autograd.grad(got, (x, h, B), dy)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # and without an addend or bias: the plain product
    torch.testing.assert_close(matmul_4bit(x, packed_from_bnb(param)), x @ weight.t(),
                               rtol=1e-5, atol=1e-5)


def default_and_fast_runs(dropout: float) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """(loss, adapter gradients) of one step on the default path, then with the 4-bit fast path
    (fast_base, grouped); LoRA dropout (when on) seeded, with the same seed in both runs."""
    model = tiny_model(dropout, quant="nf4")  # from test_step_parts: the same tiny llama
    model.train()
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(2))
    runs = []
    for fast in (False, True):
        applied = apply_speed(model, SpeedPlan(seeded_dropout=True, fast_base=fast, grouped=fast))
        assert applied.fast_layers == (14 if fast else 0)
        model.zero_grad()
        set_dropout_seed(applied.dropout_seed, run_seed=3, micro_batch_index=1,
                         stride=applied.dropout_stride)
        loss = model(ids, labels=ids)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        runs.append((loss.detach(), grads))
    return runs


def assert_same_runs(runs) -> None:
    """The existing fast-path test's tolerances (tests/test_kernels.py)."""
    (loss_default, grads_default), (loss_fast, grads_fast) = runs
    torch.testing.assert_close(loss_fast, loss_default, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_fast, grads_default):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fast_path_gives_the_default_loss_and_adapter_gradients(dropout):
    runs = default_and_fast_runs(dropout)
    assert_same_runs(runs)
    if dropout:  # the masks act: gradients differ from the dropout-free step's
        plain = default_and_fast_runs(0.0)
        assert not torch.allclose(plain[0][1][0], runs[0][1][0])


MODEL_CHECK = r"""
import json, torch
from qlora.kernels import dequant
from test_dequant_kernel import assert_same_runs, default_and_fast_runs

launches = []
build = dequant._dequantize_kernel
dequant._dequantize_kernel = lambda: launches.append(1) or build()
assert_same_runs(default_and_fast_runs(0.1))
print(json.dumps(dict(kernel_launches=len(launches))))
"""


def test_fast_path_through_the_kernel_gives_the_default_loss_and_adapter_gradients():
    """The same comparison with the dequantize (and seeded dropout) kernels run by Triton's
    interpreter. 14 layers dequantize in forward and 11 again in backward: layer 0's q, k and v
    read the (frozen) embeddings, whose gradient is not wanted."""
    assert interpreted(MODEL_CHECK)["kernel_launches"] == 14 + 11


def test_checkpoint_recompute_stops_before_the_last_base_gemm_of_each_layer():
    """With gradient checkpointing, backward reruns each layer's forward up to the last tensor
    it saved. The base GEMM of down_proj saves nothing (its 4-bit bytes are held on ctx), so the
    rerun stops before it: per layer, forward dequantizes 7 weights, the rerun 6 (not down_proj),
    and backward only down_proj, since it takes the 6 dense weights the rerun kept
    (kept_weights.rerun_keeps_weights) — and loss and adapter gradients equal the step without
    checkpointing. (One projection per GEMM here; grouped, the counts are per group.)"""
    import qlora.kernels.matmul_4bit as matmul_module  # (matmul_4bit here is its function)
    from qlora.kernels import kept_weights

    model = tiny_model(0.1, quant="nf4")
    applied = apply_speed(model, SpeedPlan(seeded_dropout=True, fast_base=True, grouped=False))
    seed, stride = applied.dropout_seed, applied.dropout_stride
    model.train()
    assert applied.fast_layers == 14
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(2))
    in_features = {m.base_layer.weight.quant_state.shape[1]: name for name, m in model.named_modules()
                   if hasattr(m, "base_layer") and name.endswith("down_proj")}
    runs, counts = [], []
    build = matmul_module.dequantize_group
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        model.zero_grad()
        set_dropout_seed(seed, run_seed=3, micro_batch_index=1, stride=stride)
        calls = []
        matmul_module.dequantize_group = lambda packs, dtype: calls.append(packs[0].shape) or build(packs, dtype)
        try:
            loss = model(ids, labels=ids)
            forward_calls = len(calls)
            loss.backward()
        finally:
            matmul_module.dequantize_group = build
        backward = calls[forward_calls:]
        down = sum(1 for shape in backward if shape[1] in in_features)
        counts.append((forward_calls, len(backward), down))
        runs.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    layers = 2
    # forward: 7 per layer; backward without checkpointing: 7 per layer minus layer 0's q, k, v
    # (their input, the frozen embedding, wants no gradient)
    assert counts[0] == (7 * layers, 7 * layers - 3, layers)
    # with checkpointing the rerun dequantizes 6 per layer and backward only down_proj
    assert counts[1] == (7 * layers, 6 * layers + layers, layers)
    assert_same_runs(runs)
    assert kept_weights._kept == {}  # every weight the reruns kept was taken by its backward
