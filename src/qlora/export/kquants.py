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

Everything is vectorised over blocks; a large tensor is cut into row chunks that run on threads
(numpy releases the GIL in its array loops), which also bounds the temporary memory.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

QK_K = 256
CHUNK_VALUES = 1 << 20  # values per thread task: ~4 MB of f32, a few times that in temporaries


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


# --- sub-block scales ---------------------------------------------------------------------------
def _fit_asymmetric(x: np.ndarray, w: np.ndarray, kind: Kind) -> tuple[np.ndarray, np.ndarray]:
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


def _fit_symmetric(x: np.ndarray, w: np.ndarray, kind: Kind) -> np.ndarray:
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


# --- codes: the fields of the blocks ------------------------------------------------------------
def codes(x: np.ndarray, kind_name: str, weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The fields of `kind_name` blocks for x (n_blocks, 256), all as numbers (not yet bytes):
    asymmetric types d, dmin (n,) f32 holding f16 values, sc, m (n, S) ints, q (n, S, L) ints;
    symmetric types d (n,), sc (n, S) signed ints, q (n, S, L) signed ints.
    `weights` (n_blocks, 256) ≥ 0 weigh each value's squared error in the scale search."""
    kind = KINDS[kind_name]
    x = x.astype(np.float32).reshape(-1, QK_K // kind.sub, kind.sub)
    w = np.ones_like(x) if weights is None else weights.astype(np.float32).reshape(x.shape)
    if kind.symmetric:
        return _symmetric_codes(x, w, kind)
    return _asymmetric_codes(x, w, kind)


def _asymmetric_codes(x: np.ndarray, w: np.ndarray, kind: Kind) -> dict[str, np.ndarray]:
    s, m = _fit_asymmetric(x, w, kind)
    levels = kind.scale_levels
    d = _f16(s.max(-1) / levels)
    dmin = _f16(m.max(-1) / levels)
    sc = np.clip(np.rint(s * _safe_div(1.0, d)[:, None]), 0, levels).astype(np.uint8)
    mq = np.clip(np.rint(m * _safe_div(1.0, dmin)[:, None]), 0, levels).astype(np.uint8)
    step = d[:, None] * sc
    offset = dmin[:, None] * mq
    q = np.clip(np.rint((x + offset[..., None]) * _safe_div(1.0, step)[..., None]), 0, kind.high)
    return {"d": d, "dmin": dmin, "sc": sc, "m": mq, "q": q.astype(np.uint8)}


def _symmetric_codes(x: np.ndarray, w: np.ndarray, kind: Kind) -> dict[str, np.ndarray]:
    s = _fit_symmetric(x, w, kind)
    # the sub-block scale of largest magnitude is stored as the most negative value (−128 for
    # int8, −32 for Q3_K's 6-bit offset-32 field), the others in proportion
    smin = -kind.scale_levels
    idx = np.abs(s).argmax(-1)
    smax = np.take_along_axis(s, idx[:, None], -1)[:, 0]
    d = _f16(_safe_div(smax, np.float32(smin)))
    sc = np.clip(np.rint(s * _safe_div(1.0, d)[:, None]), smin, -smin - 1).astype(np.int16)
    step = d[:, None] * sc
    q = np.clip(np.rint(x * _safe_div(1.0, step)[..., None]), kind.low, kind.high)
    return {"d": d, "sc": sc.astype(np.int8), "q": q.astype(np.int8)}


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
def quantize(x: np.ndarray, kind_name: str, importance: np.ndarray | None = None,
             threads: int | None = None) -> np.ndarray:
    """x (…, k·256) float → uint8 (…, k·block_bytes), `kind_name` blocks row by row.

    `importance` (x.shape[-1],) ≥ 0: how much an error in each input column costs (an importance
    matrix's mean squared activations); None weighs every value alike."""
    kind = KINDS[kind_name]
    cols = x.shape[-1]
    if cols % QK_K:
        raise ValueError(f"{kind_name} needs rows that are a multiple of {QK_K}, got {cols}")
    if importance is not None and importance.shape != (cols,):
        raise ValueError(f"importance has shape {importance.shape}, rows have {cols} columns")
    rows = x.reshape(-1, cols)
    per_chunk = max(1, CHUNK_VALUES // cols)
    starts = range(0, rows.shape[0], per_chunk)

    def one(start: int) -> np.ndarray:
        part = rows[start:start + per_chunk].astype(np.float32)
        weights = None if importance is None else np.broadcast_to(importance, part.shape)
        return PACK[kind_name](codes(part.reshape(-1, QK_K), kind_name,
                                     None if weights is None else weights.reshape(-1, QK_K)))

    workers = threads or min(8, os.cpu_count() or 1)
    if workers == 1 or len(starts) == 1:
        parts = [one(s) for s in starts]
    else:
        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(one, starts))
    blocks = np.concatenate(parts, axis=0)
    return blocks.reshape(*x.shape[:-1], cols // QK_K * kind.block_bytes)
