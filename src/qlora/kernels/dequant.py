"""bitsandbytes' 4-bit layout, dequantized with plain torch ops, and a 4-bit matmul over it.

bitsandbytes stores a [out, in] weight as bytes holding two 4-bit codes each (high nibble
first), one absmax per block of `blocksize` consecutive weights, and with double quantization
those absmax values themselves as uint8 codes of a 256-entry table, one fp32 scale per 256
of them, plus an offset. `dequantize_4bit` reproduces `bitsandbytes.functional.dequantize_4bit`
exactly. Written with torch ops (no custom kernel), it is the readable reference a fused
dequantize kernel is to be checked against.

`Matmul4bit` is the autograd function of x @ Wᵀ for a frozen 4-bit W: it keeps only the 4-bit
bytes for backward and dequantizes again there, so no 16-bit copy of any weight outlives its use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Packed4bit:
    """The tensors of one bitsandbytes 4-bit weight, unpacked from its QuantState."""

    data: torch.Tensor  # uint8 [n/2] two codes per byte, high nibble first
    absmax: torch.Tensor  # fp32 [n/blocksize], or uint8 codes when nested
    code: torch.Tensor  # fp32 [16] the NF4 or FP4 values
    blocksize: int
    shape: tuple[int, int]
    dtype: torch.dtype  # the dtype the weight is dequantized to
    nested_absmax: torch.Tensor | None = None  # fp32 [n/blocksize/256]
    nested_code: torch.Tensor | None = None  # fp32 [256]
    nested_blocksize: int = 256
    offset: float = 0.0


def packed_from_bnb(weight) -> Packed4bit:
    """A Packed4bit view of a `bitsandbytes.nn.Params4bit` (no copy)."""
    state = weight.quant_state
    nested = state.state2 if state.nested else None
    return Packed4bit(
        data=weight.data.view(-1), absmax=state.absmax, code=state.code,
        blocksize=state.blocksize, shape=tuple(state.shape), dtype=state.dtype,
        nested_absmax=None if nested is None else nested.absmax,
        nested_code=None if nested is None else nested.code,
        nested_blocksize=256 if nested is None else nested.blocksize,
        offset=float(state.offset) if nested is not None else 0.0,
    )


def block_scales(p: Packed4bit) -> torch.Tensor:
    """fp32 absmax of every block, undoing double quantization when present."""
    if p.nested_absmax is None:
        return p.absmax.float()
    group = torch.arange(p.absmax.numel(), device=p.absmax.device) // p.nested_blocksize
    return p.nested_code[p.absmax.long()] * p.nested_absmax[group] + p.offset


def dequantize_4bit(p: Packed4bit, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight [out, in] of a 4-bit tensor, in `dtype` (default: the stored dtype)."""
    codes = torch.stack((p.data >> 4, p.data & 15), dim=-1).flatten().long()
    values = p.code[codes]
    n = values.numel()
    scales = block_scales(p)
    full = n - n % p.blocksize
    body = (values[:full].view(-1, p.blocksize) * scales[: full // p.blocksize, None]).flatten()
    if full < n:  # a partial last block
        body = torch.cat([body, values[full:] * scales[-1]])
    out_features, in_features = p.shape
    return body[: out_features * in_features].view(out_features, in_features).to(dtype or p.dtype)


class Matmul4bit(torch.autograd.Function):
    """x @ Wᵀ (+ bias) for a frozen 4-bit W; backward recomputes W instead of saving it."""

    @staticmethod
    def forward(ctx, x, data, absmax, code, nested_absmax, nested_code, meta):
        p = Packed4bit(data, absmax, code, *meta[:3], nested_absmax, nested_code, *meta[3:])
        ctx.save_for_backward(data, absmax, code, nested_absmax, nested_code)
        ctx.meta = meta
        return x @ dequantize_4bit(p, x.dtype).t()

    @staticmethod
    def backward(ctx, grad_out):
        data, absmax, code, nested_absmax, nested_code = ctx.saved_tensors
        meta = ctx.meta
        p = Packed4bit(data, absmax, code, *meta[:3], nested_absmax, nested_code, *meta[3:])
        grad_x = grad_out @ dequantize_4bit(p, grad_out.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None, None, None


def matmul_4bit(x: torch.Tensor, p: Packed4bit, bias: torch.Tensor | None = None) -> torch.Tensor:
    meta = (p.blocksize, p.shape, p.dtype, p.nested_blocksize, p.offset)
    out = Matmul4bit.apply(x, p.data, p.absmax, p.code, p.nested_absmax, p.nested_code, meta)
    return out if bias is None else out + bias.to(out.dtype)


class Base4bit(torch.nn.Module):
    """The frozen 4-bit base of a LoRA layer, run through `matmul_4bit`.

    It holds the same tensors as the bitsandbytes Linear4bit it stands beside (as
    non-persistent buffers: nothing is copied and state_dict is unchanged), so that
    torch.compile sees them as module state shared by one compiled graph for every layer.
    """

    def __init__(self, layer):
        super().__init__()
        p = packed_from_bnb(layer.weight)
        self.register_buffer("data", p.data, persistent=False)
        self.register_buffer("absmax", p.absmax, persistent=False)
        self.register_buffer("code", p.code, persistent=False)
        self.register_buffer("nested_absmax", p.nested_absmax, persistent=False)
        self.register_buffer("nested_code", p.nested_code, persistent=False)
        self.meta = (p.blocksize, p.shape, p.dtype, p.nested_blocksize, p.offset)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = Matmul4bit.apply(x, self.data, self.absmax, self.code, self.nested_absmax,
                               self.nested_code, self.meta)
        return out if bias is None else out + bias.to(out.dtype)
