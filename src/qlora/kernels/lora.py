"""LoRA layers over frozen 4-bit bases as two autograd functions: the adapters' products, then the
base GEMM that accumulates into them.

For one LoRA layer, or several that read one input (q, k, v; gate, up), with 4-bit bases W_i,
adapters A_i [r, in], B_i [out_i, r], scales s_i and seeded dropout masks D_i (kernels/dropout.py):

    y = [s_1·B_1·A_1·D_1(x) | s_2·B_2·A_2·D_2(x) | ...] + x·[W_1; W_2; ...]ᵀ

`LoraProducts` computes the first term (H = [s_i·A_i·D_i(x)] side by side, times the block diagonal
of the B_i), and in backward the adapters' gradients and ALL of x's gradient: the masked sum of
(∂y·s_i·B_i)·A_i, into which the base's ∂y·W GEMM accumulates. Autograd would compute each
projection's part of x's gradient apart and add them up, one full-size pass per addition.

The base GEMM comes after it (kernels/dequant.py's Matmul4bit, given x without its gradient) and
saves nothing. A layer's forward is recomputed in backward when gradient checkpointing is on, up
to its last saved tensor: where a LoRA layer ends the checkpointed block (down_proj), that is
LoraProducts' and the rerun skips the base GEMM and its dequantize.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qlora.kernels.dequant import Matmul4bit, dense_weights
from qlora.kernels.dropout import seeded_dropout_add_, seeded_dropout_values


@dataclass(frozen=True, eq=False)
class LoraGroup:
    """What LoraProducts needs besides tensors that take gradients: per layer its scale, dropout
    salt and output width; the dropout probability (0: no dropout) shared by the group; and the
    stacked 4-bit bases (their metas and bytes, as Matmul4bit takes them)."""

    scales: tuple[float, ...]
    salts: tuple[int, ...]
    out_features: tuple[int, ...]
    p: float
    metas: tuple
    tensors: tuple


class LoraProducts(torch.autograd.Function):
    """[s_i·B_i·A_i·D_i(x)] side by side; backward also computes x's gradient through the bases.

    The scale rides on the cast of A (A'_i = s_i·A_i in x's dtype, one kernel for the group), so
    that B needs only its cast into the block diagonal: per call, a handful of small kernels
    instead of a multiply and a cast for every adapter matrix."""

    @staticmethod
    def forward(ctx, x, seed, group: LoraGroup, *adapters):
        n = len(group.scales)
        rows = x.reshape(-1, x.shape[-1])
        a_stack = _scaled_stack(adapters[:n], group.scales, x.dtype)  # [n·r, in]: the A'_i
        b_block = _block_diagonal(adapters[n:], x.dtype)  # [Σ out, n·r]
        if group.p > 0:
            dropped = [seeded_dropout_values(rows, seed, salt, group.p) for salt in group.salts]
            r = a_stack.shape[0] // n
            h = torch.cat([d @ a_stack[i * r:(i + 1) * r].t() for i, d in enumerate(dropped)], 1)
        else:  # one input for every A: one GEMM
            dropped = []
            h = rows @ a_stack.t()
        ctx.group, ctx.n, ctx.x_shape = group, n, x.shape
        ctx.dtypes = [a.dtype for a in adapters]
        # x itself only without dropout: with it, A's gradient reads the dropped copies instead,
        # and keeping x too would hold one more activation per layer when nothing is recomputed
        ctx.save_for_backward(None if dropped else rows, h, a_stack, b_block, seed, *dropped)
        return h @ b_block.t()  # [tokens, Σ out]: a view made here could not be added into

    @staticmethod
    def backward(ctx, grad_out):
        rows, h, a_stack, b_block, seed, *dropped = ctx.saved_tensors
        group, n = ctx.group, ctx.n
        r = a_stack.shape[0] // n
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        grad_h = grad @ b_block  # [tokens, n·r], the gradient of h = [D_i(x)·A'_iᵀ]
        grad_b_block = grad.t() @ h  # [Σ out, n·r]: its diagonal blocks are the B gradients
        grads_a, grads_b, start = [], [], 0
        for i, (scale, width) in enumerate(zip(group.scales, group.out_features)):
            cols = slice(i * r, (i + 1) * r)
            product = grad_h[:, cols].t() @ (dropped[i] if dropped else rows)  # ∂A'_i
            grads_a.append(torch.mul(product, scale, out=torch.empty(
                product.shape, dtype=ctx.dtypes[i], device=product.device)))
            grads_b.append(grad_b_block[start:start + width, cols].to(ctx.dtypes[n + i]))
            start += width
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _input_grad(grad, grad_h, a_stack, seed, group, r)
            grad_x = grad_x.view(ctx.x_shape)
        return (grad_x, None, None, *grads_a, *grads_b)


def _scaled_stack(matrices, scales: tuple[float, ...], dtype: torch.dtype) -> torch.Tensor:
    """[s_1·A_1; s_2·A_2; ...] in `dtype`: multiplied and cast by one kernel when the scales are
    equal (one adapter config: always, in practice)."""
    if len(set(scales)) > 1:
        return torch.cat([(a * s).to(dtype) for a, s in zip(matrices, scales)])
    stacked = torch.cat(matrices) if len(matrices) > 1 else matrices[0]
    return torch.mul(stacked, scales[0], out=torch.empty(stacked.shape, dtype=dtype,
                                                         device=stacked.device))


def _block_diagonal(matrices, dtype: torch.dtype) -> torch.Tensor:
    """The matrices along the diagonal of one zero [Σ rows, Σ cols] matrix in `dtype`, each cast
    as it is copied in."""
    if len(matrices) == 1:
        return matrices[0].to(dtype)
    rows, cols = sum(m.shape[0] for m in matrices), sum(m.shape[1] for m in matrices)
    block = torch.zeros(rows, cols, dtype=dtype, device=matrices[0].device)
    row = col = 0
    for m in matrices:
        block[row:row + m.shape[0], col:col + m.shape[1]].copy_(m)
        row, col = row + m.shape[0], col + m.shape[1]
    return block


def _input_grad(grad, grad_h, a_stack, seed, group: LoraGroup, r: int) -> torch.Tensor:
    """Σ_i D_i(∂H_i·A_i) + ∂y·[W_i], the masks applied and summed in one pass per layer, the base
    GEMM accumulating into that sum."""
    if group.p > 0:
        grad_x = None
        for i, salt in enumerate(group.salts):
            part = grad_h[:, i * r:(i + 1) * r] @ a_stack[i * r:(i + 1) * r]
            if grad_x is None:
                grad_x = seeded_dropout_values(part, seed, salt, group.p)
            else:
                seeded_dropout_add_(grad_x, part, seed, salt, group.p)
    else:
        grad_x = grad_h @ a_stack
    weight = dense_weights(group.metas, group.tensors, grad.dtype)
    return grad_x.addmm_(grad, weight)


def lora_4bit(x: torch.Tensor, seed: torch.Tensor | None, group: LoraGroup,
              adapters: list[torch.Tensor]) -> torch.Tensor:
    """y [.., Σ out] of the group for input x: LoraProducts, then the base GEMM accumulating into
    its output. `adapters` are A_1..A_n then B_1..B_n (the trainable fp32 parameters); `seed`
    (seed_dropout's tensor) is read only when group.p > 0."""
    lora = LoraProducts.apply(x, seed, group, *adapters)
    # x's gradient through the bases is LoraProducts' to compute (see the module docstring)
    out = Matmul4bit.apply(x.detach().reshape(-1, x.shape[-1]), lora, group.metas, *group.tensors)
    return out.view(*x.shape[:-1], out.shape[-1])
