"""A layer that checkpointing leaves whole (keep_activations): what autograd keeps of it, less
the tensors that are cheaper to remake in backward than to hold from forward.

Two kinds, each a function of a tensor that its own op keeps for its backward anyway:
- the normed inputs of attention and of the MLP, which the LoRA products keep for their A's
  weight gradient: remade by the fused RMSNorm's forward kernel from the input (or the residual
  sum) that the norm keeps, one row pass each;
- the SwiGLU output, which down_proj's LoRA products keep: remade by the SwiGLU kernel from the
  packed gate/up output that the kernel keeps.
The remade tensors are the saved ones bit for bit (the same kernels on the same inputs). At
Phi-4's 2048 tokens they are 110 MiB of the 272 a whole layer would keep, so more layers fit
whole in the same memory; each remake is one elementwise kernel (~0.05 ms there). A checkpointed
layer keeps nothing of them from forward anyway (its rerun's saved tensors live only through its
own backward), so none of this runs there.

How: saved-tensor hooks around the whole layer's forward (`whole_layer`). A tensor marked with
`remade_in_backward` is packed as its remake instead of itself, if autograd saves it while the
tensor is still referenced (so its storage cannot have been reused by another tensor). Nothing
may write a marked tensor in place after marking it.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable

import torch

from qlora.kernels import fused

# storage address → (a weak reference to the marked tensor, its remake); None outside a whole layer
_marked: dict[int, tuple[weakref.ref, Callable[[], torch.Tensor]]] | None = None


@contextlib.contextmanager
def whole_layer():
    """Around the forward of a layer left out of the checkpoint: the tensors marked inside it
    with `remade_in_backward` are remade in backward when autograd saves them."""
    global _marked
    before, _marked = _marked, {}
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _marked = before


def remade_in_backward(out: torch.Tensor, remake: Callable[[], torch.Tensor]) -> torch.Tensor:
    """`out`, marked inside a whole layer so that autograd keeps `remake` (which must give `out`
    bit for bit, from tensors kept anyway) instead of `out`; outside one, `out` unmarked."""
    if _marked is not None and torch.is_grad_enabled() and out.numel():
        _marked[out.untyped_storage().data_ptr()] = (weakref.ref(out), remake)
    return out


class _Remade:
    """What autograd holds in place of a marked tensor (or a view of it): its remake and the
    view's geometry."""

    def __init__(self, remake: Callable[[], torch.Tensor], saved: torch.Tensor):
        self.remake = remake
        self.geometry = (saved.shape, saved.stride(), saved.storage_offset())

    def __call__(self) -> torch.Tensor:
        with torch.no_grad():
            return self.remake().as_strided(*self.geometry)


def _pack(t: torch.Tensor):
    entry = _marked.get(t.untyped_storage().data_ptr()) if _marked else None
    if entry is not None and entry[0]() is not None:  # still referenced: its storage, not reused
        return _Remade(entry[1], t)
    return t


def _unpack(held):
    return held() if isinstance(held, _Remade) else held


def rms_norm_remade(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """fused.rms_norm, its output remade in backward inside a whole layer (the norm keeps x)."""
    return remade_in_backward(fused.rms_norm(x, weight, eps),
                              lambda: fused.rms_norm(x, weight, eps))


def add_rms_norm_remade(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fused.add_rms_norm, its normed output remade in backward inside a whole layer from the sum
    the norm keeps (the kernel rounds the sum to x's dtype before the norm, as rms_norm reads
    it: the same bits)."""
    total, normed = fused.add_rms_norm(x, residual, weight, eps)
    return total, remade_in_backward(normed, lambda: fused.rms_norm(total, weight, eps))


def swiglu_packed_remade(packed: torch.Tensor) -> torch.Tensor:
    """fused.swiglu_packed, its output remade in backward inside a whole layer from `packed`,
    which the kernel keeps."""
    return remade_in_backward(fused.swiglu_packed(packed), lambda: fused.swiglu_packed(packed))
