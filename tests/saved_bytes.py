"""What autograd keeps for backward while a decoder layer runs, in bytes: the memory planner's
per-layer terms are checked against this (tests/test_memory.py, tests/test_fused_kernels.py)."""

from __future__ import annotations

import torch


def layer_saved_bytes(layer, x, cos, sin, owned: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves in `layer(x, cos, sin, "causal")`, leaving out
    those of `owned` (weights, buffers, inputs: they exist whatever the layer keeps)."""
    skip = {t.untyped_storage().data_ptr() for t in owned}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, cos, sin, "causal")
    return sum(saved.values())
