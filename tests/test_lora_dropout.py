"""kernels/lora_dropout.py: the LoRA products with seeded dropout, Triton kernels (run by
Triton's interpreter on the CPU) against the torch composition of the dropout kernel's masks and
matmuls; and kernels/lora.py's LoraProducts through those kernels against the plain autograd
composition, forward and every gradient.

TRITON_INTERPRET=1 must be set before triton is imported: each check runs in a subprocess that
prints one JSON line (tests/test_dequant_kernel.py's `interpreted`).
"""

from __future__ import annotations

import pytest
import torch

from qlora.kernels.dropout import dropout_bits
from qlora.kernels.lora_dropout import fused_applies

from test_dequant_kernel import interpreted  # noqa: E402

KERNELS_CHECK = r"""
import json, torch
from qlora.kernels import lora_dropout as L
from qlora.kernels.dropout import seeded_dropout_values

def rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())

out = {}
seed = torch.tensor(2**40 + 12345, dtype=torch.int64)
# (rows, width, adapters, rank, dtype): a partial mask block (2500, 300), rows not a multiple of
# the kernels' 16, rank 8 padded to tl.dot's 16, one to three adapters, fp16 (the interpreter's
# tl.dot multiplies bf16's raw bits: bf16 is checked on the GPU, benchmarks/gpu_check.py)
CASES = [(37, 2500, 3, 16, torch.float32), (20, 300, 2, 8, torch.float32),
         (33, 2048, 1, 32, torch.float32), (18, 2100, 2, 16, torch.float16)]
for rows, width, n, r, dtype in CASES:
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, width, generator=g).to(dtype)
    adapters = [torch.randn(r, width, generator=g) * 0.1 for _ in range(n)]
    salts, scales, p = tuple(7 * i + 1 for i in range(n)), tuple(0.5 + i for i in range(n)), 0.25
    grad_h = torch.randn(rows, n * r, generator=g).to(dtype)
    name = f"{rows}x{width}-n{n}-r{r}-{str(dtype)[6:]}"
    assert L.fused_applies(x, n, r)
    out[name + "-down"] = rel(L.down_triton(x, adapters, seed, salts, scales, p),
                              L.down_reference(x, adapters, seed, salts, scales, p))
    grads, dx = L.backward_triton(x, grad_h, adapters, seed, salts, scales, p, want_dx=True)
    out[name + "-down_grad"] = max(rel(a, b) for a, b in zip(
        grads, L.down_grad_reference(x, grad_h, seed, salts, scales, p)))
    out[name + "-up_grad"] = rel(dx, L.up_grad_reference(grad_h, adapters, seed, salts, scales, p))
    alone, none = L.backward_triton(x, grad_h, adapters, seed, salts, scales, p, want_dx=False)
    out[name + "-grads-without-dx"] = max(rel(a, b) for a, b in zip(alone, grads)) + (
        0.0 if none is None else 1.0)
# the masks act: the kernel's H differs from the undropped product by more than rounding
x = torch.randn(16, 256)
a = [torch.randn(16, 256)]
out["masked"] = rel(L.down_triton(x, a, seed, (1,), (1.0,), 0.5), x @ a[0].t())
print(json.dumps(out))
"""


def test_lora_dropout_kernels_equal_the_torch_composition():
    """fp32 to float rounding; fp16 within the rounding of the composition's fp16 intermediates
    (s·A and x/(1−p) rounded before the product)."""
    result = interpreted(KERNELS_CHECK)
    masked = result.pop("masked")
    assert masked > 0.1
    assert len(result) == 16
    for name, err in result.items():
        assert err < (4e-3 if "float16" in name else 2e-6), (name, err)


PRODUCTS_CHECK = r"""
import json, torch
from qlora.kernels.lora import lora_4bit
from qlora.kernels.lora_dropout import fused_applies
from test_lora_products import group_of, plain

out = {}
for widths in ((48,), (48, 16, 16)):
    group, weights, As, Bs = group_of(widths, in_features=64, r=16, p=0.25)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 7, 64, generator=g, requires_grad=True)
    seed = torch.tensor(1234, dtype=torch.int64)
    dy = torch.randn(3, 7, sum(widths), generator=g)
    leaves = (x, *As, *Bs)
    assert fused_applies(x, len(widths), 16)
    want = plain(x, seed, group, weights, As, Bs)
    got = lora_4bit(x, seed, group, As + Bs)
    errs = [float((got - want).abs().max() / want.abs().max())]
    for a, b in zip(torch.autograd.grad(got, leaves, dy), torch.autograd.grad(want, leaves, dy)):
        errs.append(float((a - b).abs().max() / b.abs().max()))
    out[str(widths)] = errs
print(json.dumps(out))
"""


def test_lora_products_through_the_kernels_equal_the_plain_composition():
    """x's, every A's and every B's gradient, for a group of one and of three."""
    result = interpreted(PRODUCTS_CHECK)
    assert sorted(result) == ["(48, 16, 16)", "(48,)"]
    assert len(result["(48, 16, 16)"]) == 1 + 1 + 3 + 3
    for widths, errs in result.items():
        assert max(errs) < 1e-5, (widths, errs)


def test_the_mask_is_defined_by_rows_of_2048_value_blocks():
    """A row's blocks never straddle rows: a [3, 2500] tensor's mask is the first 2500 columns of a
    [3, 4096] one's, and a [3, 4096] tensor's is that of its 12288 values in one row."""
    wide = dropout_bits(99, (3, 4096))
    assert torch.equal(dropout_bits(99, (3, 2500)).view(3, 2500), wide.view(3, 4096)[:, :2500])
    assert torch.equal(wide, dropout_bits(99, 3 * 4096))
    assert torch.equal(dropout_bits(99, (2, 3, 4096)), dropout_bits(99, (6, 4096)))


def test_the_kernels_are_taken_only_where_triton_runs_and_the_shape_fits(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not fused_applies(torch.zeros(4, 8), 1, 16)  # the CPU without the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    assert fused_applies(torch.zeros(4, 8), 3, 64)
    assert not fused_applies(torch.zeros(4, 8), 4, 16)  # more adapters than the kernels take
    assert not fused_applies(torch.zeros(4, 8), 1, 128)  # a rank beyond the register budget
    assert not fused_applies(torch.zeros(4, 8, dtype=torch.float64), 1, 16)


def test_a_checkpointed_layer_reruns_without_drawing_its_masks_again(monkeypatch):
    """The first run of each checkpointed layer keeps its groups' H; the rerun takes it back: the
    masked products are computed once per group in forward and never in the rerun, and the step's
    loss and adapter gradients equal those without checkpointing."""
    from qlora.adapters import set_dropout_seed
    from qlora.kernels import lora, lora_dropout
    from qlora.speed import SpeedPlan, apply_speed

    from test_dequant_kernel import assert_same_runs  # noqa: E402
    from test_step_parts import tiny_model  # noqa: E402

    calls = []
    down = lora_dropout.down_products
    monkeypatch.setattr(lora_dropout, "down_products", lambda *a: calls.append(1) or down(*a))
    model = tiny_model(0.1, quant="nf4")
    applied = apply_speed(model, SpeedPlan(seeded_dropout=True, fast_base=True, grouped=True))
    seed, stride = applied.dropout_seed, applied.dropout_stride
    model.train()
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(2))
    runs, counts = [], []
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        model.zero_grad()
        set_dropout_seed(seed, run_seed=3, micro_batch_index=1, stride=stride)
        calls.clear()
        loss = model(ids, labels=ids)
        forward = len(calls)
        loss.backward()
        counts.append((forward, len(calls) - forward))
        runs.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    assert counts == [(8, 0), (8, 0)]  # 2 layers x (q/k/v, o, gate/up, down); none rerun
    assert lora._h_kept == {}  # every H kept was taken by its rerun
    assert_same_runs(runs)
