"""Dropout whose mask is a pure function of (seed, salt, element index): no RNG state.

Why: a checkpointed layer is run twice (forward, then again in backward) and must draw the same
dropout mask both times. torch.utils.checkpoint does that by saving and restoring the CUDA RNG
state, which cannot be read while a CUDA graph is being captured. Here the mask is counter-based:
Philox 4x32 (Salmon et al. 2011, the generator behind Triton's `tl.randint4x`) with PHILOX_ROUNDS
rounds, keyed by k = seed + salt. Running the layer again with the same seed tensor gives the same
mask, backward recomputes it instead of saving it, and a CUDA graph that reads the seed from a GPU
tensor draws new masks when that tensor is advanced.

The mask, exactly: a tensor is read as rows of its last dimension, [M, K]. Each row is cut into
blocks of BLOCK = 2048 elements (J = ⌈K/2048⌉ blocks; the last one may be partial), block
b = m·J + j of the matrix, and one Philox evaluation serves 8 elements of a block, each reading 16
of its 128 bits (at one evaluation per element the kernel was bound by Philox's integer work; at 8
its time per training step is close to what its memory traffic takes: about 3 TB/s in an H200
profile of 2026-11-25). Element (m, c), c = 2048·j + 256·slot + q (slot 0..7, q < 256), reads
output lane slot // 2 of philox(key=k, counter=(256·b + q, 0, 0, 0)): its LOW 16 bits for an even
slot, its HIGH 16 bits for an odd one. Blocks never straddle two rows, so a kernel that reads a
[rows, 2048] tile of a matrix (kernels/lora_dropout.py's fused LoRA products) makes each of its
masks from 256 Philox evaluations per row, whatever K is; when K is a multiple of 2048 this is
the same mask as over the flattened tensor. The element is kept iff that 16-bit value ≥
threshold = round(p·65536), computed on the host, so the drop probability is threshold/65536, not
p exactly (p = 0.05 drops 0.0500031; a p ≤ 1/131072 would round to a threshold of 0, no dropout
at all, and is refused). Kept values are x·(1/(1−p)), computed in fp32 and rounded once to x's
dtype.

`seeded_dropout` (autograd) and `seeded_dropout_values` / `seeded_dropout_add_` (plain, for use
inside another function's backward) run one Triton kernel on CUDA; `seeded_dropout_reference` and
`dropout_keep` compute the same bits in plain torch (tests compare the two through Triton's
interpreter). Where Triton does not run (the CPU), the mask comes from torch's generator seeded with
seed + salt instead: deterministic in the same way, other bits, and much faster than the reference.
"""

from __future__ import annotations

import functools

import torch

from qlora.errors import QloraError

_M32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85  # Weyl increments of the key (Philox 4x32)
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57  # round multipliers (Philox 4x32)

# Salmon et al. 2011 report Philox4x32-7 passing BigCrush; Random123's default of 10 is a safety
# margin that dropout masks do not need, and each round is a sizeable part of the kernel's time.
PHILOX_ROUNDS = 7

# Elements per kernel program and per slot. Part of the mask's definition (module docstring), not
# tuning knobs: changing either changes which Philox output each element reads.
BLOCK = 2048
SLOTS = 8  # two 16-bit halves of each of Philox's four 32-bit outputs
SLOT = BLOCK // SLOTS  # Philox counters per block
_HALF = 65536  # 16-bit values: the threshold's denominator


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a·b for a constant a < 2³² and int64 b < 2³², without overflow."""
    p1 = a * (b >> 16)  # < 2⁴⁸
    p0 = a * (b & 0xFFFF)  # < 2⁴⁸
    hi = (p1 + (p0 >> 16)) >> 16
    lo = (((p1 & 0xFFFF) << 16) + p0) & _M32
    return hi & _M32, lo


def philox4x32(seed: int, offsets: torch.Tensor, rounds: int) -> tuple[torch.Tensor, ...]:
    """The four uint32 outputs (held in int64) of Philox 4x32-`rounds` with key `seed` (uint64) and
    counter (offset, 0, 0, 0), as Triton's `tl.randint4x(seed, offsets, n_rounds=rounds)` for
    int32 offsets."""
    c0 = offsets.to(torch.int64) & _M32
    c1 = torch.zeros_like(c0)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    seed &= (1 << 64) - 1
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(rounds):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def dropout_threshold(p: float) -> int:
    """The 16-bit threshold of drop probability p (see the module docstring), checked."""
    if not 0.0 < p < 1.0:
        raise QloraError(f"lora_dropout must be in (0, 1) where dropout is applied, got {p!r}")
    threshold = round(p * _HALF)
    if threshold < 1:
        raise QloraError(
            f"lora_dropout {p!r} is too small for the seeded dropout's 16-bit masks (it would "
            f"drop nothing): use 0 (no dropout) or a value ≥ 1/65536 ≈ {1 / _HALF:.3g}")
    if threshold >= _HALF:
        raise QloraError(
            f"lora_dropout {p!r} is too close to 1 for the seeded dropout's 16-bit masks (it "
            f"would drop everything): use a value ≤ 1 − 1/65536")
    return threshold


def _rows_and_width(shape: int | tuple[int, ...]) -> tuple[int, int]:
    """[M, K] of the mask's definition: a plain count n is one row of n."""
    if isinstance(shape, int):
        return 1, shape
    shape = tuple(shape)
    if not shape:
        return 1, 1
    width = shape[-1]
    rows = 1
    for size in shape[:-1]:
        rows *= size
    return rows, width


def dropout_bits(seed: int, shape: int | tuple[int, ...],
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16-bit value (int64) the kernel compares with the threshold for each element of a tensor
    of `shape` (a plain count n: one row of n), flattened."""
    rows, width = _rows_and_width(shape)
    per_row = -(-width // BLOCK)
    blocks = rows * per_row
    lanes = philox4x32(seed, torch.arange(blocks * SLOT, device=device), PHILOX_ROUNDS)
    halves = [half for lane in lanes for half in (lane & 0xFFFF, lane >> 16)]  # slot order
    # (blocks, SLOTS, SLOT) read row-major is the order 2048·b + 256·slot + q; each row is then
    # its J blocks side by side, cut to its width
    by_element = torch.stack([h.view(blocks, SLOT) for h in halves], dim=1)
    return by_element.reshape(rows, per_row * BLOCK)[:, :width].reshape(-1)


def dropout_keep(seed: int, shape: int | tuple[int, ...], p: float,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Which elements of a tensor of `shape` the kernel keeps (bool, flattened), for key seed
    (= seed tensor's value + salt)."""
    return dropout_bits(seed, shape, device) >= dropout_threshold(p)


def seeded_dropout_reference(x: torch.Tensor, seed: torch.Tensor, salt: int, p: float) -> torch.Tensor:
    keep = dropout_keep(int(seed) + salt, tuple(x.shape), p, x.device)
    scaled = x.float() * (1.0 / (1.0 - p))  # in fp32, then rounded once: as the kernel does
    return torch.where(keep.view(x.shape), scaled, 0.0).to(x.dtype)


_kernel = None


def _triton_kernel():
    global _kernel
    if _kernel is None:
        import triton
        import triton.language as tl

        @triton.jit
        def dropout_kernel(x_ptr, out_ptr, seed_ptr, salt, threshold, scale, width, per_row,
                           SLOT: tl.constexpr, ROUNDS: tl.constexpr, ACCUMULATE: tl.constexpr):
            # program b: block j = b % per_row of row m = b // per_row. One Philox evaluation per
            # SLOT-th element: its four 32-bit outputs, two 16-bit halves each, serve eight
            # contiguous slots, each loaded and stored coalesced
            pid = tl.program_id(0)
            q = tl.arange(0, SLOT)
            lanes = tl.randint4x(tl.load(seed_ptr) + salt, pid * SLOT + q, n_rounds=ROUNDS)
            row = (pid // per_row).to(tl.int64)
            for slot in tl.static_range(8):  # unrolled when compiled; plain Python when interpreted
                bits = (lanes[slot // 2] >> (16 * (slot % 2))) & 0xFFFF  # even slot: low half
                cols = (pid % per_row) * (8 * SLOT) + slot * SLOT + q
                inside = cols < width
                offsets = row * width + cols
                x = tl.load(x_ptr + offsets, mask=inside)
                y = tl.where(bits >= threshold, x.to(tl.float32) * scale, 0.0)
                if ACCUMULATE:  # out += y, rounded once
                    y += tl.load(out_ptr + offsets, mask=inside).to(tl.float32)
                tl.store(out_ptr + offsets, y.to(x.dtype), mask=inside)

        _kernel = dropout_kernel
    return _kernel


def check_counters(rows: int, width: int) -> None:
    """The kernels count Philox counters (256 per block) in int32."""
    if rows * -(-width // BLOCK) * SLOT >= 2**31 or rows * width >= 2**31:
        raise QloraError(
            f"LoRA dropout on {rows:,} rows of {width:,} values at once: the seeded dropout "
            "kernels count in int32 (< 2^31). Use fewer tokens per micro-batch "
            "(micro_batch_size × max_seq_length), or lora_dropout: 0")


def _launch(out: torch.Tensor, x: torch.Tensor, seed: torch.Tensor, salt: int, p: float,
            accumulate: bool) -> None:
    rows, width = _rows_and_width(tuple(x.shape))
    check_counters(rows, width)
    per_row = -(-width // BLOCK)
    _triton_kernel()[(rows * per_row,)](x, out, seed, salt, dropout_threshold(p), 1.0 / (1.0 - p),
                                        width, per_row, SLOT=SLOT, ROUNDS=PHILOX_ROUNDS,
                                        ACCUMULATE=accumulate)


def _dropout_triton(x: torch.Tensor, seed: torch.Tensor, salt: int, p: float) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    _launch(out, x, seed, salt, p, accumulate=False)
    return out


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401  (CUDA builds of torch bring it on Linux)
    except ImportError:
        return False
    return True


def use_triton(x: torch.Tensor) -> bool:
    """The kernel on CUDA (or on the CPU under Triton's interpreter); else torch's generator, which
    reads the seed on the host (correct, and not capturable in a CUDA graph)."""
    import os

    if not _triton_importable():
        return False
    if x.device.type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET") == "1" and x.device.type == "cpu"


def _dropout_generator(x: torch.Tensor, seed: torch.Tensor, salt: int, p: float) -> torch.Tensor:
    """Without Triton: the mask from torch's own generator seeded with seed + salt. Deterministic in
    (seed, salt) like the kernel, other bits; 40x faster on a CPU than the Philox reference."""
    dropout_threshold(p)  # the same p is refused here as on the GPU
    gen = torch.Generator(device=x.device).manual_seed((int(seed) + salt) % 2**63)
    keep = torch.rand(x.shape, generator=gen, device=x.device) >= p
    return torch.where(keep, x.float() * (1.0 / (1.0 - p)), 0.0).to(x.dtype)


def seeded_dropout_values(x: torch.Tensor, seed: torch.Tensor, salt: int, p: float) -> torch.Tensor:
    """seeded_dropout's values without autograd (for use inside another function's backward)."""
    if use_triton(x):
        return _dropout_triton(x, seed, salt, p)
    return _dropout_generator(x, seed, salt, p)


def seeded_dropout_add_(out: torch.Tensor, x: torch.Tensor, seed: torch.Tensor, salt: int,
                        p: float) -> torch.Tensor:
    """out += dropout(x) in place, with the mask seeded_dropout draws for (seed, salt) and an x of
    this shape; the sum is formed in fp32 and rounded once. Not differentiable: meant for a
    backward that sums several layers' masked gradients. Returns out."""
    if out.shape != x.shape or out.dtype != x.dtype:
        raise QloraError(f"seeded_dropout_add_ needs out and x of one shape and dtype, got "
                         f"{tuple(out.shape)} {out.dtype} and {tuple(x.shape)} {x.dtype}")
    if not (out.is_contiguous() and x.is_contiguous()):
        raise QloraError("seeded_dropout_add_ needs contiguous out and x (call .contiguous())")
    if use_triton(x):
        _launch(out, x, seed, salt, p, accumulate=True)
    else:
        out.add_(_dropout_generator(x, seed, salt, p))
    return out


class SeededDropout(torch.autograd.Function):
    """Backward applies the same mask, recomputed from the seed: nothing but the seed is saved."""

    @staticmethod
    def forward(ctx, x, seed, salt, p):
        ctx.save_for_backward(seed)
        ctx.salt, ctx.p = salt, p
        return seeded_dropout_values(x, seed, salt, p)

    @staticmethod
    def backward(ctx, grad):
        (seed,) = ctx.saved_tensors
        return seeded_dropout_values(grad, seed, ctx.salt, ctx.p), None, None, None


def seeded_dropout(x: torch.Tensor, seed: torch.Tensor, salt: int, p: float) -> torch.Tensor:
    """Dropout of `x` with probability `p` (0: none), mask drawn from (seed tensor value + salt,
    index).

    `seed` is a one-element int64 tensor on x's device; advance it (in place) between steps.
    """
    if p == 0.0:
        return x
    dropout_threshold(p)  # refuse a bad p here, before autograd records anything
    return SeededDropout.apply(x, seed, salt, p)
