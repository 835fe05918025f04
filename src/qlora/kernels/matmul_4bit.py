"""The 4-bit base's matmul: frozen bitsandbytes 4-bit weights, dequantized as it runs
(kernels/dequant.py).

`Matmul4bit` is the autograd function of x @ Wᵀ (+ an addend) for a frozen 4-bit W, or for several
4-bit weights that read one input (q, k, v; gate, up), each dequantized into its rows of one
[Σ out, in] buffer so that one GEMM serves them all: it keeps only the 4-bit bytes for backward and
dequantizes again there, so no 16-bit copy of any weight outlives its use. kernels/lora.py puts the
LoRA adapters in front of it.

One exception: inside a checkpoint's rerun (kernels/kept_weights.rerun_keeps_weights) the dense
weight is kept for the layer's backward, which takes it (`take_kept_weight`) instead of
dequantizing again.
"""

from __future__ import annotations

import torch

from qlora.kernels import kept_weights
from qlora.kernels.dequant import Packed4bit, dequantize_group, packed_from_bnb


class Matmul4bit(torch.autograd.Function):
    """x @ W_catᵀ + addend for frozen 4-bit weights W_1, W_2, ... of one in_features, stacked by
    rows (one weight, or q/k/v, gate/up read from one input): one GEMM forward and one for x's
    gradient, where autograd would add one per layer. Backward dequantizes again instead of
    keeping any 16-bit weight; only the 4-bit bytes are kept (on ctx, see forward). Transient
    memory: the [Σ out, in] dense weight.

    The addend (optional, the output's shape and x's dtype, contiguous) is consumed: the GEMM
    accumulates into its memory and returns it (an in-place op to autograd), because an
    out-of-place addmm would first copy it into a new output, one more full pass over it.
    Arguments after `metas`: (data, absmax, code, nested_absmax, nested_code) of each weight.
    """

    @staticmethod
    def forward(ctx, x, addend, metas, *tensors):
        # The frozen bytes are held on ctx, not saved with save_for_backward: nothing of this
        # function then passes through saved-tensor hooks, so a non-reentrant checkpoint's
        # recompute stops before it when it ends a layer (down_proj): that GEMM's output is not
        # needed for backward, and skipping it saves a dequantize and a GEMM per layer.
        ctx.tensors = tensors
        ctx.metas = metas
        weight = dense_weights(metas, tensors, x.dtype)
        kept_weights.keep(_weight_key(tensors, x.dtype), weight)  # a rerun's, for its backward
        weight_t = weight.t()
        rows = x.reshape(-1, x.shape[-1])
        if addend is None:
            return (rows @ weight_t).view(*x.shape[:-1], weight_t.shape[1])
        ctx.mark_dirty(addend)
        addend.view(-1, weight_t.shape[1]).addmm_(rows, weight_t)
        return addend

    @staticmethod
    def backward(ctx, grad_out):
        tensors = ctx.tensors
        grad_x = None
        if ctx.needs_input_grad[0]:  # (kernels/lora.py passes x detached: its backward takes W)
            weight = take_kept_weight(tensors, grad_out.dtype)
            if weight is None:
                weight = dense_weights(ctx.metas, tensors, grad_out.dtype)
            grad_x = grad_out @ weight
        grad_addend = grad_out if ctx.needs_input_grad[1] else None
        return (grad_x, grad_addend, None) + (None,) * len(tensors)


def _meta(p: Packed4bit) -> tuple:
    return (p.blocksize, p.shape, p.dtype, p.nested_blocksize, p.offset)


def _tensors(p: Packed4bit) -> list:
    return [p.data, p.absmax, p.code, p.nested_absmax, p.nested_code]


def _unpack_group(metas: tuple, tensors: tuple) -> list[Packed4bit]:
    """The Packed4bit of each weight from the flat tensor list Matmul4bit is given."""
    return [Packed4bit(data, absmax, code, *meta[:3], nested_absmax, nested_code, *meta[3:])
            for meta, (data, absmax, code, nested_absmax, nested_code)
            in zip(metas, zip(*[iter(tensors)] * 5))]


def _weight_key(tensors: tuple, dtype: torch.dtype) -> tuple:
    return tensors[0].data_ptr(), len(tensors), dtype


def take_kept_weight(tensors: tuple, dtype: torch.dtype) -> torch.Tensor | None:
    """The dense weight the layer's rerun kept for these weights, if it did, handed over
    (kept_weights.take). LoraProducts' backward calls it whether or not it needs it."""
    return kept_weights.take(_weight_key(tensors, dtype))


def dense_weights(metas: tuple, tensors: tuple, dtype: torch.dtype) -> torch.Tensor:
    """[Σ out, in]: the weights Matmul4bit is given (metas, flat tensors), dequantized."""
    return dequantize_group(_unpack_group(metas, tensors), dtype)


def matmul_4bit(x: torch.Tensor, p: Packed4bit, bias: torch.Tensor | None = None,
                addend: torch.Tensor | None = None) -> torch.Tensor:
    """x @ Wᵀ (+ addend, which is consumed: see Matmul4bit) (+ bias)."""
    out = Matmul4bit.apply(x, addend, (_meta(p),), *_tensors(p))
    return out if bias is None else out + bias.to(out.dtype)


class Base4bit(torch.nn.Module):
    """The frozen 4-bit base of a LoRA layer, run through `Matmul4bit`.

    It holds the same tensors as the bitsandbytes Linear4bit it stands beside, as non-persistent
    buffers: nothing is copied, state_dict and adapter files are unchanged, and `.to()` moves them
    with the model.
    """

    def __init__(self, layer):
        super().__init__()
        p = packed_from_bnb(layer.weight)
        self.register_buffer("data", p.data, persistent=False)
        self.register_buffer("absmax", p.absmax, persistent=False)
        self.register_buffer("code", p.code, persistent=False)
        self.register_buffer("nested_absmax", p.nested_absmax, persistent=False)
        self.register_buffer("nested_code", p.nested_code, persistent=False)
        self.meta = _meta(p)

    def tensors(self) -> list:
        return [self.data, self.absmax, self.code, self.nested_absmax, self.nested_code]

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None,
                addend: torch.Tensor | None = None) -> torch.Tensor:
        """x @ Wᵀ + addend + bias; the addend (x's dtype, contiguous) is consumed."""
        out = Matmul4bit.apply(x, addend, (self.meta,), *self.tensors())
        return out if bias is None else out + bias.to(out.dtype)
