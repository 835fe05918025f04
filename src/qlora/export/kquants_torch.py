"""The k-quants' scale search (kquants.py) in torch, on whatever device the tensor is on: the
export runs it on the GPU where one is present. The bytes are packed from the codes by kquants.PACK
(one packer per type, shared by both searches). Beside it, gguf.quants' Q8_0, Q4_0 and BF16 in
torch (ENCODERS), bytes and all, for the same GPU.

Same arithmetic, same bytes. Every value is computed by the float32 (and, for the candidate
scales, float64) operations of kquants' plain search in the same order, so the codes are the
numpy path's, bit for bit (tests/test_export_kquants_torch.py compares the packed blocks on the
CPU, and on the GPU where there is one). What that takes:
- one eager op per numpy op: no fused multiply-add (no addcmul, no compile), divisions by a tensor,
  never by a Python number (CUDA divides by a host scalar as a multiply by its reciprocal);
- sums over a sub-block in numpy's pairwise order (as kquants._RowSums: eight running sums of every
  eighth value, added as a tree, then to 0), on the by-position layout (L, sub-blocks) in which every
  op is one contiguous pass;
- numpy's choices where values tie: argmax takes the first largest magnitude (torch's does too);
  np.minimum(v, 0) and np.maximum(v, 0) give +0 for either zero and keep NaN.
One thing numpy leaves to its SIMD code: the sign of the largest value of a sub-block whose largest
values are zeros of both signs (a block of zeros mixed with −0). Here it is the last such zero, what
numpy gives in all but a few in 10⁴ random cases; it only reaches the bytes as the sign of a zero
f16 scale (d = ±0) of a block that is all zeros, which decodes to the same zeros.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from qlora.export import kquants
from qlora.export.kquants import KINDS, QK_K, Kind

# values per device task: 16M (64 MB of float32; the search's dozen temporaries stay under 1 GB)
DEVICE_CHUNK_VALUES = 1 << 24
# super-blocks per packing task on the CPU threads (the packers are numpy, releasing the GIL)
PACK_BLOCKS = 4096


def _by_position(a: torch.Tensor, sub: int) -> torch.Tensor:
    """(…, sub) → (sub, n) contiguous, rows in kquants' tree order (kquants._by_position)."""
    order = torch.from_numpy(kquants.position_order(sub)).to(a.device)
    return a.reshape(-1, sub).T[order].contiguous()


def _as_blocks(q: torch.Tensor, kind: Kind) -> torch.Tensor:
    """Codes by position (sub, n·S) back to (n, S, sub)."""
    back = torch.from_numpy(np.argsort(kquants.position_order(kind.sub))).to(q.device)
    return q[back].T.reshape(-1, QK_K // kind.sub, kind.sub)


def _sums(a: torch.Tensor) -> torch.Tensor:
    """Σ over the rows of a (sub, n) by-position array, bit for bit numpy's a.sum(-1) on the
    (n, sub) original (kquants._RowSums)."""
    r = a[0:8] + a[8:16]
    for i in range(16, a.shape[0], 8):
        r = r + a[i:i + 8]
    half = r[0:4] + r[4:8]
    quarter = half[0:2] + half[2:4]
    return (quarter[0] + quarter[1]) + 0.0  # the identity: −0 becomes +0 as in numpy


def _div0(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """kquants._safe_div: a / b, 0 where b is 0."""
    return torch.where(b == 0, 0.0, a / b)


def _const(value: float, like: torch.Tensor) -> torch.Tensor:
    """A divisor as a tensor on the device (CUDA divides by a host scalar through its reciprocal)."""
    return torch.full_like(like, value)


def _min0(v: torch.Tensor) -> torch.Tensor:
    """np.minimum(v, 0.0): +0 for either zero, NaN kept."""
    return torch.where((v < 0) | v.isnan(), v, 0.0)


def _max0(v: torch.Tensor) -> torch.Tensor:
    """np.maximum(v, 0.0): +0 for either zero, NaN kept."""
    return torch.where((v > 0) | v.isnan(), v, 0.0)


def _row_max(rows: torch.Tensor) -> torch.Tensor:
    """rows.max(-1), a zero maximum signed as the row's last zero (see the module's docstring)."""
    top = rows.amax(-1)
    zero = top == 0
    if bool(zero.any()):
        part = rows[zero]
        last = part.shape[-1] - 1 - (part == 0).flip(-1).to(torch.uint8).argmax(-1)
        top[zero] = part.gather(-1, last[:, None])[:, 0]
    return top


def _first_largest(rows: torch.Tensor) -> torch.Tensor:
    """Each row's value of largest magnitude, the first where several reach it (np.argmax)."""
    return rows.gather(-1, rows.abs().argmax(-1, keepdim=True))[:, 0]


def _squared(t: torch.Tensor) -> torch.Tensor:
    return t * t  # what numpy's ** 2 on float32 computes (torch.square goes through pow)


def _weighted_sum(w: torch.Tensor | None, t: torch.Tensor) -> torch.Tensor:
    return _sums(t if w is None else w * t)


def _candidates(kind: Kind, lead: float, sign: float, divisor: torch.Tensor) -> torch.Tensor:
    """(steps, n) float32: the plain search's _safe_div(sign·(lead + offset), divisor) for each
    offset, divided in the dtype numpy divides that np.float64 by a float32 array in (float64
    under numpy 2, float32 under numpy 1), then rounded to float32 as _safe_div does."""
    steps = [sign * (lead + offset) for offset in kind.grid]
    wide = np.result_type(steps[0], np.empty(1, np.float32)) == np.float64
    dtype = torch.float64 if wide else torch.float32
    top = torch.tensor(steps, dtype=dtype, device=divisor.device)[:, None]
    d = divisor.to(dtype)
    return torch.where(d == 0, 0.0, top / d).to(torch.float32)


# --- sub-block scales ---------------------------------------------------------------------------
def _fit_asymmetric(x: torch.Tensor, rows: torch.Tensor, w: torch.Tensor | None,
                    kind: Kind) -> tuple[torch.Tensor, torch.Tensor]:
    """kquants._fit_asymmetric_plain for x by position (sub, n) (the values of `rows` (n, sub));
    w likewise, None for all ones: (scales, mins) (n,)."""
    lo = _min0(x.amin(0))
    span = _row_max(rows) - lo
    best_s, best_m = span / _const(kind.high, span), -lo
    xl = x - lo
    q = torch.clamp(torch.round(xl * _div0(torch.ones_like(best_s), best_s)), 0, kind.high)
    best_err = _weighted_sum(w, _squared((best_s * q - best_m) - x))
    sw = torch.full_like(lo, kind.sub) if w is None else _sums(w)  # Σ of ones: exact
    sx = _sums(x if w is None else w * x)
    iscales = _candidates(kind, kind.high, 1.0, span)
    for c, offset in enumerate(kind.grid):
        q = torch.round(xl * iscales[c])  # ≥ 0: xl ≥ 0, iscale ≥ 0
        if offset > 0.5 - 1e-3:  # below, the clip changes nothing (kquants._fit_asymmetric says why)
            q = torch.clamp(q, max=kind.high)
        wq = q if w is None else w * q
        sq, sqq, sqx = _sums(wq), _sums(wq * q), _sums(wq * x)
        det = sw * sqq - sq * sq
        s = _div0(sw * sqx - sq * sx, det)
        b = _min0(_div0(sqq * sx - sq * sqx, det))  # x ≈ s·q + b with b ≤ 0
        s = _max0(torch.where(b == 0, _div0(sqx, sqq), s))  # min clamped to 0: the scale alone
        err = _weighted_sum(w, _squared((s * q + b) - x))
        better = (err < best_err) & (det > 0)
        best_s = torch.where(better, s, best_s)
        best_m = torch.where(better, -b, best_m)
        best_err = torch.where(better, err, best_err)
    return best_s, best_m


def _fit_symmetric(x: torch.Tensor, rows: torch.Tensor, w: torch.Tensor | None,
                   kind: Kind) -> torch.Tensor:
    """kquants._fit_symmetric_plain for x by position (sub, n): signed scales (n,)."""
    vmax = _first_largest(rows)
    best_s = torch.zeros_like(vmax)
    best_err = _sums(x * x if w is None else (w * x) * x)
    iscales = _candidates(kind, -kind.low, -1.0, vmax)
    for c, offset in enumerate(kind.grid):
        q = torch.round(x * iscales[c])
        # each side's clip changes nothing until the offset passes it by ½ (kquants._fit_symmetric)
        if offset > 0.5 - 1e-3:
            q = torch.clamp(q, kind.low, kind.high)
        elif offset > -0.5 - 1e-3:
            q = torch.clamp(q, max=kind.high)
        wq = q if w is None else w * q
        s = _div0(_sums(wq * x), _sums(wq * q))
        err = _weighted_sum(w, _squared(s * q - x))
        better = err < best_err
        best_s = torch.where(better, s, best_s)
        best_err = torch.where(better, err, best_err)
    return best_s


# --- codes --------------------------------------------------------------------------------------
def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def _asymmetric_codes(x: torch.Tensor, s: torch.Tensor, m: torch.Tensor, kind: Kind) -> dict:
    """kquants._asymmetric_codes for x by position (sub, n·S), s and m (n, S)."""
    levels = kind.scale_levels
    d = _f16(_row_max(s) / _const(levels, s[:, 0]))
    dmin = _f16(_row_max(m) / _const(levels, m[:, 0]))
    sc = torch.clamp(torch.round(s * _div0(torch.ones_like(d), d)[:, None]), 0, levels)
    mq = torch.clamp(torch.round(m * _div0(torch.ones_like(dmin), dmin)[:, None]), 0, levels)
    step = (d[:, None] * sc).reshape(-1)
    offset = (dmin[:, None] * mq).reshape(-1)
    q = torch.clamp(torch.round((x + offset) * _div0(torch.ones_like(step), step)), 0, kind.high)
    return {"d": d, "dmin": dmin, "sc": sc.to(torch.uint8), "m": mq.to(torch.uint8),
            "q": _as_blocks(q.to(torch.uint8), kind)}


def _symmetric_codes(x: torch.Tensor, s: torch.Tensor, kind: Kind) -> dict:
    """kquants._symmetric_codes for x by position (sub, n·S), s (n, S)."""
    smin = -kind.scale_levels
    d = _f16(_div0(_first_largest(s), _const(smin, s[:, 0])))
    sc = torch.clamp(torch.round(s * _div0(torch.ones_like(d), d)[:, None]), smin, -smin - 1)
    step = (d[:, None] * sc).reshape(-1)
    q = torch.clamp(torch.round(x * _div0(torch.ones_like(step), step)), kind.low, kind.high)
    return {"d": d, "sc": sc.to(torch.int8), "q": _as_blocks(q.to(torch.int8), kind)}


def codes(x: torch.Tensor, kind_name: str, weights: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """kquants.codes(x, kind_name, weights) computed where x is: x (n_blocks, 256), weights the
    same shape ≥ 0 or None; the fields come back as the same numpy arrays."""
    kind = KINDS[kind_name]
    per_block = QK_K // kind.sub
    rows = x.to(torch.float32).reshape(-1, kind.sub)
    cols = _by_position(rows, kind.sub)
    w = None if weights is None else _by_position(weights.to(x.device, torch.float32), kind.sub)
    if kind.symmetric:
        s = _fit_symmetric(cols, rows, w, kind)
        fields = _symmetric_codes(cols, s.reshape(-1, per_block), kind)
    else:
        s, m = _fit_asymmetric(cols, rows, w, kind)
        fields = _asymmetric_codes(cols, s.reshape(-1, per_block), m.reshape(-1, per_block), kind)
    return {name: v.cpu().numpy() for name, v in fields.items()}


# --- the gguf package's types -------------------------------------------------------------------
# gguf.quants' Q8_0, Q4_0 and BF16, op for op in float32 (and BF16 in integers), so that the bytes
# are its bytes (tests/test_export_kquants_torch.py compares them, ties, zeros and extremes
# included). Divisions by tensors (_div0, _const) for the reason above; the other scalars (2, 8.5)
# are exact in float32, and a product or sum rounds alike on either side.
def _round_half_away(v: torch.Tensor) -> torch.Tensor:
    """gguf.quants.np_roundf: |v| floored, plus one where its fraction is ½ or more (2·fraction,
    exact, floored), with v's sign."""
    a = v.abs()
    whole = a.floor()
    return torch.sign(v) * (whole + (2 * (a - whole)).floor())


def _f16_bytes(d: torch.Tensor) -> torch.Tensor:
    return d.to(torch.float16).view(torch.uint8).reshape(-1, 2)


def q8_0(x: torch.Tensor) -> torch.Tensor:
    """x (n, k·32) float32 → (n, k·34) uint8: gguf.quants.Q8_0's blocks (f16 d = max|x|/127, then
    32 int8 codes x/d rounded half away from zero)."""
    blocks = x.reshape(-1, 32)
    amax = blocks.abs().amax(-1)
    d = amax / _const(127, amax)
    q = _round_half_away(blocks * _div0(torch.ones_like(d), d)[:, None])
    return torch.cat([_f16_bytes(d), q.to(torch.int8).view(torch.uint8)], 1).reshape(len(x), -1)


def q4_0(x: torch.Tensor) -> torch.Tensor:
    """x (n, k·32) float32 → (n, k·18) uint8: gguf.quants.Q4_0's blocks (f16 d = the value of
    largest magnitude / −8, then 4-bit codes trunc(x/d + 8.5) up to 15, value i of the first
    half in the low nibble of byte i, of the second half in its high nibble)."""
    blocks = x.reshape(-1, 32)
    top = _first_largest(blocks)
    d = top / _const(-8, top)
    q = torch.trunc(blocks * _div0(torch.ones_like(d), d)[:, None] + 8.5).to(torch.uint8)
    q = torch.clamp(q, max=15)
    packed = q[:, :16] | (q[:, 16:] << 4)
    return torch.cat([_f16_bytes(d), packed], 1).reshape(len(x), -1)


def bf16(x: torch.Tensor) -> torch.Tensor:
    """x (n, k) float32 → (n, 2k) uint8: gguf.quants.BF16 (ggml's fp32 → bf16): round to
    nearest even on the bits, a NaN kept quiet with its sign and top bits (torch's own
    .to(torch.bfloat16) rounds alike but writes every NaN as one canonical NaN)."""
    n = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # the bits, unsigned
    nan = (n & 0x7FFFFFFF) > 0x7F800000
    n = torch.where(nan, (n & 0xFFFF0000) | (64 << 16), n)
    n = ((n + (0x7FFF + ((n >> 16) & 1))) >> 16) & 0xFFFF
    n = torch.where(n >= 0x8000, n - 0x10000, n)  # as int16, two's complement
    return n.to(torch.int16).view(torch.uint8)


ENCODERS = {"Q8_0": q8_0, "Q4_0": q4_0, "BF16": bf16}


# --- whole tensors ------------------------------------------------------------------------------
class _Packed:
    """One device task's packed bytes, once its search and then its packing are done."""

    def __init__(self, search: Future):
        self.search = search

    def result(self) -> np.ndarray:
        return np.concatenate([piece.result() for piece in self.search.result()])


class OnDevice:
    """Where the export quantizes with torch: feeder threads give the device DEVICE_CHUNK_VALUES
    at a time (while the export reads the next tensors) and the codes are packed on CPU threads
    (numpy, ~2.7 ms per M values per core for Q4_K: on one core, a GPU would wait for it). On a
    GPU two feeders, each on a CUDA stream of its own, so that one task's copies overlap the
    other's search. Offers what kquants.Workers does, for every type but F32: submit(x, type_name,
    importance) → kquants.Pending, with-block."""

    def __init__(self, device: str | torch.device, packers: int | None = None):
        self.device = torch.device(device)
        feeders = 2 if self.device.type == "cuda" else 1
        self.feeder = ThreadPoolExecutor(feeders, thread_name_prefix="kquant-device")
        self.packers = ThreadPoolExecutor(packers or min(kquants.usable_cores(), 16),
                                          thread_name_prefix="kquant-pack")
        self.streams = threading.local()  # a feeder's CUDA stream

    def __str__(self) -> str:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "CPU"
        return f"torch on {self.device} ({name})"

    def submit(self, x: np.ndarray, kind_name: str, importance: np.ndarray | None = None) -> kquants.Pending:
        x = kquants.as_float32(x)  # bf16 bit patterns too, as the numpy workers take them
        if kind_name not in KINDS:
            return self._submit_gguf(x, kind_name)
        blocks, out, shape = kquants.encoding_layout(x, kind_name)
        importance = kquants.search_importance(importance, x.shape)
        per_task = max(1, DEVICE_CHUNK_VALUES // QK_K)
        per_member = kquants.member_blocks(x.shape)
        parts = [(a, _Packed(self.feeder.submit(self._search, blocks[a:a + per_task], kind_name,
                                                importance, a, per_member)))
                 for a in range(0, len(blocks), per_task)]
        return kquants.Pending(out, shape, parts)

    def _search(self, blocks: np.ndarray, kind_name: str, importance: np.ndarray | None,
                first: int, member_blocks: int) -> list[Future]:
        """The codes of blocks first … on the device; their packing started on the CPU threads
        (the feeder goes on to the next task meanwhile)."""
        with self._own_stream():  # every tensor of the task lives and dies on it
            x = torch.from_numpy(np.ascontiguousarray(blocks, dtype=np.float32)).to(self.device)
            w = None
            if importance is not None:
                w = torch.from_numpy(kquants.block_weights(importance, first, len(blocks),
                                                           member_blocks)).to(self.device)
            fields = codes(x, kind_name, w)  # ends copying the codes to the host: the stream is done
        pack = kquants.PACK[kind_name]
        return [self.packers.submit(pack, {k: v[a:a + PACK_BLOCKS] for k, v in fields.items()})
                for a in range(0, len(blocks), PACK_BLOCKS)]

    def _submit_gguf(self, x: np.ndarray, type_name: str) -> kquants.Pending:
        """A type of gguf.quants: Q8_0, Q4_0, BF16 on the device (ENCODERS), whole rows,
        DEVICE_CHUNK_VALUES per task; the rest (F16, a cast numpy does in one pass; Q5_0, Q5_1)
        by gguf.quants itself on the CPU threads."""
        rows, out, shape = kquants.encoding_layout(x, type_name)
        if type_name in ENCODERS:
            pool, run, values = self.feeder, self._encode, DEVICE_CHUNK_VALUES
        else:
            pool, run, values = self.packers, kquants.gguf_rows, kquants.GGUF_TASK_VALUES
        per_task = max(1, values // rows.shape[1])
        return kquants.Pending(out, shape, [(a, pool.submit(run, rows[a:a + per_task], type_name))
                                            for a in range(0, len(rows), per_task)])

    def _encode(self, rows: np.ndarray, type_name: str) -> np.ndarray:
        with self._own_stream():
            x = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)).to(self.device)
            return ENCODERS[type_name](x).cpu().numpy()

    def _own_stream(self):
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        if not hasattr(self.streams, "stream"):
            self.streams.stream = torch.cuda.Stream(self.device)
        return torch.cuda.stream(self.streams.stream)

    def __enter__(self) -> OnDevice:
        return self

    def __exit__(self, *exc) -> None:
        self.feeder.shutdown(cancel_futures=True)
        self.packers.shutdown(cancel_futures=True)
