"""Grouped expert compute for mixture-of-experts blocks: the pieces speed/moe.py puts together.

- `dequantize_stack(stack, dtype)`: every member of a quant.QuantizedStack (every expert's
  weight of one projection) dequantized in one batched computation, [members, out, in], in torch
  ops: bit for bit what bitsandbytes' dequantize_4bit gives member by member (each with its own
  absmax, nested scales and offset). `dequantize_stack_triton` is the same as one Triton kernel
  launch (kernels/dequant.py's kernel with a member index: each member's blocks, nested blocks
  and offset found from its byte offset); `dequantize_experts` picks it where Triton runs.
- `grouped_mm(a, b, offsets)`: rows offsets[e-1]:offsets[e] of `a` (tokens sorted by expert)
  times b[e], for all experts in one launch: `torch._grouped_mm` where it runs (bf16 with rows
  of 16-byte multiples: CUDA sm90+, and torch 2.13's CPU), else one batched matmul over the
  experts' rows padded to the largest group (`padded_grouped_mm`; any dtype, more memory).
- `GroupedBase`: x @ W_eᵀ over 4-bit (or 16-bit) expert weights, grouped; keeps nothing but the
  weights it was given for backward and dequantizes them again there (as kernels/matmul_4bit.py's
  Matmul4bit): no dense copy of all experts outlives its GEMM. A projection whose experts
  dequantized together pass WHOLE_PROJECTION_BYTES goes in a few runs of experts (`expert_chunks`),
  one dequantize and one grouped GEMM each: Qwen3-30B-A3B's gate_up, 0.75 GiB dense, in one run;
  Mixtral-8x7B's 1.75 GiB one expert at a time. The runs' row ranges come from the group offsets
  read on the host once a sparse block's forward (one sync; none where every projection is one
  run, as a CUDA graph needs: speed/moe.capture_blocker).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

import torch

from qlora.errors import QloraError
from qlora.kernels.dequant import TILE_BYTES, WARPS
from qlora.kernels.dropout import use_triton


def stack_block_scales(stack) -> torch.Tensor:
    """fp32 absmax of every block of every member, [members, blocks], undoing double
    quantization with each member's own nested scales and offset (as bitsandbytes does)."""
    if not stack.nested:
        return stack.absmax.float()
    blocks = stack.absmax.shape[1]
    group = torch.arange(blocks, device=stack.absmax.device) // stack.nested_blocksize
    return (stack.nested_code[stack.absmax.long()] * stack.nested_absmax[:, group]
            + stack.offset[:, None])


def dequantize_stack(stack, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[members, out, in]: every member dequantized at once (torch ops, the reference)."""
    count = stack.count
    out_features, in_features = stack.shape
    n, bs = out_features * in_features, stack.blocksize
    codes = torch.stack((stack.data >> 4, stack.data & 15), dim=-1).reshape(count, -1)[:, :n]
    values = stack.code[codes.long()]
    scales = stack_block_scales(stack)
    full = n - n % bs
    body = (values[:, :full].view(count, -1, bs) * scales[:, :full // bs, None]).reshape(count, full)
    if full < n:  # a partial last block in each member
        body = torch.cat([body, values[:, full:] * scales[:, -1:]], dim=1)
    return body.view(count, out_features, in_features).to(dtype or stack.dtype)


def _stack_kernel():
    from qlora.kernels.dequant_triton import dequantize_stack_kernel

    return dequantize_stack_kernel


def dequantize_stack_triton(stack, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`dequantize_stack` as one Triton kernel launch, bit for bit."""
    dtype = dtype or stack.dtype
    out_features, in_features = stack.shape
    n = out_features * in_features
    cols = 8 // dtype.itemsize
    if n % stack.blocksize or stack.blocksize % (2 * cols):
        raise QloraError(f"the stack dequantize kernel needs members of whole blocks and a "
                         f"blocksize that is a multiple of {2 * cols}; use dequantize_stack")
    out = torch.empty(stack.count, out_features, in_features, dtype=dtype,
                      device=stack.data.device)
    n_bytes = stack.data.numel()
    if n_bytes == 0:
        return out
    nested = stack.nested
    _stack_kernel()[(-(-n_bytes // TILE_BYTES),)](
        stack.data, stack.absmax, stack.code,
        stack.nested_absmax if nested else stack.code,  # unread placeholders without nesting
        stack.nested_code if nested else stack.code,
        stack.offset if nested else stack.code, out, n_bytes,
        MEMBER_BYTES=n // 2, BLOCKS=stack.absmax.shape[1],
        NESTED_BLOCKS=stack.nested_absmax.shape[1] if nested else 1,
        BLOCK_BYTES=stack.blocksize // 2, NESTED=nested,
        NESTED_BLOCKSIZE=stack.nested_blocksize, ROWS=TILE_BYTES // cols, COLS=cols,
        NATIVE_ROUNDING=out.device.type == "cuda", num_warps=WARPS, enable_fp_fusion=False)
    return out


STACK_PARTS = ("data", "absmax", "nested_absmax", "offset")  # one row a member


def stack_members(stack, start: int, stop: int):
    """Members start … stop − 1 of a quant.QuantizedStack as a stack of their own (views of its
    tensors: each member's bytes and scales are rows of them), for `dequantize_experts`."""
    fields = {name: getattr(stack, name) for name in (
        "shape", "blocksize", "dtype", "nested", "nested_blocksize", "code", "nested_code")}
    rows = {name: getattr(stack, name)[start:stop] if getattr(stack, name).numel() else
            getattr(stack, name) for name in STACK_PARTS}
    return SimpleNamespace(count=stop - start, **fields, **rows)


def dequantize_experts(stack, dtype: torch.dtype) -> torch.Tensor:
    """The stack's dense members: one Triton launch where Triton runs, else the torch batch."""
    n = stack.shape[0] * stack.shape[1]
    if use_triton(stack.data) and n % stack.blocksize == 0:
        return dequantize_stack_triton(stack, dtype)
    return dequantize_stack(stack, dtype)


def grouped_mm_runs(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether torch._grouped_mm takes these: bf16 operands whose rows are 16-byte multiples
    (a [M, K], b [E, K, N]), on CUDA with sm90+ or on the CPU."""
    if a.dtype != torch.bfloat16 or b.dtype != torch.bfloat16:
        return False
    return grouped_mm_takes(a.device, a.dtype, a.shape[-1], b.shape[-1])


def grouped_mm_takes(device: torch.device, dtype: torch.dtype, *widths: int) -> bool:
    """Whether torch._grouped_mm runs on `device` in `dtype` for operands whose rows are these
    widths: bf16, each row a multiple of 16 bytes, CUDA sm90+ or the CPU. Else grouped_mm pads,
    which reads the largest group on the host."""
    if not hasattr(torch, "_grouped_mm") or dtype != torch.bfloat16:
        return False
    if any(w * 2 % 16 for w in widths):
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 9
    return device.type == "cpu"


def padded_grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """grouped_mm as one batched matmul: each expert's rows into a [E, largest group, K] block,
    zero-padded, times b, and back. Any dtype and device; memory E × the largest group's rows."""
    experts = b.shape[0]
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
    starts = offsets - counts
    expert = torch.repeat_interleave(torch.arange(experts, device=a.device), counts,
                                     output_size=a.shape[0])
    slot = torch.arange(a.shape[0], device=a.device) - starts[expert]
    largest = int(counts.max()) if a.shape[0] else 0
    padded = a.new_zeros(experts, largest, a.shape[1])
    padded = padded.index_put((expert, slot), a)
    return torch.bmm(padded, b)[expert, slot]


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """[M, N]: a [M, K] (rows sorted by expert; expert e's rows end at offsets[e], int32)
    times b [E, K, N], expert by expert, in one launch."""
    if grouped_mm_runs(a, b):
        return torch._grouped_mm(a, b, offs=offsets)
    return padded_grouped_mm(a, b, offsets)


# A projection whose experts are this big dense or smaller is dequantized whole, in one run: its
# rows need no host read (a sync each sparse block; no CUDA graph holds one). Qwen3-30B-A3B's
# (gate_up 768, down 384 MiB in bf16) are, for 0.56 GiB more at the peak than runs of 256 MiB,
# and its eager step ran 1.82x as fast (H100, 2026-12-06). A larger one (Mixtral-8x7B's, 1.75 GiB)
# goes in runs of at most EXPERT_CHUNK_BYTES: it reads the host anyway, so bigger runs would
# cost memory for nothing.
WHOLE_PROJECTION_BYTES = 768 * 2**20
EXPERT_CHUNK_BYTES = 256 * 2**20  # the most of a projection's experts dense at once, in runs


def expert_chunks(experts: int, expert_bytes: int) -> tuple[tuple[int, int], ...]:
    """(start, stop) runs of experts: the whole projection in one run up to
    WHOLE_PROJECTION_BYTES dense; else runs as even as can be, each dense in EXPERT_CHUNK_BYTES
    or one expert alone."""
    if experts * expert_bytes <= WHOLE_PROJECTION_BYTES:
        return ((0, experts),)
    per_run = max(1, EXPERT_CHUNK_BYTES // max(1, expert_bytes))
    runs = -(-experts // per_run)
    size = -(-experts // runs)
    return tuple((start, min(start + size, experts)) for start in range(0, experts, size))


def chunk_rows(ends: list[int] | None, chunks) -> tuple[tuple[int, int], ...] | None:
    """Each run's rows (start, stop) in the sorted rows, from `ends` ([0] + the group offsets,
    on the host); None for a single run, which needs none."""
    if len(chunks) == 1:
        return None
    return tuple((ends[start], ends[stop]) for start, stop in chunks)


def chunked_grouped_mm(a: torch.Tensor, offsets: torch.Tensor, chunks, rows,
                       weight: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """grouped_mm(a, b, offsets) where b's experts start … stop − 1 are `weight(start, stop)`,
    made one run at a time and freed before the next."""
    if len(chunks) == 1:
        return grouped_mm(a, weight(*chunks[0]), offsets)
    out = None
    for (start, stop), (first, last) in zip(chunks, rows):
        b = weight(start, stop)
        if out is None:
            out = a.new_empty(a.shape[0], b.shape[-1])
        if last > first:
            out[first:last] = grouped_mm(a[first:last], b, offsets[start:stop] - first)
        del b
    return out


class GroupedBase(torch.autograd.Function):
    """y = x_e @ W_eᵀ for the rows of each expert e (x sorted by expert), W frozen:
    `weights(dtype, start, stop)` makes experts start … stop − 1's [stop − start, out, in]
    (dequantizing a 4-bit stack's members in one batched call), a run of experts at a time
    (`chunks`, from expert_chunks, over `rows`, from chunk_rows); backward calls it again for
    x's gradient, dy_e @ W_e. Only the callable is kept for backward, as Matmul4bit keeps only
    the 4-bit bytes: a checkpoint's rerun then stops before the last GEMM of a layer."""

    @staticmethod
    def forward(ctx, x, offsets, weights: Callable[[torch.dtype, int, int], torch.Tensor],
                chunks: tuple[tuple[int, int], ...], rows: tuple[tuple[int, int], ...] | None):
        ctx.weights, ctx.offsets, ctx.chunks, ctx.rows = weights, offsets, chunks, rows
        return chunked_grouped_mm(x, offsets, chunks, rows,
                                  lambda start, stop: weights(x.dtype, start, stop).transpose(1, 2))

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = chunked_grouped_mm(grad_out.contiguous(), ctx.offsets, ctx.chunks, ctx.rows,
                                        lambda start, stop: ctx.weights(grad_out.dtype, start, stop))
        return grad_x, None, None, None, None
