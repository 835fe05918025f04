"""LoRA layers over frozen 4-bit bases as two autograd functions: the adapters' products, then the
base GEMM that accumulates into them.

For one LoRA layer, or several that read one input (q, k, v; gate, up), with 4-bit bases W_i,
adapters A_i [r, in], B_i [out_i, r], scales s_i and seeded dropout masks D_i (kernels/dropout.py):

    y = [s_1·B_1·A_1·D_1(x) | s_2·B_2·A_2·D_2(x) | ...] + x·[W_1; W_2; ...]ᵀ

`LoraProducts` computes the first term (H = [s_i·A_i·D_i(x)] side by side, times the block diagonal
of the B_i), and in backward the adapters' gradients and ALL of x's gradient: the masked sum of
(∂y·s_i·B_i)·A_i, into which the base's ∂y·W GEMM accumulates. Autograd would compute each
projection's part of x's gradient apart and add them up, one full-size pass per addition.

The base GEMM comes after it (kernels/matmul_4bit.py's Matmul4bit, given x without its gradient) and
saves nothing. A layer's forward is recomputed in backward when gradient checkpointing is on, up
to its last saved tensor: where a LoRA layer ends the checkpointed block (down_proj), that is
LoraProducts' and the rerun skips the base GEMM and its dequantize. And the rerun does not
recompute H: the layer's first run kept it (products_for_rerun; models/decoder.py's
CheckpointedLayer sets the modes): each dropout mask is drawn in the forward and in backward's two
kernels, not in the rerun.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from qlora.kernels.matmul_4bit import Matmul4bit, dense_weights, take_kept_weight
from qlora.kernels import lora_dropout


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


# H of each group from a checkpointed layer's first run, by the group's first 4-bit tensor, until
# that layer's rerun takes it: "keep" in a first run, "reuse" in a rerun (products_for_rerun).
_h_mode: str | None = None
_h_kept: dict = {}


@contextlib.contextmanager
def products_for_rerun(mode: str | None):
    """"keep": around a checkpointed layer's first run, each LoraProducts keeps its H [tokens, n·r]
    (small: r columns per layer); "reuse": around its rerun in backward, each takes its H back
    instead of recomputing it, so that the rerun draws no dropout mask and reads no A. None:
    neither, inside one of them (a sequence tile of the MLP). The mode outside comes back after."""
    global _h_mode
    before, _h_mode = _h_mode, mode
    try:
        yield
    finally:
        _h_mode = before


def drop_kept_products() -> None:
    """Forget H's no rerun took (a forward whose backward never ran): call before a forward."""
    _h_kept.clear()


class LoraProducts(torch.autograd.Function):
    """[s_i·B_i·A_i·D_i(x)] side by side; backward also computes x's gradient through the bases.

    With dropout, the products that read D_i(x) or make D_i(∂H_i·A_i) are kernels/lora_dropout.py's
    (Triton kernels on CUDA, the masks drawn in registers), so only x is kept, whatever the group's
    size. Without it, the scale rides on the cast of A (A'_i = s_i·A_i in x's dtype, one
    kernel for the group) and the products are cuBLAS GEMMs. B needs only its cast into the block
    diagonal."""

    @staticmethod
    def forward(ctx, x, seed, group: LoraGroup, *adapters):
        n = len(group.scales)
        rows = x.reshape(-1, x.shape[-1])
        b_block = _block_diagonal(adapters[n:], x.dtype)  # [Σ out, n·r]
        key = (group.tensors[0].data_ptr(), rows.shape[0])
        h = _h_kept.pop(key, None) if _h_mode == "reuse" else None
        a_stack = None
        if group.p > 0:
            if h is None:
                h = lora_dropout.down_products(rows, adapters[:n], seed, group.salts,
                                               group.scales, group.p)
        else:  # one input for every A: one GEMM
            a_stack = _scaled_stack(adapters[:n], group.scales, x.dtype)  # [n·r, in]: the A'_i
            if h is None:
                h = rows @ a_stack.t()
        if _h_mode == "keep":
            _h_kept[key] = h
        ctx.group, ctx.n, ctx.x_shape = group, n, x.shape
        ctx.dtypes = [a.dtype for a in adapters]
        ctx.save_for_backward(rows, h, a_stack, b_block, seed, *adapters[:n])
        return h @ b_block.t()  # [tokens, Σ out]: a view made here could not be added into

    @staticmethod
    def backward(ctx, grad_out):
        rows, h, a_stack, b_block, seed, *a = ctx.saved_tensors
        group, n = ctx.group, ctx.n
        r = h.shape[1] // n
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        grad_h = grad @ b_block  # [tokens, n·r], the gradient of h = [s_i·D_i(x)·A_iᵀ]
        grad_b_block = grad.t() @ h  # [Σ out, n·r]: its diagonal blocks are the B gradients
        grad_x = None
        if group.p > 0:
            products, grad_x = lora_dropout.backward_products(
                rows, grad_h, a, seed, group.salts, group.scales, group.p,
                want_dx=ctx.needs_input_grad[0])
        else:
            products = [(grad_h[:, i * r:(i + 1) * r].t() @ rows).float() * s
                        for i, s in enumerate(group.scales)]
        grads_a = [product.to(dtype) for product, dtype in zip(products, ctx.dtypes)]
        grads_b, start = [], 0
        for i, width in enumerate(group.out_features):
            block = grad_b_block[start:start + width, i * r:(i + 1) * r]
            grads_b.append(block.to(ctx.dtypes[n + i]))
            start += width
        weight = take_kept_weight(group.tensors, grad.dtype)
        if ctx.needs_input_grad[0]:
            if group.p == 0:
                grad_x = grad_h @ a_stack
            # the base's part accumulates into the adapters' sum: x's gradient formed once
            if weight is None:
                weight = dense_weights(group.metas, group.tensors, grad.dtype)
            grad_x.addmm_(grad, weight)
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


def lora_4bit(x: torch.Tensor, seed: torch.Tensor | None, group: LoraGroup,
              adapters: list[torch.Tensor], base: bool = True) -> torch.Tensor:
    """y [.., Σ out] of the group for input x: LoraProducts, then the base GEMM accumulating into
    its output. `adapters` are A_1..A_n then B_1..B_n (the trainable fp32 parameters); `seed`
    (seed_dropout's tensor) is read only when group.p > 0. base=False: LoraProducts alone."""
    lora = LoraProducts.apply(x, seed, group, *adapters)
    if not base:
        return lora.view(*x.shape[:-1], lora.shape[-1])
    # x's gradient through the bases is LoraProducts' to compute (see the module docstring)
    out = Matmul4bit.apply(x.detach().reshape(-1, x.shape[-1]), lora, group.metas, *group.tensors)
    return out.view(*x.shape[:-1], out.shape[-1])
