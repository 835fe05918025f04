"""Q4_K and Q6_K quantizers in numpy, vectorised over blocks (the gguf package only dequantizes them).

The byte layouts are the ones gguf.quants.Q4_K / Q6_K.dequantize_blocks read (and ggml's
block_q4_K / block_q6_K). A super-block is QK_K = 256 values of one row.

Q4_K, 144 bytes: d (f16) · dmin (f16) · 12 bytes of 6-bit scales and mins for 8 sub-blocks of 32 ·
128 bytes of 4-bit codes. Value = d·sc[j]·q − dmin·m[j], q ∈ [0, 15].
  scales bytes 0-3:  sc[0..3] in the low 6 bits, the top 2 bits of sc[4..7] in bits 6-7
  scales bytes 4-7:  m[0..3]  in the low 6 bits, the top 2 bits of m[4..7]  in bits 6-7
  scales bytes 8-11: low 4 bits of sc[4..7] | low 4 bits of m[4..7] << 4
  codes: byte g·32+i holds sub-block 2g element i (low nibble) and sub-block 2g+1 element i (high).

Q6_K, 210 bytes: ql (128) · qh (64) · 16 int8 scales (one per 16 values) · d (f16).
Value t = d·scale[t//16]·(q_t − 32), q ∈ [0, 63]. With h = t//128, r = t%128:
  low 4 bits in ql[h·64 + r%64], nibble r//64; high 2 bits in qh[h·32 + r%32], bits 2·(r//32).

The search for scales is ours (a small grid of candidate scales per sub-block, each refitted by
least squares, the best kept), in the spirit of ggml's make_qkx2_quants / make_qx_quants.
"""

from __future__ import annotations

import numpy as np

QK_K = 256


def _f16(x: np.ndarray) -> np.ndarray:
    """Round to what an f16 field stores, back in f32."""
    return x.astype(np.float16).astype(np.float32)


def _safe_inv(x: np.ndarray) -> np.ndarray:
    return np.where(x != 0, 1.0 / np.where(x != 0, x, 1.0), 0.0).astype(np.float32)


# --- Q4_K ---------------------------------------------------------------------------------------
def _q4_k_sub_scales(sub: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per sub-block (…, 32) scale s ≥ 0 and min m ≥ 0 with x ≈ s·q − m, q ∈ [0, 15]."""
    lo = np.minimum(sub.min(axis=-1), 0.0)  # the min stored is −lo ≥ 0 (ggml keeps 0 representable)
    hi = sub.max(axis=-1)
    span = hi - lo
    best_s = span / 15.0
    best_m = -lo
    q = np.clip(np.rint((sub - lo[..., None]) * _safe_inv(best_s)[..., None]), 0, 15)
    best_err = ((best_s[..., None] * q - best_m[..., None] - sub) ** 2).sum(-1)
    n = sub.shape[-1]
    for step in np.arange(-1.0, 1.01, 0.1):  # candidate inverse scales around 15/span
        iscale = (15.0 + step) * _safe_inv(span)
        q = np.clip(np.rint((sub - lo[..., None]) * iscale[..., None]), 0, 15)
        # least squares fit of x = s·q + b over the sub-block
        sq, sx = q.sum(-1), sub.sum(-1)
        sqq, sqx = (q * q).sum(-1), (q * sub).sum(-1)
        det = n * sqq - sq * sq
        s = np.where(det > 0, (n * sqx - sq * sx) * _safe_inv(det), 0.0)
        b = np.where(det > 0, (sqq * sx - sq * sqx) * _safe_inv(det), lo)
        b = np.minimum(b, 0.0)  # min must stay ≤ 0; refit s for b clamped to 0
        s = np.where(b == 0, np.where(sqq > 0, sqx * _safe_inv(sqq), 0.0), s)
        s = np.maximum(s, 0.0)
        err = ((s[..., None] * q + b[..., None] - sub) ** 2).sum(-1)
        better = err < best_err
        best_s, best_m, best_err = (np.where(better, s, best_s), np.where(better, -b, best_m),
                                    np.where(better, err, best_err))
    return best_s.astype(np.float32), best_m.astype(np.float32)


def q4_k_codes(x: np.ndarray) -> dict[str, np.ndarray]:
    """The fields of Q4_K blocks for x (n_blocks, 256): d, dmin (f32 holding f16 values),
    sc, m (n, 8) ints in [0, 63], q (n, 8, 32) ints in [0, 15]."""
    sub = x.astype(np.float32).reshape(-1, 8, 32)
    s, m = _q4_k_sub_scales(sub)
    d = _f16(s.max(-1) / 63.0)
    dmin = _f16(m.max(-1) / 63.0)
    sc = np.clip(np.rint(s * _safe_inv(d)[:, None]), 0, 63).astype(np.uint8)
    mq = np.clip(np.rint(m * _safe_inv(dmin)[:, None]), 0, 63).astype(np.uint8)
    # requantize the values with the scales as stored
    ds = d[:, None] * sc
    dm = dmin[:, None] * mq
    q = np.clip(np.rint((sub + dm[..., None]) * _safe_inv(ds)[..., None]), 0, 15).astype(np.uint8)
    return {"d": d, "dmin": dmin, "sc": sc, "m": mq, "q": q}


def pack_q4_k(c: dict[str, np.ndarray]) -> np.ndarray:
    n = c["q"].shape[0]
    sc, m = c["sc"], c["m"]
    scales = np.empty((n, 12), dtype=np.uint8)
    scales[:, 0:4] = (sc[:, 0:4] & 0x3F) | ((sc[:, 4:8] >> 4) << 6)
    scales[:, 4:8] = (m[:, 0:4] & 0x3F) | ((m[:, 4:8] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((m[:, 4:8] & 0x0F) << 4)
    q = c["q"].reshape(n, 4, 2, 32)
    qs = (q[:, :, 0, :] | (q[:, :, 1, :] << 4)).reshape(n, 128)
    d = c["d"].astype(np.float16).view(np.uint8).reshape(n, 2)
    dmin = c["dmin"].astype(np.float16).view(np.uint8).reshape(n, 2)
    return np.concatenate([d, dmin, scales, qs], axis=1)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """x (…, k·256) float → uint8 (…, k·144), Q4_K blocks row by row."""
    if x.shape[-1] % QK_K:
        raise ValueError(f"Q4_K needs rows that are a multiple of {QK_K}, got {x.shape[-1]}")
    blocks = pack_q4_k(q4_k_codes(x.reshape(-1, QK_K)))
    return blocks.reshape(*x.shape[:-1], x.shape[-1] // QK_K * 144)


# --- Q6_K ---------------------------------------------------------------------------------------
def _q6_k_sub_scales(sub: np.ndarray) -> np.ndarray:
    """Per sub-block (…, 16) signed scale s with x ≈ s·q, q ∈ [−32, 31]."""
    idx = np.abs(sub).argmax(-1)
    vmax = np.take_along_axis(sub, idx[..., None], -1)[..., 0]  # signed value of largest magnitude
    best_s = np.zeros(sub.shape[:-1], dtype=np.float32)
    best_err = (sub**2).sum(-1)
    for step in np.arange(-0.9, 0.91, 0.1):  # ggml-like: the extreme maps to about −32
        iscale = -(32.0 + step) * _safe_inv(vmax)
        q = np.clip(np.rint(sub * iscale[..., None]), -32, 31)
        qq = (q * q).sum(-1)
        s = np.where(qq > 0, (q * sub).sum(-1) * _safe_inv(qq), 0.0)
        err = ((s[..., None] * q - sub) ** 2).sum(-1)
        better = err < best_err
        best_s, best_err = np.where(better, s, best_s), np.where(better, err, best_err)
    return best_s.astype(np.float32)


def q6_k_codes(x: np.ndarray) -> dict[str, np.ndarray]:
    """Fields of Q6_K blocks for x (n, 256): d (f32 holding f16), scales (n, 16) int8,
    q (n, 256) ints in [0, 63] (stored value, i.e. code + 32)."""
    sub = x.astype(np.float32).reshape(-1, 16, 16)
    s = _q6_k_sub_scales(sub)
    idx = np.abs(s).argmax(-1)
    smax = np.take_along_axis(s, idx[:, None], -1)[:, 0]
    iscale = -128.0 * _safe_inv(smax)
    d = _f16(_safe_inv(iscale))
    scales = np.clip(np.rint(s * iscale[:, None]), -128, 127).astype(np.int8)
    ds = d[:, None] * scales.astype(np.float32)
    q = np.clip(np.rint(sub * _safe_inv(ds)[..., None]), -32, 31).astype(np.int16) + 32
    return {"d": d, "scales": scales, "q": q.reshape(-1, QK_K).astype(np.uint8)}


def pack_q6_k(c: dict[str, np.ndarray]) -> np.ndarray:
    q = c["q"]
    n = q.shape[0]
    q4 = q.reshape(n, 2, 2, 64)  # [half, nibble, e]
    ql = ((q4[:, :, 0, :] & 0x0F) | ((q4[:, :, 1, :] & 0x0F) << 4)).reshape(n, 128)
    q2 = (q.reshape(n, 2, 4, 32) >> 4) & 0x03  # [half, shift index, e]
    qh = (q2[:, :, 0] | (q2[:, :, 1] << 2) | (q2[:, :, 2] << 4) | (q2[:, :, 3] << 6)).reshape(n, 64)
    scales = c["scales"].view(np.uint8)
    d = c["d"].astype(np.float16).view(np.uint8).reshape(n, 2)
    return np.concatenate([ql.astype(np.uint8), qh.astype(np.uint8), scales, d], axis=1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """x (…, k·256) float → uint8 (…, k·210), Q6_K blocks row by row."""
    if x.shape[-1] % QK_K:
        raise ValueError(f"Q6_K needs rows that are a multiple of {QK_K}, got {x.shape[-1]}")
    blocks = pack_q6_k(q6_k_codes(x.reshape(-1, QK_K)))
    return blocks.reshape(*x.shape[:-1], x.shape[-1] // QK_K * 210)


def dequantize_codes_q4_k(c: dict[str, np.ndarray]) -> np.ndarray:
    """What the fields mean, computed from the fields (not the bytes): for checking the packing."""
    ds = (c["d"][:, None] * c["sc"])[..., None]
    dm = (c["dmin"][:, None] * c["m"])[..., None]
    return (ds * c["q"] - dm).reshape(-1, QK_K)


def dequantize_codes_q6_k(c: dict[str, np.ndarray]) -> np.ndarray:
    ds = (c["d"][:, None] * c["scales"].astype(np.float32))[..., None]
    q = c["q"].reshape(-1, 16, 16).astype(np.float32) - 32
    return (ds * q).reshape(-1, QK_K)
