"""A sparse block's rows between token order and expert order, and the router's weighted sum back.

speed/moe.py sends each token's k choices to k rows sorted by expert. With `order` that sort (row
j holds the flat choice order[j], of token order[j] // k) and `inverse` its inverse (choice c of
token t sits at row inverse[t·k + c]):
- `SortedRows`: x [N, H] → rows [N·k, H] (a gather); backward sums each token's k row gradients
  in fp32, rounded once.
- `combine`: the experts' outputs y [N·k, H] → [N, H]: each token's k rows times their router
  weights, each product rounded to y's dtype (as the reference Experts rounds each expert's
  weighted output), summed in fp32 and rounded once.

Each runs as torch gathers and reductions (`sum_rows_reference`, `combine_reference`: the plain
computation) or, with `fused`, as one Triton kernel a direction: a program reads one token's k
rows where `inverse` puts them (a block of their columns forward, the whole rows backward) and
writes their sum, so no [N·k, H] intermediate in fp32 or in token
order is made (the reference makes four a direction) and nothing adds by atomics. On a
Qwen3-30B-A3B step the reference's mul, gathers, casts and sums were about 30 of its 386 ms
(H100 profile, 2026-12-07). Backward of `combine` writes each row's gradient, w · g[token], and
the router weight's, g[token] · y[row] summed in fp32, in one pass over the rows.

The kernels are in routing_triton.py, imported on first use (the tests set TRITON_INTERPRET=1
before that import).
"""

from __future__ import annotations

import torch

BLOCK = 1024  # columns a program sums at a time


def _kernels():
    from qlora.kernels import routing_triton

    return {"sum": routing_triton.sum_kernel,
            "combine_backward": routing_triton.combine_backward_kernel}


def _block(h: int) -> int:
    return min(BLOCK, 1 << max(h - 1, 0).bit_length())


def _sum_launch(y: torch.Tensor, weights: torch.Tensor | None, inverse: torch.Tensor,
                k: int) -> torch.Tensor:
    """[N, H] in y's dtype: each token's k rows of y (where `inverse` puts them), weighted
    (weights [N, k]) or not, summed by sum_kernel."""
    y, inverse = y.contiguous(), inverse.contiguous()
    h, block = y.shape[1], _block(y.shape[1])
    out = y.new_empty(inverse.numel() // k, h)
    if out.numel():
        _kernels()["sum"][(out.shape[0], -(-h // block))](
            y, inverse if weights is None else weights, inverse, out, h, K=k,
            WEIGHTED=weights is not None, BLOCK=block,
            NATIVE_ROUNDING=y.device.type == "cuda", enable_fp_fusion=False)
    return out


# --------------------------------------------------------------------------- token → expert rows

def token_sums(by_token: torch.Tensor, k: int) -> torch.Tensor:
    """[N, H]: rows [N·k, H] in token order (each token's k together) summed k at a time in
    fp32, rounded once to their dtype."""
    return by_token.view(-1, k, by_token.shape[-1]).float().sum(dim=1).to(by_token.dtype)


def sum_rows_reference(grad_rows: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
    """[N, H]: each token's k rows (put back in token order by a gather) summed in fp32, rounded
    once to the rows' dtype."""
    return token_sums(grad_rows.index_select(0, inverse), k)


def sum_rows(grad_rows: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
    """sum_rows_reference as one Triton kernel."""
    return _sum_launch(grad_rows, None, inverse, k)


class SortedRows(torch.autograd.Function):
    """rows [N·k, H] = x [N, H]'s k copies of each token in expert order (row j is token
    order[j] // k). Backward sums each token's k row gradients (sum_rows, with `fused` the
    kernel), where index_select's backward would add them into a [N, H] bf16 tensor by atomics
    (27 of 417 ms of a Qwen3-30B-A3B step, H100, 2026-12-07)."""

    @staticmethod
    def forward(ctx, x, order, inverse, k: int, fused: bool = False):
        ctx.save_for_backward(inverse)
        ctx.k, ctx.fused = k, fused
        return x.index_select(0, order // k)

    @staticmethod
    def backward(ctx, grad_rows):
        (inverse,) = ctx.saved_tensors
        total = (sum_rows if ctx.fused else sum_rows_reference)(grad_rows, inverse, ctx.k)
        return total, None, None, None, None


# --------------------------------------------------------------------------- expert rows → token

class PermutedRows(torch.autograd.Function):
    """x.index_select(0, perm) for a permutation `perm`, whose backward is the gather by its
    inverse `inverse` (index_select's own backward adds by atomics)."""

    @staticmethod
    def forward(ctx, x, perm, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def combine_reference(y: torch.Tensor, weights: torch.Tensor, order: torch.Tensor,
                      inverse: torch.Tensor) -> torch.Tensor:
    """[N, H] in y's dtype: row j of y [N·k, H] times its router weight (of weights [N, k], flat
    choice order[j]), rounded to y's dtype, put back in token order and each token's k summed
    in fp32."""
    weighted = (y * weights.reshape(-1)[order, None]).to(y.dtype)
    return token_sums(PermutedRows.apply(weighted, inverse, order), weights.shape[1])


class CombinedRows(torch.autograd.Function):
    """combine_reference by the Triton kernels: keeps the weights, `inverse` and, where the
    weights take a gradient (which reads it), y."""

    @staticmethod
    def forward(ctx, y, weights, inverse):
        y, weights, inverse = y.contiguous(), weights.contiguous(), inverse.contiguous()
        ctx.save_for_backward(y if ctx.needs_input_grad[1] else None, weights, inverse)
        return _sum_launch(y, weights, inverse, weights.shape[1])

    @staticmethod
    def backward(ctx, grad):
        y, weights, inverse = ctx.saved_tensors
        weight_grad = y is not None
        grad = grad.contiguous()
        dy = grad.new_empty(inverse.numel(), grad.shape[1])  # every row is a choice: all written
        dw = torch.empty(weights.shape, dtype=torch.float32, device=grad.device)
        h, block = grad.shape[1], _block(grad.shape[1])
        if weights.numel():
            _kernels()["combine_backward"][(weights.shape[0],)](
                grad, y if weight_grad else grad, weights, inverse, dy, dw, h,
                K=weights.shape[1], WEIGHT_GRAD=weight_grad, BLOCK=block,
                NATIVE_ROUNDING=grad.device.type == "cuda", enable_fp_fusion=False)
        return dy, (dw.to(weights.dtype) if weight_grad else None), None


def combine(y: torch.Tensor, weights: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor,
            fused: bool = False) -> torch.Tensor:
    """combine_reference; with `fused`, by one Triton kernel (and one in backward)."""
    if fused:
        return CombinedRows.apply(y, weights, inverse)
    return combine_reference(y, weights, order, inverse)
