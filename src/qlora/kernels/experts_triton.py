"""The Triton kernels of kernels/experts.py's grouped GEMM (`triton_grouped_mm`, which documents
them): a module of its own, imported on first use (as kernels/routing_triton.py), since Triton must
not be imported before a test sets TRITON_INTERPRET=1.

Rows are sorted by expert; expert e's rows end at offsets[e] (int32 [E], cumulative). Each
expert's rows are cut into tiles of BLOCK_M rows (an expert's last tile partial, an empty expert
none), numbered expert by expert; a program of `grouped_mm_kernel` finds its tile's expert and
first row from the offsets alone (expert_tile), so the launch needs no count from the host: its
grid is the most tiles any routing of M rows over E experts can make, and the programs past the
real tiles return at once. `grouped_weight_grad_kernel` (b's gradient) runs a program per tile of
[K, N] and expert, which sums that expert's rows BLOCK_M at a time (no count read either: its
loop runs between the expert's two offsets).

COMPILED is on for a CUDA launch; off, the same code runs in Triton's interpreter (the tests):
bf16 rounded to nearest by `rounded`, tl.dot's operands widened to fp32 (`operand`), the rows'
loop a `while`.
"""

import triton
import triton.language as tl

from qlora.kernels.routing_triton import rounded


@triton.jit
def operand(x, COMPILED: tl.constexpr):
    """x as tl.dot takes it: as it is on the GPU; in fp32 in Triton's interpreter, whose dot
    would multiply bf16's stored bits as integers (the products are the same: two bf16 or fp16
    values multiply exactly in fp32, and the sums are fp32 either way)."""
    if not COMPILED:
        x = x.to(tl.float32)
    return x


@triton.jit
def expert_tile(offsets_ptr, tile, E: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """(expert, first row, end row) of row tile `tile`: each expert's ceil(rows / BLOCK_M) tiles
    one after the other in expert order (an empty expert has none); expert >= E past the last."""
    lanes = tl.arange(0, E_PAD)
    inside = lanes < E
    ends = tl.load(offsets_ptr + lanes, mask=inside, other=0)
    starts = tl.load(offsets_ptr + lanes - 1, mask=inside & (lanes > 0), other=0)
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M  # 0 on the lanes past E
    tile_ends = tl.cumsum(tiles, axis=0)
    # the experts whose tiles all come before this one: its expert's index (E_PAD past the end)
    expert = tl.sum((tile_ends <= tile).to(tl.int32), axis=0)
    mine = lanes == expert
    first_tile = tl.sum(tl.where(mine, tile_ends - tiles, 0), axis=0)
    start = tl.sum(tl.where(mine, starts, 0), axis=0)
    end = tl.sum(tl.where(mine, ends, 0), axis=0)
    return expert, start + (tile - first_tile) * BLOCK_M, end


@triton.jit
def grouped_mm_kernel(a_ptr, b_ptr, offsets_ptr, out_ptr, N, stride_am, stride_ak, stride_be,
                      stride_bk, stride_bn, K: tl.constexpr, E: tl.constexpr, E_PAD: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      PRECISION: tl.constexpr, COMPILED: tl.constexpr):
    """out[rows of e, cols] = a[rows of e] @ b[e][:, cols] for program (row tile, column block):
    a [M, K] and b [E, K, N] of any strides, out [M, N] contiguous; fp32 sums, rounded once.
    K is a constant (a model's few widths, a build each): a `for` to it is pipelined on the GPU
    and runs in Triton's interpreter, which cannot loop `for` to a runtime bound."""
    expert, first, end = expert_tile(offsets_ptr, tl.program_id(0), E, E_PAD, BLOCK_M)
    if expert >= E:  # past the real tiles
        return
    rows = first + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_in = rows < end
    col_in = cols < N
    a_at = a_ptr + rows.to(tl.int64)[:, None] * stride_am + ks[None, :] * stride_ak
    b_at = (b_ptr + expert.to(tl.int64) * stride_be + ks[:, None] * stride_bk
            + cols[None, :] * stride_bn)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_in = ks < K - k0
        x = tl.load(a_at, mask=row_in[:, None] & k_in[None, :], other=0.0)
        w = tl.load(b_at, mask=k_in[:, None] & col_in[None, :], other=0.0)
        acc = tl.dot(operand(x, COMPILED), operand(w, COMPILED), acc,
                     input_precision=PRECISION)
        a_at += BLOCK_K * stride_ak
        b_at += BLOCK_K * stride_bk
    out_at = out_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(out_at, rounded(acc, out_ptr.dtype.element_ty, COMPILED),
             mask=row_in[:, None] & col_in[None, :])


@triton.jit
def weight_grad_step(acc, a_ptr, g_ptr, m0, end, ks, cols, k_in, col_in, stride_am, stride_ak,
                     stride_gm, stride_gn, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr,
                     COMPILED: tl.constexpr):
    """acc + a[rows]ᵀ @ g[rows] for rows m0 … m0 + BLOCK_M − 1 before `end`."""
    rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_in = rows < end
    # a's rows read as columns: the [BLOCK_K, BLOCK_M] tile of aᵀ
    x = tl.load(a_ptr + rows[None, :] * stride_am + ks[:, None] * stride_ak,
                mask=k_in[:, None] & row_in[None, :], other=0.0)
    y = tl.load(g_ptr + rows[:, None] * stride_gm + cols[None, :] * stride_gn,
                mask=row_in[:, None] & col_in[None, :], other=0.0)
    return tl.dot(operand(x, COMPILED), operand(y, COMPILED), acc, input_precision=PRECISION)


@triton.jit
def grouped_weight_grad_kernel(a_ptr, g_ptr, offsets_ptr, out_ptr, K, N, stride_am, stride_ak,
                               stride_gm, stride_gn, BLOCK_M: tl.constexpr,
                               BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                               PRECISION: tl.constexpr, COMPILED: tl.constexpr):
    """out[e, ks, cols] = a[rows of e, ks]ᵀ @ g[rows of e, cols] for program (tile of [K, N],
    expert): a [M, K], g [M, N] of any strides, out [E, K, N] contiguous; the expert's rows
    BLOCK_M at a time, summed in fp32 and rounded once (an expert without rows: zeros)."""
    k_blocks = tl.cdiv(K, BLOCK_K)
    # ks and cols in int64: they index a's and g's whole width, so a column-major a or g
    # (stride_ak or stride_gn = M) puts them M·K or M·N elements in, which passes int32
    ks = ((tl.program_id(0) % k_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    cols = ((tl.program_id(0) // k_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    expert = tl.program_id(1)
    start = tl.load(offsets_ptr + expert - 1, mask=expert > 0, other=0)
    end = tl.load(offsets_ptr + expert)
    k_in = ks < K
    col_in = cols < N
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    if COMPILED:  # a `for` to a runtime bound: the GPU's software pipeline overlaps its loads
        for m0 in range(start, end, BLOCK_M):
            acc = weight_grad_step(acc, a_ptr, g_ptr, m0, end, ks, cols, k_in, col_in,
                                   stride_am, stride_ak, stride_gm, stride_gn, BLOCK_M,
                                   PRECISION, COMPILED)
    else:  # the same rows by `while`: Triton's interpreter cannot loop `for` to a runtime bound
        m0 = start
        while m0 < end:
            acc = weight_grad_step(acc, a_ptr, g_ptr, m0, end, ks, cols, k_in, col_in,
                                   stride_am, stride_ak, stride_gm, stride_gn, BLOCK_M,
                                   PRECISION, COMPILED)
            m0 += BLOCK_M
    out_at = out_ptr + expert.to(tl.int64) * K * N + ks[:, None] * N + cols[None, :]
    tl.store(out_at, rounded(acc, out_ptr.dtype.element_ty, COMPILED),
             mask=k_in[:, None] & col_in[None, :])
