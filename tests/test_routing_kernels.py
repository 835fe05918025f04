"""The sparse block's row sums (qlora.kernels.routing) by Triton's interpreter against their torch
references: the router-weighted combine forward and backward, and the sum of each token's k row
gradients, on random routings, fp32 and bf16, rows narrower than a block and wider than one.

Every bound is the arithmetic of the two computations: both round the same products the same way
(the kernel rounds to nearest even as the GPU does, under the interpreter too), and differ only
in the order their fp32 sums add: each of the two sums of k terms is within (k − 1)·2^-24·Σ|term|
of the exact one, so they are within 2k·2^-24·Σ|term| of each other (Σ|term| taken from the
rounded products, a bf16 rounding under the true one); bf16 outputs then round that sum once,
which moves it by one bf16 unit at most, 2^-7·|value|.
"""

from __future__ import annotations

import pytest

from test_dequant_kernel import interpreted

CHECK = r"""
import json, torch
from qlora.kernels import routing

def routed(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    flat = torch.randint(0, 5, (n * k,), generator=g)  # 5 experts
    order = torch.argsort(flat, stable=True)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel()))
    return order, inverse, g

def excess(got, want, slack):
    # how far past its bound each element is: > 0 anywhere is a failure
    return float(((got.double() - want.double()).abs() - slack).max())

results = []
for dtype, wdtype in [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                      (torch.bfloat16, torch.bfloat16)]:
    for n, k, h in [(7, 2, 48), (5, 8, 1100)]:  # 1100: two column blocks, the last partial
        order, inverse, g = routed(n, k, len(results))
        y = (torch.randn(n * k, h, generator=g) * 3).to(dtype).requires_grad_()
        w = torch.rand(n, k, generator=g).to(wdtype).requires_grad_()
        grad = torch.randn(n, h, generator=g).to(dtype)
        got = routing.combine(y, w, order, inverse, fused=True)
        want = routing.combine_reference(y, w, order, inverse)
        dy, dw = torch.autograd.grad(got, [y, w], grad)
        dy_want, dw_want = torch.autograd.grad(want, [y, w], grad)
        # Σ|term| of each output: the same weighted rows, their magnitudes summed
        terms = routing.combine_reference(y.detach().abs(), w.detach().abs(), order,
                                          inverse).double()
        sum_slack = 2 * k * 2.0**-24 * terms
        unit = 2.0**-7 * want.detach().double().abs() if dtype == torch.bfloat16 else 0.0
        # the router weight's gradient, Σ_h g·y: each term rounded to bf16 by the reference
        # where the weights are bf16 (2^-9 a term), the sum once (2^-9), h-term fp32 sums
        gy = (grad.double()[:, None, :].abs()
              * y.detach().double().abs()[inverse].view(n, k, h)).sum(-1)
        w_slack = (2.0**-7 if wdtype == torch.bfloat16 else h * 2.0**-23) * gy
        rows = routing.sum_rows(y.detach(), inverse, k)
        rows_want = routing.sum_rows_reference(y.detach(), inverse, k)
        plain_terms = 2 * routing.sum_rows_reference(y.detach().abs(), inverse, k).double()
        rows_unit = 2.0**-7 * rows_want.double().abs() if dtype == torch.bfloat16 else 0.0
        kept = (torch.arange(n * k) != inverse[0]).to(dtype)
        # router weights that take no gradient: y is not kept, the rows' gradient is the same
        (dy_frozen,) = torch.autograd.grad(routing.combine(y, w.detach(), order, inverse,
                                                           fused=True), [y], grad)
        results.append(dict(
            case=[str(dtype), str(wdtype), n, k, h],
            dtypes=[str(got.dtype), str(dy.dtype), str(dw.dtype), str(rows.dtype)],
            out=excess(got.detach(), want.detach(), sum_slack + unit),
            dy_equal=torch.equal(dy, dy_want) and torch.equal(dy_frozen, dy_want),
            dw=excess(dw, dw_want, w_slack),
            rows=excess(rows, rows_want, k * 2.0**-24 * plain_terms + rows_unit),
            # the bound is not loose enough to pass a wrong row: token 0's first row zeroed fails it
            dropped=excess(routing.sum_rows(y.detach() * kept[:, None], inverse, k), rows_want,
                           k * 2.0**-24 * plain_terms + rows_unit)))
print(json.dumps(results))
"""


def test_routing_kernels_equal_their_torch_references():
    pytest.importorskip("triton")
    results = interpreted(CHECK)
    assert len(results) == 6
    for r in results:
        dtype = r["case"][0].replace("torch.", "")
        assert r["dtypes"][0] == r["dtypes"][1] == r["dtypes"][3] == f"torch.{dtype}", r
        assert r["dtypes"][2] == r["case"][1], r  # the weight's gradient in the weights' dtype
        assert r["out"] <= 0 and r["dw"] <= 0 and r["rows"] <= 0, r
        assert r["dy_equal"], r
        assert r["dropped"] > 0, r
