"""The k-quants Q2_K, Q3_K, Q4_K, Q5_K and Q6_K in numpy (the gguf package only dequantizes them).

A super-block is QK_K = 256 consecutive values of one row, split into sub-blocks that each get a
scale (and, for the asymmetric types, a min); the sub-block scales are themselves quantized against
one or two f16 super-block scales. The byte layouts are the ones gguf.quants.*.dequantize_blocks
read (and ggml's block_q*_K structs):

  type  bytes  sub-blocks  value                       codes q        sub-block scales
  Q2_K    84   16 × 16     d·sc·q − dmin·m             [0, 3]         4-bit sc, 4-bit m
  Q3_K   110   16 × 16     d·(sc−32)·q                 [−4, 3]        6-bit, offset 32
  Q4_K   144    8 × 32     d·sc·q − dmin·m             [0, 15]        6-bit sc, 6-bit m
  Q5_K   176    8 × 32     d·sc·q − dmin·m             [0, 31]        6-bit sc, 6-bit m
  Q6_K   210   16 × 16     d·sc·q                      [−32, 31]      int8

Where each field sits in the bytes is written out in the pack_* functions below.

How the scales are chosen (ours, in the spirit of ggml's make_qkx2_quants / make_qx_quants): per
sub-block a small grid of candidate scales around the one that maps the sub-block's range onto the
codes; each candidate's codes are refitted by weighted least squares (scale, and min for the
asymmetric types) and the candidate with the least weighted squared error is kept. The weights
are 1 (plain squared error) unless an importance matrix gives each input column its mean squared
activation: the error a weight error δ causes in a linear layer's output is δ·x, so its expected
square is δ²·E[x²] when activations are uncorrelated — the quantity to minimise. Then the
sub-block scales are rounded to their stored bits and every value is re-coded, round to nearest,
against the scales as stored (the best codes for those scales: values are independent).

The search is written twice: plainly, one sub-block per row (the definition, kept as the
reference: codes(..., plain=True)), and transposed for speed, with every float32 operation the same
and in the same order, so that the bytes are the same (see "sub-block scales, fast"). A tensor is cut
into chunks of CHUNK_BLOCKS super-blocks (the temporaries stay near the core); the export runs them
on worker processes (Workers), reading and writing the tensor through mapped files. The same
workers encode the types the gguf package quantizes itself (F16, BF16, Q8_0, Q4_0, …: submit_gguf),
a tensor's whole rows per task through the same mapped files: the machinery below
(_submit_mapped, _encode_mapped, Pending, in_order) knows no type.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

QK_K = 256
# super-blocks per task: 131k values, whose ~10 temporaries of 0.5 MB stay near the core (L2/L3);
# larger chunks spill to memory, smaller ones spend more of their time in numpy's per-call work
CHUNK_BLOCKS = 512
# chunks per worker-process task: few enough messages through the pool's one pipe
TASK_CHUNKS = 8
# values queued on the workers before the export waits for the oldest tensor (256 MB of float32):
# enough that the small tensors of a layer (attn_k, attn_v: 4 tasks) never leave workers idle
IN_FLIGHT_VALUES = 1 << 26


@dataclass(frozen=True)
class Kind:
    """The arithmetic of one k-quant type."""

    name: str
    block_bytes: int
    sub: int  # values per sub-block
    low: int  # smallest code
    high: int  # largest code
    symmetric: bool  # value = s·q (signed q) rather than s·q − m (q ≥ 0)
    scale_levels: int  # stored sub-block scales: 0…levels (asymmetric), −levels…levels−1 (symmetric)
    grid: tuple[float, ...]  # candidate offsets, in code steps, of the range-filling scale


def _steps(lo: float, hi: float) -> tuple[float, ...]:
    return tuple(np.round(np.arange(lo, hi + 1e-9, 0.1), 6))


KINDS = {
    # Q2_K has four codes: a step of the grid moves the scale by up to a third, so search finer
    # around larger scales (fewer values clipped) than smaller ones.
    "Q2_K": Kind("Q2_K", 84, 16, 0, 3, False, 15, _steps(-0.5, 1.0)),  # 4-bit scales and mins
    "Q3_K": Kind("Q3_K", 110, 16, -4, 3, True, 32, _steps(-0.9, 0.9)),  # 6 bits, offset 32
    "Q4_K": Kind("Q4_K", 144, 32, 0, 15, False, 63, _steps(-1.0, 1.0)),  # 6-bit scales and mins
    "Q5_K": Kind("Q5_K", 176, 32, 0, 31, False, 63, _steps(-1.0, 1.0)),
    "Q6_K": Kind("Q6_K", 210, 16, -32, 31, True, 128, _steps(-0.9, 0.9)),  # int8
}


def _f16(x: np.ndarray) -> np.ndarray:
    """Round to what an f16 field stores, back in f32."""
    return x.astype(np.float16).astype(np.float32)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b, and 0 where b is 0 (an all-zero sub-block has scale 0, not NaN)."""
    ok = b != 0
    return np.where(ok, a / np.where(ok, b, 1.0), 0.0).astype(np.float32)


# --- sub-block scales, plain: the search as written, one sub-block per row ------------------------
def _fit_asymmetric_plain(x: np.ndarray, w: np.ndarray, kind: Kind) -> tuple[np.ndarray, np.ndarray]:
    """Per sub-block (…, L) scale s ≥ 0 and min m ≥ 0 with x ≈ s·q − m, q ∈ [0, high], minimising
    Σ w·(s·q − m − x)². The min is kept ≥ 0 (the stored min is unsigned), so 0 stays
    representable exactly: a sub-block of positive values is coded from 0 up."""
    lo = np.minimum(x.min(-1), 0.0)
    span = x.max(-1) - lo
    best_s, best_m = span / kind.high, -lo
    q = np.clip(np.rint((x - lo[..., None]) * _safe_div(1.0, best_s)[..., None]), 0, kind.high)
    best_err = (w * (best_s[..., None] * q - best_m[..., None] - x) ** 2).sum(-1)
    sw, sx = w.sum(-1), (w * x).sum(-1)
    for offset in kind.grid:
        iscale = _safe_div(kind.high + offset, span)
        q = np.clip(np.rint((x - lo[..., None]) * iscale[..., None]), 0, kind.high)
        wq = w * q
        sq, sqq, sqx = wq.sum(-1), (wq * q).sum(-1), (wq * x).sum(-1)
        det = sw * sqq - sq * sq
        s = _safe_div(sw * sqx - sq * sx, det)
        b = np.minimum(_safe_div(sqq * sx - sq * sqx, det), 0.0)  # x ≈ s·q + b with b ≤ 0
        s = np.where(b == 0, _safe_div(sqx, sqq), s)  # min clamped to 0: refit the scale alone
        s = np.maximum(s, 0.0)
        err = (w * (s[..., None] * q + b[..., None] - x) ** 2).sum(-1)
        better = (err < best_err) & (det > 0)
        best_s = np.where(better, s, best_s)
        best_m = np.where(better, -b, best_m)
        best_err = np.where(better, err, best_err)
    return best_s.astype(np.float32), best_m.astype(np.float32)


def _fit_symmetric_plain(x: np.ndarray, w: np.ndarray, kind: Kind) -> np.ndarray:
    """Per sub-block (…, L) signed scale s with x ≈ s·q, q ∈ [low, high] = [−n, n−1], minimising
    Σ w·(s·q − x)². The value of largest magnitude is mapped near −n, the side with one more
    code, so the sign of s follows it."""
    idx = np.abs(x).argmax(-1)
    vmax = np.take_along_axis(x, idx[..., None], -1)[..., 0]
    best_s = np.zeros(x.shape[:-1], dtype=np.float32)
    best_err = (w * x * x).sum(-1)
    n = -kind.low
    for offset in kind.grid:
        iscale = _safe_div(-(n + offset), vmax)
        q = np.clip(np.rint(x * iscale[..., None]), kind.low, kind.high)
        wq = w * q
        s = _safe_div((wq * x).sum(-1), (wq * q).sum(-1))
        err = (w * (s[..., None] * q - x) ** 2).sum(-1)
        better = err < best_err
        best_s = np.where(better, s, best_s)
        best_err = np.where(better, err, best_err)
    return best_s.astype(np.float32)


# --- sub-block scales, fast: the same arithmetic, one row per value position ---------------------
# Profiled on 256 × 4096 slices of random weights, the plain search spends its time in numpy's
# per-row work: reductions over rows of 16 or 32 values, broadcasts along them, np.where on random
# masks, on temporaries of ~1M values that do not stay in cache. The fast search lays a chunk out transposed,
# (L, sub-blocks): every per-value step is one long contiguous loop, every per-sub-block step works
# on contiguous vectors, each candidate's results go into a row of a table and the winner is picked
# once at the end. Every value is computed by the same float32 operations in the same order as the
# plain search (sums included: see _RowSums), so the bytes are equal; tests/test_export_kquants.py
# compares both on random tensors with and without importance weights.

# numpy sums a contiguous run of n ≤ 128 float32 values (a.sum(-1) over a sub-block) pairwise:
# eight partial sums r_j = a_j + a_{j+8} + a_{j+16} + …, then ((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7)),
# added to the identity 0. Storing the value positions of each run of eight in this order makes
# every level of that tree "first half + second half" of the rows.
_TREE_ORDER = (0, 4, 2, 6, 1, 5, 3, 7)


def position_order(sub: int) -> np.ndarray:
    """The value positions of a sub-block in the order the by-position layout stores its rows."""
    return (np.arange(sub).reshape(-1, 8)[:, _TREE_ORDER]).ravel()


def _by_position(a: np.ndarray, sub: int) -> np.ndarray:
    """(…, sub) → (sub, n) contiguous: row e holds every sub-block's value e (rows in tree order)."""
    return np.ascontiguousarray(a.reshape(-1, sub).T[position_order(sub)])


class _RowSums:
    """Σ over the rows of a (sub, n) array, bit for bit what a.sum(-1) gives on the (n, sub) original."""

    def __init__(self, n: int):
        self.partial = np.empty((8, n), dtype=np.float32)
        self.zeros = np.zeros(n, dtype=np.float32)  # arrays, not scalars: numpy's scalar path is slower

    def __call__(self, a: np.ndarray) -> np.ndarray:
        r = self.partial
        np.add(a[0:8], a[8:16], out=r)
        for i in range(16, a.shape[0], 8):
            r += a[i:i + 8]
        half = r[0:4] + r[4:8]
        quarter = half[0:2] + half[2:4]
        total = quarter[0] + quarter[1]
        return np.add(total, self.zeros, out=total)  # the identity: −0 becomes +0 as in numpy


def _divide(a, b: np.ndarray) -> np.ndarray:
    """_safe_div's values (same dtypes, so the same roundings) without its two np.where: a / b,
    then 0 where b == 0, which is rare in real weights. Runs under np.errstate(all="ignore")."""
    out = np.divide(a, b)
    zero = b == 0
    if zero.any():
        out[..., zero] = 0
    return out.astype(np.float32, copy=False)


def _pick(errs: np.ndarray, bad: np.ndarray, *tables: np.ndarray) -> list[np.ndarray]:
    """Row by column of `tables` (steps, n): the plain search replaces its best only by a strictly
    smaller error, so it ends on the first row reaching the least error, never on a `bad` candidate
    (rows 1…) nor on a NaN error, and never leaves a NaN starting error (row 0)."""
    assert len(errs) < 64  # the row numbers below fit beside the +64
    errs[1:][bad | np.isnan(errs[1:])] = np.inf
    least = np.minimum.reduce(errs, axis=0)
    reached = errs == least
    reached[0] |= np.isnan(errs[0])
    # the first reaching row as a minimum, in uint8 (fast): rows that do not reach count 64 more
    key = np.logical_not(reached).view(np.uint8) * np.uint8(64)
    key += np.arange(len(errs), dtype=np.uint8)[:, None]
    n = errs.shape[1]
    flat = np.minimum.reduce(key, axis=0).astype(np.intp) * n + np.arange(n)
    return [np.take(t, flat) for t in tables]


@contextmanager
def _short_buffers(n: int):
    """numpy's ufunc buffer no longer than a row: a (sub, n) × (n,) broadcast then runs as fast as
    a plain loop (with the default 8192 > n, numpy copies it through its buffer first)."""
    old = np.setbufsize(max(16, min(n, 8192) // 16 * 16))  # numpy takes multiples of 16
    try:
        yield
    finally:
        np.setbufsize(old)


def _candidate_scales(kind: Kind, lead: float, sign: float, divisor: np.ndarray) -> np.ndarray:
    """(steps, n) float32: the plain search's _safe_div(sign·(lead + offset), divisor) for every
    offset of the grid, in the dtype numpy gives that scalar-by-array division (float64 under
    numpy 2's promotion rules, float32 under numpy 1's), so that the roundings are the same."""
    steps = [sign * (lead + offset) for offset in kind.grid]
    dtype = np.result_type(steps[0], divisor)
    return _divide(np.array(steps, dtype=dtype)[:, None], divisor.astype(dtype))


def _fit_asymmetric(x: np.ndarray, rows: np.ndarray, w: np.ndarray | None,
                    kind: Kind) -> tuple[np.ndarray, np.ndarray]:
    """_fit_asymmetric_plain's (scales, mins), bit for bit, for x by position (L, n) (the same
    values as `rows` (n, L)); w likewise, None for all ones."""
    n = x.shape[1]
    total = _RowSums(n)
    zeros = total.zeros
    # minimum(min, 0) is +0 for either zero; a zero maximum keeps the sign numpy's own order gives
    lo = np.minimum(np.minimum.reduce(x, axis=0), zeros)
    top = np.maximum.reduce(x, axis=0)
    zero_top = top == 0
    if zero_top.any():
        top[zero_top] = rows[zero_top].max(-1)
    span = top - lo
    high = np.full_like(x, kind.high)
    xl = x - lo
    q, t = np.empty_like(x), np.empty_like(x)
    wq = q if w is None else np.empty_like(x)

    def codes_for(iscale: np.ndarray, offset: float) -> None:  # q = clip(rint(xl·iscale), 0, high)
        np.multiply(xl, iscale, out=q)  # ≥ 0
        np.rint(q, out=q)
        # xl ≤ span, so xl·iscale ≤ (high + offset)(1 + 6e-7): below high + ½ the clip changes nothing
        if offset > 0.5 - 1e-3:
            np.minimum(q, high, out=q)
        if w is not None:
            np.multiply(w, q, out=wq)

    def error(s: np.ndarray, b: np.ndarray) -> np.ndarray:  # Σ w·((s·q + b) − x)²
        np.multiply(s, q, out=t)
        np.add(t, b, out=t)
        np.subtract(t, x, out=t)
        np.multiply(t, t, out=t)
        if w is not None:
            np.multiply(t, w, out=t)
        return total(t)

    steps = len(kind.grid) + 1
    errs, scales, mins = (np.empty((steps, n), dtype=np.float32) for _ in range(3))
    scales[0], mins[0] = span / kind.high, -lo
    codes_for(_divide(1.0, scales[0]), 0.0)
    errs[0] = error(scales[0], lo)  # (s·q + lo) − x is the plain (s·q − m) − x with m = −lo
    sw = np.float32(kind.sub) if w is None else total(w)
    sx = total(x) if w is None else total(w * x)
    iscales = _candidate_scales(kind, kind.high, 1.0, span)
    dets = np.empty((steps - 1, n), dtype=np.float32)
    for c, offset in enumerate(kind.grid, 1):
        codes_for(iscales[c - 1], offset)
        sq = total(wq)
        # Σq² of integer codes is exact in any order (< 2^24): one einsum pass, not two
        sqq = np.einsum("ij,ij->j", q, q) if w is None else total(np.multiply(wq, q, out=t))
        sqx = total(np.multiply(wq, x, out=t))
        det = np.subtract(sw * sqq, sq * sq, out=dets[c - 1])
        # where det ≤ 0 the plain search never keeps the candidate (_pick), so plain division is
        # enough; where det > 0, sqq > 0 too (w ≥ 0)
        s = (sw * sqx - sq * sx) / det
        b = np.minimum((sqq * sx - sq * sqx) / det, zeros)  # x ≈ s·q + b with b ≤ 0
        alone = b == 0  # min clamped to 0: refit the scale alone
        if alone.any():
            s[alone] = sqx[alone] / sqq[alone]
        s = np.maximum(s, zeros, out=scales[c])
        np.negative(b, out=mins[c])
        errs[c] = error(s, b)
    return tuple(_pick(errs, ~(dets > 0), scales, mins))


def _fit_symmetric(x: np.ndarray, rows: np.ndarray, w: np.ndarray | None, kind: Kind) -> np.ndarray:
    """_fit_symmetric_plain's scales, bit for bit, for x by position (L, n) (the same values as
    `rows` (n, L)); w likewise, None for all ones."""
    n = x.shape[1]
    total = _RowSums(n)
    # the value of largest magnitude: the largest or the smallest value; where both reach it
    # (±v, or all zero) the plain search takes the first in its order, so ask it there
    top, bottom = np.maximum.reduce(x, axis=0), np.minimum.reduce(x, axis=0)
    vmax = np.where(top > -bottom, top, bottom)
    tie = top == -bottom
    if tie.any():
        part = rows[tie]
        vmax[tie] = np.take_along_axis(part, np.abs(part).argmax(-1)[:, None], -1)[:, 0]
    q, t = np.empty_like(x), np.empty_like(x)
    wq = q if w is None else np.empty_like(x)
    steps = len(kind.grid) + 1
    errs, scales = np.empty((steps, n), dtype=np.float32), np.zeros((steps, n), dtype=np.float32)
    errs[0] = total(x * x if w is None else w * x * x)
    iscales = _candidate_scales(kind, -kind.low, -1.0, vmax)
    high = np.full_like(x, kind.high)
    for c, offset in enumerate(kind.grid, 1):
        np.multiply(x, iscales[c - 1], out=q)
        np.rint(q, out=q)
        # |x| ≤ |vmax|, so |x·iscale| ≤ (n + offset)(1 + 6e-7) with n = −low = high + 1: each
        # clip changes nothing until that bound passes its side's code by ½
        if offset > 0.5 - 1e-3:
            np.clip(q, kind.low, kind.high, out=q)
        elif offset > -0.5 - 1e-3:
            np.minimum(q, high, out=q)
        if w is not None:
            np.multiply(w, q, out=wq)
        sqx = total(np.multiply(wq, x, out=t))
        sqq = np.einsum("ij,ij->j", q, q) if w is None else total(np.multiply(wq, q, out=t))
        s = _divide(sqx, sqq)
        scales[c] = s
        np.multiply(s, q, out=t)
        np.subtract(t, x, out=t)
        np.multiply(t, t, out=t)
        if w is not None:
            np.multiply(t, w, out=t)
        errs[c] = total(t)
    return _pick(errs, np.zeros((steps - 1, n), dtype=bool), scales)[0]


# --- codes: the fields of the blocks ------------------------------------------------------------
def codes(x: np.ndarray, kind_name: str, weights: np.ndarray | None = None,
          plain: bool = False) -> dict[str, np.ndarray]:
    """The fields of `kind_name` blocks for x (n_blocks, 256), all as numbers (not yet bytes):
    asymmetric types d, dmin (n,) f32 holding f16 values, sc, m (n, S) ints, q (n, S, L) ints;
    symmetric types d (n,), sc (n, S) signed ints, q (n, S, L) signed ints.
    `weights` (n_blocks, 256) ≥ 0 weigh each value's squared error in the scale search.
    `plain` runs the search as written (the reference, several times slower); the same fields."""
    kind = KINDS[kind_name]
    x = x.astype(np.float32).reshape(-1, QK_K // kind.sub, kind.sub)
    w = None if weights is None else weights.astype(np.float32).reshape(x.shape)
    per_block = x.shape[:2]
    if plain:
        w = np.ones_like(x) if w is None else w
        if kind.symmetric:
            return _symmetric_codes(x, _fit_symmetric_plain(x, w, kind), kind)
        return _asymmetric_codes(x, *_fit_asymmetric_plain(x, w, kind), kind)
    with np.errstate(all="ignore"), _short_buffers(x.size // kind.sub):
        rows = x.reshape(-1, kind.sub)
        cols = _by_position(rows, kind.sub)
        wcols = None if w is None else _by_position(w, kind.sub)
        if kind.symmetric:
            return _symmetric_codes(cols, _fit_symmetric(cols, rows, wcols, kind).reshape(per_block), kind)
        s, m = _fit_asymmetric(cols, rows, wcols, kind)
        return _asymmetric_codes(cols, s.reshape(per_block), m.reshape(per_block), kind)


def _along(v: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A per-sub-block (n, S) array set against x's values: x (n, S, L), or by position (L, n·S)."""
    return v[..., None] if x.ndim == 3 else v.reshape(-1)


def _as_blocks(q: np.ndarray, kind: Kind) -> np.ndarray:
    """Codes laid out as x was, back to (n, S, L)."""
    if q.ndim == 3:
        return q
    rows = q[np.argsort(position_order(kind.sub))].T
    return rows.reshape(-1, QK_K // kind.sub, kind.sub)


def _asymmetric_codes(x: np.ndarray, s: np.ndarray, m: np.ndarray, kind: Kind) -> dict[str, np.ndarray]:
    """The fields for x (n, S, L) or by position (L, n·S), given each sub-block's scale s and
    min m (n, S)."""
    levels = kind.scale_levels
    d = _f16(s.max(-1) / levels)
    dmin = _f16(m.max(-1) / levels)
    sc = np.clip(np.rint(s * _safe_div(1.0, d)[:, None]), 0, levels).astype(np.uint8)
    mq = np.clip(np.rint(m * _safe_div(1.0, dmin)[:, None]), 0, levels).astype(np.uint8)
    step = d[:, None] * sc
    offset = dmin[:, None] * mq
    q = np.clip(np.rint((x + _along(offset, x)) * _along(_safe_div(1.0, step), x)), 0, kind.high)
    return {"d": d, "dmin": dmin, "sc": sc, "m": mq, "q": _as_blocks(q.astype(np.uint8), kind)}


def _symmetric_codes(x: np.ndarray, s: np.ndarray, kind: Kind) -> dict[str, np.ndarray]:
    """The fields for x (n, S, L) or by position (L, n·S), given each sub-block's signed scale
    s (n, S)."""
    # the sub-block scale of largest magnitude is stored as the most negative value (−128 for
    # int8, −32 for Q3_K's 6-bit offset-32 field), the others in proportion
    smin = -kind.scale_levels
    idx = np.abs(s).argmax(-1)
    smax = np.take_along_axis(s, idx[:, None], -1)[:, 0]
    d = _f16(_safe_div(smax, np.float32(smin)))
    sc = np.clip(np.rint(s * _safe_div(1.0, d)[:, None]), smin, -smin - 1).astype(np.int16)
    step = d[:, None] * sc
    q = np.clip(np.rint(x * _along(_safe_div(1.0, step), x)), kind.low, kind.high)
    return {"d": d, "sc": sc.astype(np.int8), "q": _as_blocks(q.astype(np.int8), kind)}


def dequantize_codes(c: dict[str, np.ndarray], kind_name: str) -> np.ndarray:
    """What the fields mean, computed from the fields (not the bytes): (n_blocks, 256) f32."""
    if KINDS[kind_name].symmetric:
        step = c["d"][:, None] * c["sc"].astype(np.float32)
        return (step[..., None] * c["q"].astype(np.float32)).reshape(-1, QK_K)
    step = c["d"][:, None] * c["sc"].astype(np.float32)
    offset = c["dmin"][:, None] * c["m"].astype(np.float32)
    return (step[..., None] * c["q"] - offset[..., None]).reshape(-1, QK_K)


# --- bytes --------------------------------------------------------------------------------------
def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(-1, 2)


def _two_bit_planes(q: np.ndarray) -> np.ndarray:
    """256 2-bit codes → 64 bytes: value t = 128·h + 32·s + e sits in byte 32·h + e, bits 2s."""
    q = q.reshape(-1, 2, 4, 32).astype(np.uint8)  # [half h, shift s, e]
    return (q[:, :, 0] | q[:, :, 1] << 2 | q[:, :, 2] << 4 | q[:, :, 3] << 6).reshape(-1, 64)


def _six_bit_pairs(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and eight 6-bit mins → 12 bytes (Q4_K, Q5_K):
    bytes 0-3: sc[0..3] in the low 6 bits, the top 2 bits of sc[4..7] in bits 6-7;
    bytes 4-7: m[0..3] likewise with the top 2 bits of m[4..7];
    bytes 8-11: low 4 bits of sc[4..7] | low 4 bits of m[4..7] << 4."""
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, 0:4] & 0x3F) | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = (m[:, 0:4] & 0x3F) | ((m[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((m[:, 4:8] & 0x0F) << 4)
    return out


def _nibble_pairs(q: np.ndarray) -> np.ndarray:
    """8 sub-blocks of 32 4-bit codes → 128 bytes: byte 32·g + i holds sub-block 2g element i
    in the low nibble and sub-block 2g+1 element i in the high nibble."""
    q = q.reshape(-1, 4, 2, 32).astype(np.uint8)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)


def pack_q2_k(c: dict[str, np.ndarray]) -> np.ndarray:
    """scales (16: sc | m << 4) · 2-bit codes (64) · d (f16) · dmin (f16)."""
    scales = (c["sc"] & 0x0F) | (c["m"] << 4)
    return np.concatenate([scales, _two_bit_planes(c["q"]), _f16_bytes(c["d"]),
                           _f16_bytes(c["dmin"])], axis=1)


def pack_q3_k(c: dict[str, np.ndarray]) -> np.ndarray:
    """hmask (32) · low 2 bits of the codes (64) · scales (12) · d (f16).
    A code q ∈ [−4, 3] is stored as u = q + 4: its low 2 bits as in Q2_K, its bit 2 in hmask
    (value t = 32·b + e in byte e, bit b). Scale i, stored as v = sc + 32 in 6 bits: low 4 bits in
    byte i mod 8 (nibble i div 8), top 2 bits in byte 8 + i mod 4 (bits 2·(i div 4))."""
    u = (c["q"].astype(np.int16) + 4).reshape(-1, 256).astype(np.uint8)
    high = (u >> 2).reshape(-1, 8, 32)
    hmask = np.zeros((u.shape[0], 32), dtype=np.uint8)
    for bit in range(8):  # eight bit planes, not a loop over blocks
        hmask |= high[:, bit] << bit
    v = (c["sc"].astype(np.int16) + 32).astype(np.uint8)  # (n, 16)
    scales = np.empty((v.shape[0], 12), dtype=np.uint8)
    scales[:, 0:8] = (v[:, 0:8] & 0x0F) | ((v[:, 8:16] & 0x0F) << 4)
    top = (v >> 4) & 0x03
    scales[:, 8:12] = top[:, 0:4] | top[:, 4:8] << 2 | top[:, 8:12] << 4 | top[:, 12:16] << 6
    return np.concatenate([hmask, _two_bit_planes(u & 0x03), scales, _f16_bytes(c["d"])], axis=1)


def pack_q4_k(c: dict[str, np.ndarray]) -> np.ndarray:
    """d (f16) · dmin (f16) · scales and mins (12) · 4-bit codes (128)."""
    return np.concatenate([_f16_bytes(c["d"]), _f16_bytes(c["dmin"]), _six_bit_pairs(c["sc"], c["m"]),
                           _nibble_pairs(c["q"])], axis=1)


def pack_q5_k(c: dict[str, np.ndarray]) -> np.ndarray:
    """d (f16) · dmin (f16) · scales and mins (12, as Q4_K) · qh (32) · low 4 bits (128, as Q4_K).
    Bit 4 of sub-block j's element e is bit j of qh[e]."""
    q = c["q"].reshape(-1, 8, 32)
    high = (q >> 4) & 1
    qh = np.zeros((q.shape[0], 32), dtype=np.uint8)
    for j in range(8):  # eight sub-blocks, not a loop over blocks
        qh |= (high[:, j] << j).astype(np.uint8)
    return np.concatenate([_f16_bytes(c["d"]), _f16_bytes(c["dmin"]), _six_bit_pairs(c["sc"], c["m"]),
                           qh, _nibble_pairs(q & 0x0F)], axis=1)


def pack_q6_k(c: dict[str, np.ndarray]) -> np.ndarray:
    """ql (128) · qh (64) · 16 int8 scales · d (f16). A code q ∈ [−32, 31] is stored as
    u = q + 32; with h = t div 128, r = t mod 128 for value t: its low 4 bits in ql[64·h + r mod 64]
    (nibble r div 64), its top 2 bits in qh[32·h + r mod 32] (bits 2·(r div 32))."""
    u = (c["q"].astype(np.int16) + 32).reshape(-1, 256).astype(np.uint8)
    n = u.shape[0]
    lo = u.reshape(n, 2, 2, 64)  # [half, nibble, e]
    ql = ((lo[:, :, 0] & 0x0F) | ((lo[:, :, 1] & 0x0F) << 4)).reshape(n, 128)
    top = (u.reshape(n, 2, 4, 32) >> 4) & 0x03  # [half, shift, e]
    qh = (top[:, :, 0] | top[:, :, 1] << 2 | top[:, :, 2] << 4 | top[:, :, 3] << 6).reshape(n, 64)
    return np.concatenate([ql, qh, c["sc"].view(np.uint8), _f16_bytes(c["d"])], axis=1)


PACK = {"Q2_K": pack_q2_k, "Q3_K": pack_q3_k, "Q4_K": pack_q4_k, "Q5_K": pack_q5_k, "Q6_K": pack_q6_k}


# --- whole tensors ------------------------------------------------------------------------------
# A bf16 checkpoint's weights may come as their bit patterns (uint16, bf16_bits) instead of float32:
# half the bytes for the exporting process to write into the workers' mapped file, and the
# widening done by the workers, in parallel. bf16 → float32 is exact (the 16 bits become the top
# half of the float32), so the bytes are those of the float32 tensor.
def bf16_bits(t) -> np.ndarray:
    """A torch bfloat16 tensor's bit patterns as a uint16 array (no copy)."""
    import torch

    return t.contiguous().view(torch.int16).numpy().view(np.uint16)


def as_float32(x: np.ndarray) -> np.ndarray:
    """x as float32: bf16 bit patterns (uint16, bf16_bits) widened exactly, any float converted."""
    if x.dtype == np.uint16:
        return np.left_shift(x, 16, dtype=np.uint32).view(np.float32)  # one pass, no uint32 copy first
    return np.asarray(x, dtype=np.float32)


def quantize_blocks(blocks: np.ndarray, kind_name: str, importance: np.ndarray | None = None,
                    first: int = 0, member_blocks: int = 0) -> np.ndarray:
    """blocks (n, 256) → uint8 (n, block_bytes): one task of a tensor. `first` is the index of
    blocks[0] among the tensor's blocks, which places `importance` (one value per input column,
    or one such vector per member of a stack of `member_blocks` blocks each) on them."""
    weights = (None if importance is None
               else block_weights(importance, first, len(blocks), member_blocks))
    return PACK[kind_name](codes(blocks, kind_name, weights))


def _encode_mapped(src: str, dst: str, shape: tuple[int, int], out_width: int, encode_rows,
                   start: int, stop: int, chunk: int) -> None:
    """In a worker process: rows [start, stop) of the float32 file `src` (shape (n, width)) into
    the uint8 file `dst` ((n, out_width)), `chunk` rows at a time, by encode_rows(rows, first=index
    of rows[0]) → uint8 (len(rows), out_width). Both files are mapped (MAP_SHARED): nothing of the
    tensor travels through the pool's pipe. Any type: the rows are a k-quant's super-blocks or a
    tensor's own rows (gguf_rows). `src` holds float32, or bf16 bit patterns (uint16) where its
    name ends in .bf16 (widened here, a chunk at a time)."""
    dtype = np.uint16 if src.endswith(".bf16") else np.float32
    x = np.memmap(src, dtype=dtype, mode="r", shape=shape)
    out = np.memmap(dst, dtype=np.uint8, mode="r+", shape=(shape[0], out_width))
    for a in range(start, stop, chunk):
        b = min(a + chunk, stop)
        out[a:b] = encode_rows(as_float32(np.asarray(x[a:b])), first=a)


def _mapped_folder(nbytes: int) -> str | None:
    """/dev/shm where it has room (memory, never disk), else the temporary folder (page cache)."""
    try:
        st = os.statvfs("/dev/shm")
        if st.f_bavail * st.f_frsize > 2 * nbytes:
            return "/dev/shm"
    except OSError:
        pass
    return None


def _read_into(path: str, out: np.ndarray) -> None:
    """The file's bytes straight into `out` (one copy; a read returns at most ~2 GB)."""
    view = memoryview(out).cast("B")
    with open(path, "rb", buffering=0) as f:
        done = 0
        while done < len(view):
            n = f.readinto(view[done:])
            if not n:
                raise RuntimeError(f"{path}: {done} bytes, {len(view)} expected")
            done += n


class Pending:
    """A tensor being encoded (its blocks or rows in parts); result() waits and assembles them."""

    def __init__(self, out: np.ndarray, shape: tuple[int, ...], parts: list, files: tuple[str, ...] = ()):
        self.out, self.shape, self.parts, self.files = out, shape, parts, files

    def result(self) -> np.ndarray:
        try:
            for start, part in self.parts:
                done = part if isinstance(part, np.ndarray) else part.result()
                if done is not None:
                    self.out[start:start + len(done)] = done
            if self.files:  # the workers wrote into the mapped output file
                _read_into(self.files[1], self.out)
        finally:
            self.discard()
        return self.out.reshape(self.shape)

    def discard(self) -> None:
        """Drop the mapped files (a worker still writing keeps its mapping until it is done)."""
        for _, part in self.parts:
            if isinstance(part, Pending):  # a stack's members (stacked)
                part.discard()
        self.parts = []
        for f in self.files:
            if os.path.exists(f):
                os.unlink(f)
        self.files = ()


def _submit_mapped(rows: np.ndarray, encode_rows, chunk: int, task_chunks: int,
                   pool: ProcessPoolExecutor, out: np.ndarray, shape: tuple[int, ...]) -> Pending:
    """Start encoding `rows` (n, width) into `out` (n, out_width) on the worker processes, through
    mapped files (_encode_mapped), `task_chunks` chunks of `chunk` rows per task; rows of bf16 bit
    patterns (uint16) are handed over as they are. `encode_rows` must pickle (a module-level
    function or a functools.partial of one)."""
    import tempfile

    if rows.dtype != np.uint16:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
    folder = _mapped_folder(rows.nbytes + out.nbytes)
    files = []
    try:
        for suffix, size in ((".bf16" if rows.dtype == np.uint16 else ".f32", rows.nbytes), (".q", out.nbytes)):
            fd, path = tempfile.mkstemp(prefix="qlora-quant-", suffix=suffix, dir=folder)
            os.close(fd)
            files.append(path)
        # written, not mapped, here: one copy into the page cache, no page faults; the workers'
        # shared mappings see the same pages (no msync needed between processes)
        np.ascontiguousarray(rows).tofile(files[0])
        os.truncate(files[1], out.nbytes)
        per_task = task_chunks * chunk
        parts = [(0, pool.submit(_encode_mapped, files[0], files[1], rows.shape, out.shape[1],
                                 encode_rows, a, min(a + per_task, len(rows)), chunk))
                 for a in range(0, len(rows), per_task)]
    except BaseException:
        for f in files:
            os.unlink(f)
        raise
    return Pending(out, shape, parts, tuple(files))


def block_size(type_name: str) -> tuple[int, int]:
    """(values, bytes) of one block of `type_name`: a k-quant's super-block, or gguf's own."""
    if type_name in KINDS:
        return QK_K, KINDS[type_name].block_bytes
    import gguf

    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]


def encoding_layout(x: np.ndarray, type_name: str):
    """x (…, cols) checked against `type_name`'s block and cut into the units encoded one at a
    time: (units, the output (n units, bytes each) to fill, the shape it is returned in). A
    k-quant's unit is its 256-value super-block (the search weighs each by block_weights); a type
    gguf.quants encodes goes by whole rows, as gguf.quants takes them."""
    block, block_bytes = block_size(type_name)
    cols = x.shape[-1]
    if cols % block:
        raise ValueError(f"{type_name} needs rows that are a multiple of {block}, got {cols}")
    unit = block if type_name in KINDS else cols
    units = x.reshape(-1, unit)
    out = np.empty((len(units), unit // block * block_bytes), dtype=np.uint8)
    return units, out, (*x.shape[:-1], cols // block * block_bytes)


def search_importance(importance: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """A k-quant search's importance (None: every value alike) checked against the shape of the
    tensor it steers, as float32: one value per column, (cols,); or, for a stack (members, rows,
    cols) such as a mixture of experts' experts, one vector per member, (members, cols). The
    other types take none."""
    if importance is None:
        return None
    per_member = len(shape) == 3 and importance.shape == (shape[0], shape[-1])
    if importance.shape != (shape[-1],) and not per_member:
        raise ValueError(f"importance has shape {importance.shape}, the tensor {tuple(shape)}: "
                         "one value per column, or a vector per member of a stack")
    return np.ascontiguousarray(importance, dtype=np.float32)


def member_blocks(shape: tuple[int, ...]) -> int:
    """The super-blocks each member of a stack (members, rows, cols) spans; 0 for a matrix."""
    return int(np.prod(shape[1:])) // QK_K if len(shape) == 3 else 0


def block_weights(importance: np.ndarray, first: int, n: int, member_blocks: int = 0) -> np.ndarray:
    """(n, 256): the importance of each value of blocks first … first + n − 1 of a tensor whose
    rows `importance` spans: one vector (cols,) for every row, or (members, cols) a vector for
    each member's rows, `member_blocks` blocks a member."""
    index = first + np.arange(n)
    if importance.ndim == 1:
        per_row = importance.reshape(-1, QK_K)
        return per_row[index % len(per_row)]
    per_row = importance.reshape(len(importance), -1, QK_K)
    return per_row[index // member_blocks, index % per_row.shape[1]]


def submit(x: np.ndarray, kind_name: str, importance: np.ndarray | None = None,
           executor: Executor | None = None) -> Pending:
    """Start quantizing x (…, k·256) into `kind_name` blocks row by row, in chunks of CHUNK_BLOCKS
    super-blocks on `executor`, or now in this thread when it is None. Worker processes
    (a ProcessPoolExecutor, as Workers gives) read the tensor from a mapped file and take
    TASK_CHUNKS chunks per task; threads take slices of x.

    `importance` (x.shape[-1],) ≥ 0: how much an error in each input column costs (an importance
    matrix's mean squared activations), or for a stack x (members, rows, cols) one such vector per
    member (members, cols); None weighs every value alike. x may be bf16 bit patterns (uint16:
    bf16_bits), widened by whoever encodes it."""
    if not isinstance(executor, ProcessPoolExecutor):
        x = as_float32(x)
    blocks, out, shape = encoding_layout(x, kind_name)
    importance = search_importance(importance, x.shape)
    per_member = member_blocks(x.shape)
    if isinstance(executor, ProcessPoolExecutor):
        encode_rows = functools.partial(quantize_blocks, kind_name=kind_name, importance=importance,
                                        member_blocks=per_member)
        return _submit_mapped(blocks, encode_rows, CHUNK_BLOCKS, TASK_CHUNKS, executor, out, shape)
    parts = []
    for start in range(0, len(blocks), CHUNK_BLOCKS):
        args = (blocks[start:start + CHUNK_BLOCKS], kind_name, importance, start, per_member)
        parts.append((start, quantize_blocks(*args) if executor is None
                      else executor.submit(quantize_blocks, *args)))
    return Pending(out, shape, parts)


# --- the gguf package's own types, on the same workers ----------------------------------------
# F16, BF16, Q8_0, Q4_0, Q5_0, Q5_1: gguf.quants encodes them (one pass of numpy per group of 16
# rows, 5-15 ms per M values on one core: 8B values take minutes there); the workers only share its
# rows out. Values per task: 4M, some 30-60 ms of gguf's numpy, long against a task's messages.
GGUF_TASK_VALUES = 1 << 22


def gguf_rows(rows: np.ndarray, type_name: str, first: int = 0) -> np.ndarray:
    """rows (n, cols) float32 → their bytes (n, row bytes) in `type_name`, by gguf.quants.quantize
    (`first`, the index of rows[0], is _encode_mapped's; every row is encoded alone)."""
    import gguf

    encoded = gguf.quants.quantize(rows, gguf.GGMLQuantizationType[type_name])
    return np.ascontiguousarray(encoded).view(np.uint8)  # F16 comes as float16


def submit_gguf(x: np.ndarray, type_name: str, executor: Executor | None = None) -> Pending:
    """Start encoding x (…, cols) in a type of gguf.quants (gguf_rows), GGUF_TASK_VALUES values of
    whole rows per task, on `executor` (worker processes read x from a mapped file), or now in
    this thread when it is None. Bytes as one gguf.quants.quantize(x) call gives: each row alone."""
    if not isinstance(executor, ProcessPoolExecutor):
        x = as_float32(x)  # bf16 bit patterns (uint16) widened here; the workers widen their own
    rows, out, shape = encoding_layout(x, type_name)
    if executor is None:
        return Pending(out, shape, [(0, gguf_rows(rows, type_name))])
    per_task = max(1, GGUF_TASK_VALUES // rows.shape[1])
    if isinstance(executor, ProcessPoolExecutor):
        encode_rows = functools.partial(gguf_rows, type_name=type_name)
        return _submit_mapped(rows, encode_rows, per_task, 1, executor, out, shape)
    return Pending(out, shape, [(a, executor.submit(gguf_rows, rows[a:a + per_task], type_name))
                                for a in range(0, len(rows), per_task)])


def submit_type(x: np.ndarray, type_name: str, importance: np.ndarray | None = None,
                executor: Executor | None = None) -> Pending:
    """submit(x, …) of a k-quant, or submit_gguf(x, …) of a type gguf.quants encodes (which takes
    no importance): every type but F32, on `executor` (None: now, in this thread)."""
    if type_name in KINDS:
        return submit(x, type_name, importance, executor)
    return submit_gguf(x, type_name, executor)


def in_order(items: Iterable[tuple[object, np.ndarray | Pending, int]]) -> Iterator[tuple[object, np.ndarray]]:
    """(key, array or Pending, values) → (key, array), in the order given, while later tensors are
    read and submitted: the oldest is waited for only once more than IN_FLIGHT_VALUES values are
    queued behind it (or the items run out)."""
    waiting: deque = deque()
    queued = 0
    try:
        for key, data, values in items:
            waiting.append((key, data, values))
            queued += values
            while len(waiting) > 1 and (queued > IN_FLIGHT_VALUES or not isinstance(waiting[0][1], Pending)):
                old_key, old, old_values = waiting.popleft()
                queued -= old_values
                yield old_key, old if isinstance(old, np.ndarray) else old.result()
        while waiting:
            key, data, _ = waiting.popleft()
            yield key, data if isinstance(data, np.ndarray) else data.result()
    finally:  # stopped early (an error): no mapped file left behind
        for _, data, _ in waiting:
            if isinstance(data, Pending):
                data.discard()


def quantize(x: np.ndarray, kind_name: str, importance: np.ndarray | None = None,
             executor: Executor | None = None) -> np.ndarray:
    """x (…, k·256) float → uint8 (…, k·block_bytes), `kind_name` blocks row by row (submit's
    arguments), waiting for the result."""
    return submit(x, kind_name, importance, executor).result()


def usable_cores(cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """The cores this process may run on: its affinity (which `docker --cpuset-cpus` narrows),
    else all, and no more than its cgroup's CPU quota allows (`docker --cpus`, a Kubernetes CPU
    limit), which leaves the affinity whole: one worker per visible core would then share the
    quota's time slices and each wait its turn. The quota is read where a container shows its own
    cgroup (cgroup v2 namespaces: /sys/fs/cgroup/cpu.max); a systemd CPUQuota on a bare host, or
    a parent cgroup's quota, is not seen."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cpu_max)
    return min(cores, quota) if quota else cores


def cgroup_cpu_quota(cpu_max: str) -> int | None:
    """The CPUs a cgroup v2 quota gives (`cpu.max`: "QUOTA PERIOD" in microseconds, or "max ..."
    for none), rounded up; None where there is no quota or no such file (cgroup v1, not Linux)."""
    try:
        quota, period = open(cpu_max).read().split()[:2]
        return None if quota == "max" else max(1, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        return None


class Workers:
    """Where the export encodes every type but F32 (the k-quants here, the others by gguf.quants:
    submit_gguf): `count` worker processes (None: one per core), started at the first tensor with
    chunks enough to share out; smaller tensors, and count 1, run in the calling thread.
    Processes, not threads: the search makes ~1000 numpy calls per chunk, each holding the GIL for
    its setup, which is expected to keep threads from scaling to many cores
    (benchmarks/kquant_speed.py measures both). Spawned, not forked: an exporting process has
    torch's threads running."""

    def __init__(self, count: int | None = None):
        self.count = count or usable_cores()
        self.pool: ProcessPoolExecutor | None = None

    def __str__(self) -> str:
        where = "in this process" if self.count == 1 else f"on {self.count} worker processes"
        return f"numpy {where}"

    def submit(self, x: np.ndarray, type_name: str, importance: np.ndarray | None = None) -> Pending:
        """submit_type(x, …) on these workers (or in this thread: see executor)."""
        return submit_type(x, type_name, importance, self.executor(x.size // QK_K))

    def executor(self, n_blocks: int) -> Executor | None:
        if self.count == 1 or n_blocks < 2 * CHUNK_BLOCKS:
            return None
        if self.pool is None:
            self.pool = ProcessPoolExecutor(self.count, mp_context=multiprocessing.get_context("spawn"))
        return self.pool

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None
