"""Grouped expert compute for mixture-of-experts blocks: the pieces speed/moe.py puts together.

- `dequantize_stack(stack, dtype)`: every member of a quant.QuantizedStack (every expert's
  weight of one projection) dequantized in one batched computation, [members, out, in], in torch
  ops: bit for bit what bitsandbytes' dequantize_4bit gives member by member (each with its own
  absmax, nested scales and offset). `dequantize_stack_triton` is the same as one Triton kernel
  launch (kernels/dequant.py's kernel with a member index: each member's blocks, nested blocks
  and offset found from its byte offset); `dequantize_experts` picks it where Triton runs.
- `grouped_mm(a, b, offsets)`: rows offsets[e-1]:offsets[e] of `a` (tokens sorted by expert)
  times b[e], for all experts in one launch, by the first of these that runs:
  1. `torch._grouped_mm`: bf16 with rows of 16-byte multiples, on CUDA sm90+ and torch 2.13's
     CPU (cuBLAS/CUTLASS's grouped GEMM: the fastest where it takes the operands).
  2. `triton_grouped_mm` (`TritonGroupedMM` with its backward; kernels/experts_triton.py): any
     dtype and width, on every CUDA GPU (and the CPU under Triton's interpreter, the tests'):
     each expert's exact rows in tiles of BLOCK_M, each tile's expert found on the device from
     the offsets, so no count is read on the host (a CUDA graph holds it) and its work and
     memory are the sorted rows' whatever the routing. The path of GPUs below sm90 (A100, RTX
     3090/4090, L4, L40S) and of fp16/fp32 or narrow rows everywhere.
  3. `padded_grouped_mm`: one batched matmul over the experts' rows padded to the largest group
     (plain PyTorch, the reference): any dtype and device, but it reads the largest group on
     the host (no CUDA graph) and its memory and work grow with the routing's imbalance (E/k x
     the sorted rows where every token goes to the same k experts). The CPU's without Triton.
  `grouped_mm_path` says which for a device, dtype and widths (speed/moe.capture_blocker).
- `GroupedBase`: x @ W_eᵀ over 4-bit (or 16-bit) expert weights, grouped; keeps nothing but the
  weights it was given for backward and dequantizes them again there (as kernels/matmul_4bit.py's
  Matmul4bit): no dense copy of all experts outlives its GEMM. A projection whose experts
  dense pass PART_BYTES goes in parts (`row_parts`): the same range of output rows of every
  expert (`stack_rows`: views of each member's bytes and scales), one dequantize and one grouped
  GEMM over all the rows each, the outputs side by side (backward: the input gradients summed).
  Qwen3-30B-A3B's gate_up, 0.75 GiB dense, in two parts; Mixtral-8x7B's 1.75 GiB in six. No
  part reads the routing on the host, so a CUDA graph holds every projection. Each projection's
  last part made (the whole of Qwen3-30B-A3B's down, the ups' half of its gate_up) keeps its
  dense weight from a checkpoint's rerun for its backward (kernels/kept_weights), which runs
  the parts last first: one dequantize less a projection.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Callable, Hashable

import torch

from qlora.errors import QloraError
from qlora.kernels import kept_weights
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
        MEMBER_BYTES=n // 2, DATA_STRIDE=stack.data.stride(0),
        ABSMAX_STRIDE=stack.absmax.stride(0),
        NESTED_STRIDE=stack.nested_absmax.stride(0) if nested else 1,
        OFFSET_STRIDE=stack.offset.stride(0) if nested else 1,
        BLOCK_BYTES=stack.blocksize // 2, NESTED=nested,
        NESTED_BLOCKSIZE=stack.nested_blocksize, ROWS=TILE_BYTES // cols, COLS=cols,
        NATIVE_ROUNDING=out.device.type == "cuda", num_warps=WARPS, enable_fp_fusion=False)
    return out


def stack_rows(stack, start: int, stop: int, first: int = 0, step: int = 1):
    """Rows start … stop − 1 of members first, first + step, … of a quant.QuantizedStack
    ([out, in] each) as a stack of [stop − start, in] members: views of its bytes and of its
    blocks' scales (a gate_up stack holds each expert's gate and up as members 2e and 2e + 1: its
    gates are first=0, step=2). The rows must begin and end on a block and, with double
    quantization, on a nested group (row_alignment)."""
    out_features, in_features = stack.shape
    begin, end = start * in_features, stop * in_features
    unit = stack.blocksize * (stack.nested_blocksize if stack.nested else 1)
    if begin % unit or (end % unit and stop != out_features):
        raise QloraError(f"rows {start}:{stop} of {out_features}x{in_features} members do not "
                         "begin and end on a quantization block (row_alignment)")
    block, group = stack.blocksize, stack.blocksize * stack.nested_blocksize
    members = slice(first, None, step)
    fields = {name: getattr(stack, name) for name in (
        "blocksize", "dtype", "nested", "nested_blocksize", "code", "nested_code")}
    return SimpleNamespace(
        count=len(range(stack.count)[members]), shape=(stop - start, in_features), **fields,
        data=stack.data[members, begin // 2:-(-end // 2)],
        absmax=stack.absmax[members, begin // block:-(-end // block)],
        nested_absmax=(stack.nested_absmax[members, begin // group:-(-end // group)]
                       if stack.nested else stack.nested_absmax),
        offset=stack.offset[members] if stack.nested else stack.offset)


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
    widths: bf16, each row a multiple of 16 bytes, CUDA sm90+ or the CPU. Else grouped_mm takes
    the Triton kernel where Triton runs, the padded batched matmul elsewhere (grouped_mm_path)."""
    if not hasattr(torch, "_grouped_mm") or dtype != torch.bfloat16:
        return False
    if any(w * 2 % 16 for w in widths):
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 9
    return device.type == "cpu"


def grouped_mm_path(device: torch.device, dtype: torch.dtype, *widths: int) -> str:
    """What grouped_mm runs on `device` for operands in `dtype` whose rows are these widths:
    "torch" (torch._grouped_mm), "triton" (the kernel: any CUDA GPU, or the CPU under Triton's
    interpreter) or "padded" (padded_grouped_mm, which alone reads the largest group on the host:
    no CUDA graph can hold it)."""
    if grouped_mm_takes(device, dtype, *widths):
        return "torch"
    if use_triton(torch.empty(0, device=device)):
        return "triton"
    return "padded"


def looped_grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """grouped_mm as one matmul per expert, a[rows of e] @ b[e]: the plainest reference (it reads
    the offsets on the host and launches E matmuls), which the tests and the GPU checks hold the
    grouped paths to."""
    outs, start = [], 0
    for e, end in enumerate(offsets.tolist()):
        outs.append(a[start:end] @ b[e])
        start = end
    return torch.cat(outs) if outs else a.new_empty(0, b.shape[-1])


def padded_grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """grouped_mm as one batched matmul: each expert's rows into a [E, largest group, K] block,
    zero-padded, times b, and back. Any dtype and device; memory E × the largest group's rows,
    which it reads on the host. The plain PyTorch reference of the other two paths."""
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


# The Triton grouped GEMM's tiles (kernels/experts_triton.py), fixed (no autotuning: a launch
# runs the same program every time, its build made by the first, eager, step before any CUDA
# graph's capture): 64 rows x 128 columns of output a program, the reduction 128 bytes' worth of
# values a step (64 bf16/fp16, 32 fp32), 4 warps, 3 pipeline stages: at most 3 x (64 x 64 +
# 64 x 128) x 2 bytes = 72 KiB of shared memory in any dtype (Triton 3.6's sm80-sm89 builds
# hold two stages' buffers, 48 KiB), within every GPU's from sm80 (sm86/sm89's 99 KiB the
# least). The weight gradient's program: a 64 x 128 tile of [K, N], the expert's rows the same
# 128 bytes' worth a step. A dimension narrower than its block gets the least power of two >= 16
# (tl.dot's least) that holds it: a LoRA rank of 16 is one 16-wide block, not 128 mostly masked
# columns.
BLOCK_M = 64
BLOCK_N = 128
STEP_BYTES = 128
GEMM_WARPS = 4
GEMM_STAGES = 3


def _kernels():
    from qlora.kernels import experts_triton  # imported on first use: see its docstring

    return experts_triton


def _one_dtype(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.dtype != y.dtype:
        raise QloraError(f"the grouped GEMM kernel takes operands of one dtype, not {x.dtype} "
                         f"and {y.dtype}")


def _fit(block: int, width: int) -> int:
    """`block`, or for a narrower dimension the least power of two >= 16 that holds it."""
    return min(block, max(16, 1 << max(width - 1, 0).bit_length()))


def _launch_options(device: torch.device, dtype: torch.dtype) -> dict:
    # fp32 operands multiply as fp32 (IEEE), as torch's matmul does by default (no TF32)
    return dict(PRECISION="ieee" if dtype == torch.float32 else "tf32",
                COMPILED=device.type == "cuda", num_warps=GEMM_WARPS, num_stages=GEMM_STAGES)


def triton_grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """grouped_mm by the Triton kernel, no autograd: [M, N] in a's dtype, a [M, K] and b
    [E, K, N] of any strides (b a transposed view is read in place). The grid is the most row
    tiles any routing of M rows can make, ceil(M / BLOCK_M) + E − 1 (each expert's last tile
    partial, at most M), by column blocks: shapes alone, nothing read on the host."""
    _one_dtype(a, b)
    m, k = a.shape
    experts, _, n = b.shape
    out = a.new_empty(m, n)
    if out.numel() == 0:
        return out
    offsets = offsets.contiguous()
    block_n = _fit(BLOCK_N, n)
    block_k = _fit(STEP_BYTES // a.element_size(), k)
    tiles = min(m, -(-m // BLOCK_M) + experts - 1)
    _kernels().grouped_mm_kernel[(tiles, -(-n // block_n))](
        a, b, offsets, out, n, a.stride(0), a.stride(1), *b.stride(), K=k, E=experts,
        E_PAD=1 << max(experts - 1, 0).bit_length(), BLOCK_M=BLOCK_M, BLOCK_N=block_n,
        BLOCK_K=block_k, **_launch_options(a.device, a.dtype))
    return out


def triton_grouped_weight_grad(a: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor,
                               dtype: torch.dtype) -> torch.Tensor:
    """[E, K, N] in `dtype`: a[rows of e]ᵀ @ grad[rows of e] for each expert e (a [M, K], grad
    [M, N], any strides), by the Triton kernel; zeros for an expert without rows."""
    _one_dtype(a, grad)
    m, k = a.shape
    n, experts = grad.shape[1], offsets.shape[0]
    if m == 0:  # no rows: every expert's product is a sum of nothing
        return torch.zeros(experts, k, n, dtype=dtype, device=a.device)
    out = torch.empty(experts, k, n, dtype=dtype, device=a.device)
    if out.numel() == 0:
        return out
    block_k, block_n = _fit(BLOCK_M, k), _fit(BLOCK_N, n)  # of the [K, N] product a program
    block_m = STEP_BYTES // a.element_size()  # the reduction runs along the rows here
    _kernels().grouped_weight_grad_kernel[(-(-k // block_k) * -(-n // block_n), experts)](
        a, grad, offsets.contiguous(), out, k, n, a.stride(0), a.stride(1), grad.stride(0),
        grad.stride(1), BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n,
        **_launch_options(a.device, a.dtype))
    return out


class TritonGroupedMM(torch.autograd.Function):
    """grouped_mm by the Triton kernels, with its backward: grad_a = the grouped product of the
    output's gradient with each b[e]ᵀ (the same kernel reading b's strides swapped), grad_b =
    each expert's aᵀ @ grad (the weight-gradient kernel), made only where b takes a gradient.
    Keeps a only where b wants a gradient, b only where a does."""

    @staticmethod
    def forward(ctx, a, b, offsets):
        ctx.save_for_backward(a if ctx.needs_input_grad[1] else None,
                              b if ctx.needs_input_grad[0] else None, offsets)
        ctx.b_dtype = b.dtype
        return triton_grouped_mm(a, b, offsets)

    @staticmethod
    def backward(ctx, grad):
        a, b, offsets = ctx.saved_tensors
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = triton_grouped_mm(grad, b.transpose(1, 2), offsets)
        if ctx.needs_input_grad[1]:
            grad_b = triton_grouped_weight_grad(a, grad, offsets, ctx.b_dtype)
        return grad_a, grad_b, None


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """[M, N]: a [M, K] (rows sorted by expert; expert e's rows end at offsets[e], int32,
    offsets[-1] = M) times b [E, K, N], expert by expert, in one launch: torch._grouped_mm where
    it takes them, else the Triton kernel where Triton runs, else the padded batched matmul."""
    if grouped_mm_runs(a, b):
        return torch._grouped_mm(a, b, offs=offsets)
    if a.dtype == b.dtype and use_triton(a):
        return TritonGroupedMM.apply(a, b, offsets)
    return padded_grouped_mm(a, b, offsets)


# The most of a projection's experts made dense at once: a larger one goes in parts, each the same
# range of output rows of every expert (row_parts), one dequantize and one grouped GEMM over all
# the rows each, so no part reads the routing on the host (a CUDA graph holds them all).
# Qwen3-30B-A3B's gate_up (768 MiB dense in bf16) goes in two parts, its down (384 MiB) whole:
# the step's peak 384 MiB lower than whole, which its CUDA graph under a 24 GB cap needs;
# Mixtral-8x7B's gate_up (1.75 GiB) in six parts, its down in three.
PART_BYTES = 384 * 2**20
# torch._grouped_mm takes bf16 operands whose rows are 16-byte multiples: a part's width (its
# output's rows in forward, the input gradient's reduction in backward) is a multiple of 8 rows
GROUPED_MM_ROWS = 8


def row_alignment(in_features: int, blocksize: int | None, nested_blocksize: int | None) -> int:
    """The rows a part of an [out, in] expert weight must be a multiple of: GROUPED_MM_ROWS, and
    for a 4-bit weight (blocksize not None) enough to begin on a quantization block and, with
    double quantization, on a nested group (stack_rows)."""
    if blocksize is None:
        return GROUPED_MM_ROWS
    unit = blocksize * (nested_blocksize or 1)
    return math.lcm(unit // math.gcd(unit, in_features), GROUPED_MM_ROWS)


def row_parts(out_features: int, row_bytes: int, align: int,
              members: int = 1) -> tuple[tuple[int, int], ...]:
    """(start, stop) ranges of a projection's output rows, each of all its experts dense
    (`row_bytes` a row) within PART_BYTES where `align`-row steps allow: the whole projection in
    one where it fits; else each of an expert's `members` weights (gate and up) in parts of its
    own, as even as can be, every boundary a multiple of `align` from the member's first row (a
    member's whole rows where no boundary can be aligned)."""
    if out_features * row_bytes <= PART_BYTES:
        return ((0, out_features),)
    member_rows = out_features // members
    per_member = -(-member_rows * row_bytes // PART_BYTES)
    while True:
        rows_each = -(-member_rows // per_member)
        size = -(-rows_each // align) * align  # rows_each rounded up to the alignment
        if size * row_bytes <= PART_BYTES or size <= align:
            break
        per_member += 1  # rounding up to the alignment passed the budget: one part more
    size = min(size, member_rows)
    return tuple((first + start, first + min(start + size, member_rows))
                 for first in range(0, out_features, member_rows)
                 for start in range(0, member_rows, size))


def projection_parts(num_experts: int, out_features: int, in_features: int, members: int,
                     itemsize: int, blocksize: int | None = None,
                     nested_blocksize: int | None = None) -> tuple[tuple[int, int], ...]:
    """row_parts of a projection of [out, in] expert weights made dense in `itemsize`-byte
    values, aligned for its 4-bit blocks (blocksize None: a 16-bit weight): what the grouped step
    dequantizes at once (speed/moe.expert_parts) and the planner counts (memory/weights)."""
    return row_parts(out_features, num_experts * in_features * itemsize,
                     row_alignment(in_features, blocksize, nested_blocksize), members)


def parted_grouped_mm(a: torch.Tensor, offsets: torch.Tensor, parts,
                      weight: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """grouped_mm(a, b, offsets) where b's columns start … stop − 1 are `weight(start, stop)`
    ([E, K, stop − start]), made one part at a time and freed before the next, each part's
    product written into the output as it comes."""
    if len(parts) == 1:
        return grouped_mm(a, weight(*parts[0]), offsets)
    out = a.new_empty(a.shape[0], parts[-1][1])
    for start, stop in parts:
        out[:, start:stop] = grouped_mm(a, weight(start, stop), offsets)
    return out


class GroupedBase(torch.autograd.Function):
    """y = x_e @ W_eᵀ for the rows of each expert e (x sorted by expert), W frozen:
    `weights(dtype, start, stop)` makes output rows start … stop − 1 of every expert's weight,
    [E, stop − start, in] (dequantizing a 4-bit stack's members in one batched call), a part of
    rows at a time (`parts`, from row_parts); backward calls it again for x's gradient, the sum
    over the parts of dy_e[:, part] @ W_e[part]. Only the callable is kept for backward, as
    Matmul4bit keeps only the 4-bit bytes. One exception, as Matmul4bit's: inside a checkpoint's
    rerun and where x wants a gradient (so a backward runs to take it), the last part made (the
    whole projection where it is made in one) is kept under `key` for the backward
    (kernels/kept_weights), which runs the parts last first and makes none for it: one part a
    projection held from its rerun to its backward, PART_BYTES at most (the planner:
    memory/weights.rerun_expert_dense)."""

    @staticmethod
    def forward(ctx, x, offsets, weights: Callable[[torch.dtype, int, int], torch.Tensor],
                parts: tuple[tuple[int, int], ...], key: Hashable):
        ctx.weights, ctx.offsets, ctx.parts, ctx.key = weights, offsets, parts, key

        def part(start: int, stop: int) -> torch.Tensor:
            dense = weights(x.dtype, start, stop)
            # the last part made is the first its backward uses (it runs the parts backwards);
            # kept only where a backward runs to take it (rows wanting no gradient have none)
            if (start, stop) == parts[-1] and ctx.needs_input_grad[0]:
                kept_weights.keep((key, x.dtype), dense)  # in a rerun: its backward takes it
            return dense.transpose(1, 2)

        return parted_grouped_mm(x, offsets, parts, part)

    @staticmethod
    def backward(ctx, grad_out):
        # what the rerun kept (the last part), taken whether or not x wants a gradient
        kept = kept_weights.take((ctx.key, grad_out.dtype))
        grad_x = None
        if ctx.needs_input_grad[0]:
            for start, stop in reversed(ctx.parts):  # the kept (last) part first, then freed
                weight = kept if kept is not None else ctx.weights(grad_out.dtype, start, stop)
                kept = None  # it serves its one part; held by `weight` alone from here
                part = grouped_mm(grad_out[:, start:stop].contiguous(), weight, ctx.offsets)
                del weight  # the next part's dense weights may take its place
                # each part's product is rounded to the gradient's dtype by its GEMM: each part
                # after the first adds one rounding to the sum, as a GEMM split along K would
                grad_x = part if grad_x is None else grad_x.add_(part)
                del part
        return grad_x, None, None, None, None
