"""Dropout whose mask is a pure function of (seed, salt, element index): no RNG state.

Why: a checkpointed layer is run twice (forward, then again in backward) and must draw the same
dropout mask both times. torch.utils.checkpoint does that by saving and restoring the CUDA RNG
state, which cannot be read while a CUDA graph is being captured. Here the mask is counter-based
(Philox 4x32-10, Salmon et al. 2011, the generator Triton's `tl.rand4x` implements), one Philox
evaluation serving four elements: in a call with seed s, element i = 1024·b + 256·lane + q (q < 256)
keeps its value when output `lane` of philox(key=s + salt, counter=256·b + q) is ≥ p, read as a
float in [0, 1) as Triton does. Running the layer again with the same seed tensor gives the same
mask, backward recomputes it instead of saving it, and a CUDA graph that reads the seed from a GPU
tensor draws new masks when that tensor is advanced.

`seeded_dropout` runs a Triton kernel on CUDA; `seeded_dropout_reference` computes the same bits in
plain torch (tests compare the two through Triton's interpreter). Where Triton does not run (the
CPU), the mask comes from torch's generator seeded with seed + salt instead: deterministic in the
same way, other bits, and much faster than the reference.
"""

from __future__ import annotations

import functools

import torch

_M32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85  # Weyl increments of the key (Philox 4x32)
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57  # round multipliers (Philox 4x32)


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a·b for a constant a < 2³² and int64 b < 2³², without overflow."""
    p1 = a * (b >> 16)  # < 2⁴⁸
    p0 = a * (b & 0xFFFF)  # < 2⁴⁸
    hi = (p1 + (p0 >> 16)) >> 16
    lo = (((p1 & 0xFFFF) << 16) + p0) & _M32
    return hi & _M32, lo


# Elements per kernel program. Part of the mask's definition (see dropout_uniforms), not a tuning
# knob: changing it changes which Philox output each element draws.
BLOCK = 1024
QUARTER = BLOCK // 4  # Philox counters per block: each one's four outputs serve four elements


def _uint32_to_uniform(u: torch.Tensor) -> torch.Tensor:
    """uint32 (held in int64) → [0, 1) as Triton's uint_to_uniform_float: read as int32, fold the
    negative half onto the positive, scale by just under 2⁻³¹ (so the top value stays below 1)."""
    signed = torch.where(u >= 2**31, u - 2**32, u)
    folded = torch.where(signed < 0, -signed - 1, signed)
    return folded.to(torch.float32) * 4.6566127342e-10


def philox_uniform4(seed: int, offsets: torch.Tensor, rounds: int = 10) -> tuple[torch.Tensor, ...]:
    """The four uniform floats in [0, 1) of Philox 4x32 with key `seed` (uint64) and counter
    (offset, 0, 0, 0), as Triton's `tl.rand4x(seed, offsets)` for int32 offsets."""
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
    return tuple(_uint32_to_uniform(c) for c in (c0, c1, c2, c3))


def philox_uniform(seed: int, offsets: torch.Tensor, rounds: int = 10) -> torch.Tensor:
    """Output 0 of `philox_uniform4`: what Triton's `tl.rand(seed, offsets)` returns."""
    return philox_uniform4(seed, offsets, rounds)[0]


def dropout_uniforms(seed: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The uniform the kernel compares with p for each of n elements: element BLOCK·b + QUARTER·lane
    + q takes output `lane` of Philox at counter QUARTER·b + q."""
    blocks = -(-n // BLOCK)
    outputs = philox_uniform4(seed, torch.arange(blocks * QUARTER, device=device))
    # (blocks, 4 lanes, QUARTER) read row-major is exactly the element order above
    by_element = torch.stack([u.view(blocks, QUARTER) for u in outputs], dim=1)
    return by_element.reshape(-1)[:n]


def seeded_dropout_reference(x: torch.Tensor, seed: torch.Tensor, salt: int, p: float) -> torch.Tensor:
    keep = dropout_uniforms(int(seed) + salt, x.numel(), x.device) >= p
    scaled = x.float() * (1.0 / (1.0 - p))  # in fp32, then rounded once: as the kernel does
    return torch.where(keep.view(x.shape), scaled, 0.0).to(x.dtype)


_kernel = None


def _triton_kernel():
    global _kernel
    if _kernel is None:
        import triton
        import triton.language as tl

        @triton.jit
        def dropout_kernel(x_ptr, out_ptr, seed_ptr, salt, p, scale, n, QUARTER: tl.constexpr):
            # one Philox evaluation per QUARTER-th element (Philox is ~10 rounds of mul-hi, and the
            # kernel is integer bound): its four outputs serve four contiguous chunks, each
            # loaded and stored coalesced. Written out four times: a @jit helper defined inside
            # _triton_kernel is not found by Triton's interpreter (NameError).
            pid = tl.program_id(0)
            quarter = tl.arange(0, QUARTER)
            r0, r1, r2, r3 = tl.rand4x(tl.load(seed_ptr) + salt, pid * QUARTER + quarter)
            o0 = pid * (4 * QUARTER) + quarter
            o1, o2, o3 = o0 + QUARTER, o0 + 2 * QUARTER, o0 + 3 * QUARTER
            x0 = tl.load(x_ptr + o0, mask=o0 < n)
            x1 = tl.load(x_ptr + o1, mask=o1 < n)
            x2 = tl.load(x_ptr + o2, mask=o2 < n)
            x3 = tl.load(x_ptr + o3, mask=o3 < n)
            y0 = tl.where(r0 >= p, x0.to(tl.float32) * scale, 0.0)
            y1 = tl.where(r1 >= p, x1.to(tl.float32) * scale, 0.0)
            y2 = tl.where(r2 >= p, x2.to(tl.float32) * scale, 0.0)
            y3 = tl.where(r3 >= p, x3.to(tl.float32) * scale, 0.0)
            tl.store(out_ptr + o0, y0.to(x0.dtype), mask=o0 < n)
            tl.store(out_ptr + o1, y1.to(x1.dtype), mask=o1 < n)
            tl.store(out_ptr + o2, y2.to(x2.dtype), mask=o2 < n)
            tl.store(out_ptr + o3, y3.to(x3.dtype), mask=o3 < n)

        _kernel = dropout_kernel
    return _kernel


def _dropout_triton(x: torch.Tensor, seed: torch.Tensor, salt: int, p: float) -> torch.Tensor:
    x = x.contiguous()
    if x.numel() >= 2**31:
        from qlora.errors import QloraError

        raise QloraError(
            f"LoRA dropout on {x.numel():,} values at once ({tuple(x.shape)}): the seeded dropout "
            "kernel counts elements in int32 (< 2^31). Use fewer tokens per micro-batch "
            "(micro_batch_size × max_seq_length), or lora_dropout: 0")
    out = torch.empty_like(x)
    grid = (-(-x.numel() // BLOCK),)
    _triton_kernel()[grid](x, out, seed, salt, p, 1.0 / (1.0 - p), x.numel(), QUARTER=QUARTER)
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
    gen = torch.Generator(device=x.device).manual_seed((int(seed) + salt) % 2**63)
    keep = torch.rand(x.shape, generator=gen, device=x.device) >= p
    return torch.where(keep, x.float() * (1.0 / (1.0 - p)), 0.0).to(x.dtype)


def _dropout(x, seed, salt, p):
    if use_triton(x):
        return _dropout_triton(x, seed, salt, p)
    return _dropout_generator(x, seed, salt, p)


class SeededDropout(torch.autograd.Function):
    """Backward applies the same mask, recomputed from the seed: nothing but the seed is saved."""

    @staticmethod
    def forward(ctx, x, seed, salt, p):
        ctx.save_for_backward(seed)
        ctx.salt, ctx.p = salt, p
        return _dropout(x, seed, salt, p)

    @staticmethod
    def backward(ctx, grad):
        (seed,) = ctx.saved_tensors
        return _dropout(grad, seed, ctx.salt, ctx.p), None, None, None


def seeded_dropout(x: torch.Tensor, seed: torch.Tensor, salt: int, p: float) -> torch.Tensor:
    """Dropout of `x` with probability `p`, mask drawn from (seed tensor value + salt, index).

    `seed` is a one-element int64 tensor on x's device; advance it (in place) between steps.
    """
    if p <= 0.0:
        return x
    return SeededDropout.apply(x, seed, salt, p)
