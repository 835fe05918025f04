"""A layer that checkpointing leaves whole (keep_activations): what autograd keeps of it, less
one tensor that is cheaper to remake than to hold.

Autograd keeps the SwiGLU output for down_proj's backward (its LoRA A's weight gradient reads
it) beside the packed gate/up output that the SwiGLU kernel keeps for its own backward. The
SwiGLU output is a function of that packed output alone, so inside a whole layer down_proj's saved
copy is remade from it in backward (one elementwise kernel, ~0.05 ms at Phi-4's [2048, 17920])
instead of held from forward to backward: [tokens, intermediate] bf16 less a layer (70 MiB at
Phi-4's 2048 tokens, a quarter of what a whole layer keeps), so more layers fit whole in the same
memory. A checkpointed layer keeps nothing of its MLP from forward anyway; its rerun's saved
tensors live only through its own backward.
"""

from __future__ import annotations

import contextlib

import torch

from qlora.kernels import fused

_in_whole_layer = False


@contextlib.contextmanager
def whole_layer():
    """Around the forward of a layer left out of the checkpoint: its MLP's SwiGLU output is
    remade in backward (down_of_swiglu)."""
    global _in_whole_layer
    before, _in_whole_layer = _in_whole_layer, True
    try:
        yield
    finally:
        _in_whole_layer = before


class _RemadeSwiglu:
    """What a whole layer's autograd holds in place of a saved SwiGLU output (or a view of it):
    the packed gate/up output it is made from, and the view's geometry."""

    def __init__(self, packed: torch.Tensor, saved: torch.Tensor):
        self.packed = packed
        self.geometry = (saved.shape, saved.stride(), saved.storage_offset())

    def remake(self) -> torch.Tensor:
        with torch.no_grad():
            hidden = fused.swiglu_packed(self.packed)
        return hidden.as_strided(*self.geometry)


def down_of_swiglu(down_proj, packed: torch.Tensor) -> torch.Tensor:
    """down_proj(swiglu_packed(packed)); inside a whole layer, the SwiGLU output that down_proj's
    backward reads is not saved but remade from `packed`, which the SwiGLU kernel saves for its
    own backward (the same tensor: holding it here adds nothing)."""
    hidden = fused.swiglu_packed(packed)
    if not _in_whole_layer or not torch.is_grad_enabled():
        return down_proj(hidden)
    storage = hidden.untyped_storage().data_ptr()

    def pack(t: torch.Tensor):
        if t.untyped_storage().data_ptr() == storage:
            return _RemadeSwiglu(packed, t)
        return t

    def unpack(held):
        return held.remake() if isinstance(held, _RemadeSwiglu) else held

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return down_proj(hidden)
