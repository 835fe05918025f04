"""LoRA layers over frozen 4-bit bases as two autograd functions: the adapters' products, then the
base GEMM that accumulates into them.

For one LoRA layer, or several that read one input (q, k, v; gate, up), with 4-bit bases W_i,
adapters A_i [r, in], B_i [out_i, r], scales s_i and seeded dropout masks D_i (kernels/dropout.py):

    y = [s_1·B_1·A_1·D_1(x) | s_2·B_2·A_2·D_2(x) | ...] + x·[W_1; W_2; ...]ᵀ

`LoraProducts` computes the first term (H = [A_i·D_i(x)] side by side, times the block diagonal of
s_i·B_i), and in backward the adapters' gradients and ALL of x's gradient: the masked sum of
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
    """[s_i·B_i·A_i·D_i(x)] side by side; backward also computes x's gradient through the bases."""

    @staticmethod
    def forward(ctx, x, seed, group: LoraGroup, *adapters):
        n = len(group.scales)
        rows = x.reshape(-1, x.shape[-1])
        a_stack = torch.cat(adapters[:n]).to(x.dtype) if n > 1 else adapters[0].to(x.dtype)
        scaled_b = [(b * s).to(x.dtype) for b, s in zip(adapters[n:], group.scales)]
        b_block = torch.block_diag(*scaled_b) if n > 1 else scaled_b[0]
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
        grad_h = grad @ b_block  # [tokens, n·r]
        grad_b_block = grad.t() @ h  # [Σ out, n·r]: its diagonal blocks are the B gradients
        grads_a, grads_b, start = [], [], 0
        for i, (scale, width) in enumerate(zip(group.scales, group.out_features)):
            cols = slice(i * r, (i + 1) * r)
            grads_a.append(grad_h[:, cols].t() @ (dropped[i] if dropped else rows))
            grads_b.append(grad_b_block[start:start + width, cols] * scale)
            start += width
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _input_grad(grad, grad_h, a_stack, seed, group, r)
            grad_x = grad_x.view(ctx.x_shape)
        adapters = [g.to(dtype) for g, dtype in zip(grads_a + grads_b, ctx.dtypes)]
        return (grad_x, None, None, *adapters)


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
    its output. `adapters` are A_1..A_n then B_1..B_n (the trainable fp32 parameters)."""
    if seed is None:  # no dropout: the seed is never read
        seed = torch.zeros((), dtype=torch.int64, device=x.device)
    lora = LoraProducts.apply(x, seed, group, *adapters)
    # x's gradient through the bases is LoraProducts' to compute (see the module docstring)
    out = Matmul4bit.apply(x.detach().reshape(-1, x.shape[-1]), lora, group.metas, *group.tensors)
    return out.view(*x.shape[:-1], out.shape[-1])
