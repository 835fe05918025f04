"""bitsandbytes' 4-bit layout, dequantized with plain torch ops and by a Triton kernel.

bitsandbytes stores a [out, in] weight as bytes holding two 4-bit codes each (high nibble
first), one absmax per block of `blocksize` consecutive weights, and with double quantization
those absmax values themselves as uint8 codes of a 256-entry table, one fp32 scale per 256
of them, plus an offset. `dequantize_4bit` reproduces `bitsandbytes.functional.dequantize_4bit`
exactly. Written with torch ops (no custom kernel), it is the readable reference that
`dequantize_4bit_triton` equals bit for bit (tests/test_dequant_kernel.py, through Triton's
interpreter; benchmarks/gpu_check.py on CUDA). `dequantize` picks the kernel where Triton runs;
`dequantize_group` writes several weights into the rows of one buffer. The 4-bit matmul that
dequantizes through them is kernels/matmul_4bit.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qlora.errors import QloraError
from qlora.kernels.dropout import use_triton


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


def dequantize_4bit(p: Packed4bit, dtype: torch.dtype | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense weight [out, in] of a 4-bit tensor, in `dtype` (default: the stored dtype, or
    out's); written into `out` (contiguous, [out, in]) when given, and returned."""
    if out is not None:
        dtype = _checked_out(p, dtype, out)
        return out.copy_(dequantize_4bit(p, dtype))
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


# Packed bytes per kernel program and its warps (4096 weights, two tile rows per thread).
# gpu_check.py's dequant check times other choices beside these: on an H200 at 14336×4096,
# 2048 bytes × 8 warps 0.069 ms, 4096 × 8 0.072, 8192 × 8 0.088, 16384 × 8 0.119.
TILE_BYTES = 2048
WARPS = 8


def _dequantize_kernel():
    from qlora.kernels.dequant_triton import dequantize_kernel

    return dequantize_kernel


def _checked_out(p: Packed4bit, dtype: torch.dtype | None, out: torch.Tensor) -> torch.dtype:
    """The dtype to dequantize to when writing into `out`, which must fit the weight exactly."""
    dtype = dtype or out.dtype
    if tuple(out.shape) != tuple(p.shape) or out.dtype != dtype or not out.is_contiguous() \
            or out.device != p.data.device:
        raise QloraError(
            f"dequantize out= must be a contiguous {dtype} tensor of shape {tuple(p.shape)} on "
            f"{p.data.device}, got {out.dtype} {tuple(out.shape)} on {out.device} "
            f"(contiguous: {out.is_contiguous()}); pass a row slice of a contiguous buffer")
    return dtype


def dequantize_4bit_triton(p: Packed4bit, dtype: torch.dtype | None = None,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """`dequantize_4bit` as one Triton kernel, bit for bit: fp32 code × fp32 block scale, rounded
    once to `dtype` (fp32, bf16 or fp16). Written into `out` when given (see dequantize_4bit)."""
    dtype = _checked_out(p, dtype, out) if out is not None else dtype or p.dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise QloraError(f"4-bit weights dequantize to float32, bfloat16 or float16, not {dtype}")
    cols = 8 // dtype.itemsize  # packed bytes whose 2·cols values fill 16 bytes of output
    if p.blocksize % (2 * cols):
        raise QloraError(f"the dequantize kernel needs a blocksize that is a multiple of "
                         f"{2 * cols} for {dtype}, got {p.blocksize}; use dequantize_4bit (the "
                         "torch reference) for this weight")
    if out is None:
        out = torch.empty(p.shape, dtype=dtype, device=p.data.device)
    n_bytes = p.data.numel()
    if out.numel() == 0:
        return out
    nested = p.nested_absmax is not None
    grid = (-(-n_bytes // TILE_BYTES),)
    _dequantize_kernel()[grid](
        p.data, p.absmax, p.code,
        p.nested_absmax if nested else p.code,  # unread placeholders without double quantization
        p.nested_code if nested else p.code,
        p.offset, out, n_bytes, out.numel(),
        BLOCK_BYTES=p.blocksize // 2, NESTED=nested, NESTED_BLOCKSIZE=p.nested_blocksize,
        ROWS=TILE_BYTES // cols, COLS=cols, NATIVE_ROUNDING=out.device.type == "cuda",
        num_warps=WARPS, enable_fp_fusion=False)
    return out


def dequantize(p: Packed4bit, dtype: torch.dtype | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense weight: by the Triton kernel where Triton runs (CUDA, or the CPU under
    TRITON_INTERPRET=1), by the torch reference elsewhere. Both give the same bits. Written into
    `out` (a contiguous [out, in] tensor, e.g. a row slice of a larger buffer) when given."""
    if use_triton(p.data):
        return dequantize_4bit_triton(p, dtype, out)
    return dequantize_4bit(p, dtype, out)


def dequantize_group(packs: list[Packed4bit], dtype: torch.dtype) -> torch.Tensor:
    """The weights' dense values stacked by rows, [Σ out, in], each written into its own rows
    (no concatenating copy). All have the same in_features."""
    rows = sum(p.shape[0] for p in packs)
    weight = torch.empty(rows, packs[0].shape[1], dtype=dtype, device=packs[0].data.device)
    start = 0
    for p in packs:
        dequantize(p, dtype, out=weight[start:start + p.shape[0]])
        start += p.shape[0]
    return weight
