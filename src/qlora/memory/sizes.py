"""Bytes as the GPU counts them: the CUDA caching allocator's rounding, its slack and the CUDA
context (margins of the advice, not allocated memory), and sizes read from the command line."""

from __future__ import annotations

import math

from qlora.errors import QloraError

GiB = 1024**3
MiB = 1024**2

# The CUDA caching allocator hands out blocks in multiples of 512 bytes (and at least 512), and
# memory_allocated counts the rounded blocks. Matters only for the many tiny quant-state tensors.
ALLOC_GRANULE = 512
# Advice only, not part of allocated memory: the allocator's cached-but-free slack
# (reserved / allocated) and the CUDA context + kernels (about 0.5-1 GiB on an H100 with torch 2.x).
# RESERVED_FACTOR: measured max_memory_reserved / max_memory_allocated over 24 H100 runs
# (calibration, out-of-sample and compare sets, 2026-11-25): 1.02-1.29, median 1.09. 1.30 covers
# every one (docs/BENCHMARKS.md, "Out-of-sample planner check"; benchmarks/fold_planner_check.py prints
# it again from the stored runs): the advice errs towards "does not fit".
RESERVED_FACTOR = 1.30
CUDA_CONTEXT_BYTES = int(0.75 * GiB)
# cuBLAS takes a workspace through the caching allocator per handle: 32 MiB on Hopper with
# CUDA 12; the forward thread and the autograd thread each hold a handle.
CUBLAS_WORKSPACE_BYTES = 2 * 32 * MiB


def alloc(nbytes: int, rounding: bool) -> int:
    """Bytes one tensor of nbytes takes in the CUDA caching allocator (rounded to 512)."""
    if not rounding or nbytes == 0:
        return nbytes
    return max(ALLOC_GRANULE, -(-nbytes // ALLOC_GRANULE) * ALLOC_GRANULE)


def gib(n: float) -> float:
    return n / GiB


def parse_size(text: str, option: str = "--gpu-memory") -> int:
    """'24GB', '24GiB', '24G', '80', '512MiB' -> bytes. GB and GiB both mean 2^30 here: a card
    sold as '24 GB' has 24 GiB."""
    s = text.strip().lower().replace(" ", "")
    units = [("gib", GiB), ("gb", GiB), ("g", GiB), ("mib", MiB), ("mb", MiB), ("m", MiB),
             ("tib", 1024 * GiB), ("tb", 1024 * GiB)]
    scale = GiB
    for suffix, mult in units:
        if s.endswith(suffix):
            s, scale = s[: -len(suffix)], mult
            break
    try:
        value = float(s)
    except ValueError:
        raise QloraError(f"{option} {text!r} is not a size; write e.g. 24GB, 80GiB or 16000MiB") from None
    if not math.isfinite(value) or value <= 0:
        raise QloraError(f"{option} {text!r} must be a positive size")
    return int(value * scale)
