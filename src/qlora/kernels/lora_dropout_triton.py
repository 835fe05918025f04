"""The Triton kernels of kernels/lora_dropout.py (read that module's docstring first).

A module of its own, imported on first use: Triton must not be imported before a test sets
TRITON_INTERPRET=1, and kernels that call other @triton.jit functions need them as module globals.

A tile is BM rows × the QW counters q0..q0+QW−1 of one mask block: one Philox evaluation per
(row, counter) gives the 8 masks of the 8 slots. The forward kernel takes each slot as its own
[BM, QW] piece of x (columns 2048·j + 256·slot + q0 + 0..QW−1, contiguous) and its own small
tl.dot; measured on an H100 on 2026-11-26, arranging the 8 slots side by side in one
[BM, 8·QW] tile cost it more than the Philox rounds (a permutation through shared memory; in
Philox's order, 2-byte gathers, worse). The backward kernels use that side-by-side tile
(keep_bits) all the same: they carry partial sums per slot through a loop, which the per-slot
form could only do as a tuple of 8 per adapter, unrolled: a minute to compile, and slower.
"""

import triton
import triton.language as tl


@triton.jit
def pick(i: tl.constexpr, first, second, third):
    """The i-th of three values, which must be of one type: the compiler (not the interpreter)
    types every return, even those `i` rules out, and refuses two types. So the kernels pick
    seed + salt, int64 whatever each salt was launched as (int32, int64 from 2^31, or the
    constant 1), never the bare salts (tests/test_triton_builds.py)."""
    if i == 0:
        return first
    elif i == 1:
        return second
    return third


@triton.jit
def slot_bits(lanes0, lanes1, lanes2, lanes3, slot: tl.constexpr):
    """The 16-bit values slot `slot` reads: half slot % 2 of lane slot // 2 (kernels/dropout.py)."""
    if slot // 2 == 0:
        lane = lanes0
    elif slot // 2 == 1:
        lane = lanes1
    elif slot // 2 == 2:
        lane = lanes2
    else:
        lane = lanes3
    return (lane >> (16 * (slot % 2))) & 0xFFFF


@triton.jit
def lora_dropout_down(x_ptr, a0, a1, a2, out_ptr, seed_ptr, salt0, salt1, salt2, scale0, scale1,
                      scale2, threshold, rows_n, width, per_row, tiles, tiles_per_split, r,
                      N: tl.constexpr, R: tl.constexpr, BM: tl.constexpr, QW: tl.constexpr,
                      ROUNDS: tl.constexpr):
    """Program (row block, split): the fp32 partial products of its tiles, [BM, n·r], into
    out[split]."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    split = tl.program_id(1)
    row_ok = rows < rows_n
    rank = tl.arange(0, R)
    t = tl.arange(0, QW)
    seed = tl.load(seed_ptr)
    acc0 = tl.zeros([BM, R], dtype=tl.float32)
    acc1 = tl.zeros([BM, R], dtype=tl.float32)
    acc2 = tl.zeros([BM, R], dtype=tl.float32)
    tile = split * tiles_per_split
    end = tl.minimum(tile + tiles_per_split, tiles)
    while tile < end:  # `while`: Triton's interpreter cannot loop `for` to a runtime bound
        j, q0 = tile // (256 // QW), (tile % (256 // QW)) * QW
        counters = (rows * per_row + j)[:, None] * 256 + q0 + t[None, :]
        for i in tl.static_range(N):
            l0, l1, l2, l3 = tl.randint4x(pick(i, seed + salt0, seed + salt1, seed + salt2),
                                          counters, n_rounds=ROUNDS)
            a_ptr = pick(i, a0, a1, a2)
            for slot in tl.static_range(8):
                cols = j * 2048 + slot * 256 + q0 + t
                col_ok = cols < width
                x = tl.load(x_ptr + rows[:, None] * width + cols[None, :],
                            mask=row_ok[:, None] & col_ok[None, :], other=0.0)
                kept = tl.where(slot_bits(l0, l1, l2, l3, slot) >= threshold, x, 0.0).to(x.dtype)
                a = tl.load(a_ptr + rank[None, :] * width + cols[:, None],
                            mask=(rank < r)[None, :] & col_ok[:, None], other=0.0)
                product = tl.dot(kept, a.to(x.dtype))
                if i == 0:
                    acc0 += product
                elif i == 1:
                    acc1 += product
                else:
                    acc2 += product
        tile += 1
    for i in tl.static_range(N):
        out = pick(i, acc0, acc1, acc2) * pick(i, scale0, scale1, scale2)
        tl.store(out_ptr + (split * rows_n + rows[:, None]) * (N * r) + i * r + rank[None, :],
                 out, mask=row_ok[:, None] & (rank < r)[None, :])


@triton.jit
def keep_bits(key, blocks, q0, QW: tl.constexpr, ROUNDS: tl.constexpr):
    """[BM, 8·QW] 16-bit values, slot-major: column slot·QW + t of row m is element (slot, q0 + t)
    of mask block blocks[m]. (The backward kernels' layout: their per-slot form, with 8 partial
    sums per adapter carried through a loop, compiled for a minute and ran slower.)"""
    counters = blocks[:, None] * 256 + q0 + tl.arange(0, QW)[None, :]
    l0, l1, l2, l3 = tl.randint4x(key, counters, n_rounds=ROUNDS)
    pair_a = tl.join(tl.join(l0 & 0xFFFF, l0 >> 16), tl.join(l1 & 0xFFFF, l1 >> 16))
    pair_b = tl.join(tl.join(l2 & 0xFFFF, l2 >> 16), tl.join(l3 & 0xFFFF, l3 >> 16))
    # [BM, QW, half, lane % 2, lane // 2] -> [BM, lane // 2, lane % 2, half, QW]: slot-major
    both = tl.permute(tl.join(pair_a, pair_b), (0, 4, 3, 2, 1))
    return tl.reshape(both, (blocks.shape[0], 8 * QW))


@triton.jit
def tile_columns(tile, QW: tl.constexpr):
    """Tile `tile` of a row: block j, first counter q0, its 8·QW matrix columns (slot-major)."""
    c = tl.arange(0, 8 * QW)
    j, q0 = tile // (256 // QW), (tile % (256 // QW)) * QW
    return j, q0, j * 2048 + (c // QW) * 256 + q0 + c % QW


@triton.jit
def lora_dropout_up_grad(gh_ptr, a0, a1, a2, dx_ptr, seed_ptr, salt0, salt1, salt2, scale0,
                         scale1, scale2, threshold, rows_n, width, per_row, r,
                         N: tl.constexpr, R: tl.constexpr, BM: tl.constexpr, QW: tl.constexpr,
                         ROUNDS: tl.constexpr):
    """Program (row block, tile): ∂x's [BM, 8·QW] tile, Σ_i masked ∂H_i·A_i."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    row_ok = rows < rows_n
    rank = tl.arange(0, R)
    j, q0, cols = tile_columns(tl.program_id(1), QW)
    col_ok = cols < width
    seed = tl.load(seed_ptr)
    total = tl.zeros([BM, 8 * QW], dtype=tl.float32)
    for i in tl.static_range(N):
        gh = tl.load(gh_ptr + rows[:, None] * (N * r) + i * r + rank[None, :],
                     mask=row_ok[:, None] & (rank < r)[None, :], other=0.0)
        a = tl.load(pick(i, a0, a1, a2) + rank[:, None] * width + cols[None, :],
                    mask=(rank < r)[:, None] & col_ok[None, :], other=0.0)
        part = tl.dot(gh, a.to(gh.dtype))
        key = pick(i, seed + salt0, seed + salt1, seed + salt2)
        bits = keep_bits(key, rows * per_row + j, q0, QW, ROUNDS)
        total += tl.where(bits >= threshold, part * pick(i, scale0, scale1, scale2), 0.0)
    tl.store(dx_ptr + rows[:, None] * width + cols[None, :],
             total.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def lora_dropout_down_grad(x_ptr, gh_ptr, ws_ptr, seed_ptr, salt0, salt1, salt2, scale0, scale1,
                           scale2, threshold, rows_n, width, per_row, r, chunk_rows,
                           N: tl.constexpr, R: tl.constexpr, BM: tl.constexpr, QW: tl.constexpr,
                           ROUNDS: tl.constexpr):
    """Program (row chunk, tile): each adapter's ∂A partial over the chunk, ws[chunk, i]."""
    chunk = tl.program_id(0)
    rank = tl.arange(0, R)
    j, q0, cols = tile_columns(tl.program_id(1), QW)
    col_ok = cols < width
    seed = tl.load(seed_ptr)
    for i in tl.static_range(N):
        key = pick(i, seed + salt0, seed + salt1, seed + salt2)
        acc = tl.zeros([R, 8 * QW], dtype=tl.float32)
        start = 0
        while start < chunk_rows:  # `while`: the interpreter cannot loop `for` to a runtime bound
            rows = chunk * chunk_rows + start + tl.arange(0, BM)
            row_ok = rows < rows_n
            x = tl.load(x_ptr + rows[:, None] * width + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            bits = keep_bits(key, rows * per_row + j, q0, QW, ROUNDS)
            x = tl.where(bits >= threshold, x, 0.0).to(x.dtype)
            gh = tl.load(gh_ptr + rows[:, None] * (N * r) + i * r + rank[None, :],
                         mask=row_ok[:, None] & (rank < r)[None, :], other=0.0)
            acc += tl.dot(tl.trans(gh), x)
            start += BM
        acc = acc * pick(i, scale0, scale1, scale2)
        tl.store(ws_ptr + ((chunk * N + i) * r + rank[:, None]) * width + cols[None, :], acc,
                 mask=(rank < r)[:, None] & col_ok[None, :])
