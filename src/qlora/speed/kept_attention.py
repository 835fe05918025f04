"""What a checkpointed layer keeps from its first run for its rerun and backward.

A checkpoint reruns a layer's forward just before its backward. The fast path makes that rerun
cheaper in three ways, all owned by `CheckpointedLayer`:
- the LoRA products H = dropout(x)·A of each LoRA group are kept from the first run
  (kernels/lora.products_for_rerun) instead of drawing the dropout masks again;
- the rerun keeps the dense 4-bit weights it makes for that backward
  (kernels/dequant.rerun_keeps_weights: one dequantize less per weight);
- with keep_attention, the attention's autograd graph is kept from the first run
  (AttentionKeptForRerun) and the rerun skips q/k/v's base GEMM, RoPE and attention.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from qlora.adapters import LoraLinear
from qlora.errors import QloraError
from qlora.kernels.dequant import rerun_keeps_weights, weights_not_kept
from qlora.kernels.lora import products_for_rerun


class KeptAttention:
    """What a checkpointed layer's first run keeps of its attention for the layer's backward:
    the autograd graph from q, k, v (as the projections made them) to attention's output, with
    the tensors attention's backward reads (RoPE'd q and k, v, the output, its log-sum-exp)."""

    def __init__(self):
        self.inputs: tuple[torch.Tensor, ...] = ()
        self.output: torch.Tensor | None = None
        self.first_run_done = False

    def clear(self) -> None:
        self.inputs, self.output = (), None


class AttentionKeptForRerun(torch.autograd.Function):
    """attend(q, k, v), whose graph is kept from the layer's first run to its backward.

    Why: for the attention half, a rerun is the q, k, v GEMMs (with a dequantize of their
    weights), RoPE and attention's forward: 7-8 ms of a 188 ms Llama-3-8B step on an H100
    (docs/BENCHMARKS.md, 2026-11-26). Kept instead, the rerun makes only what the other parts'
    backward reads (the normed input, the LoRA products), and this function's backward runs the
    kept graph. It costs what attention's backward keeps (for Llama-3-8B at 2048 tokens, 40 MiB
    a layer), from the forward to the layer's backward; the planner counts it (memory.attention).

    The first run builds the graph under saved-tensor hooks of its own (innermost, so the
    checkpoint's, which would drop the tensors, do not see them) on detached aliases of q, k and
    v; whatever memory of theirs the graph does not save is released at once. The rerun
    returns the kept output and computes nothing; the backward that runs is the first run's
    (non-reentrant checkpointing runs the first run's graph, with the rerun's saved tensors).
    """

    @staticmethod
    def forward(ctx, q, k, v, kept: KeptAttention, attend):
        if kept.first_run_done:  # the rerun: only its saved tensors matter, and this saves none
            if kept.output is None:
                raise QloraError("a second backward through a layer with keep_attention (its "
                                 "attention was kept for one backward): set keep_attention: false "
                                 "to backward twice (retain_graph)")
            return kept.output.detach()
        inputs = tuple(t.detach().requires_grad_() for t in (q, k, v))
        saved = set()

        def pack(t):
            saved.add(t.untyped_storage().data_ptr())
            return t

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            output = attend(*inputs)
        for storage in {t.untyped_storage().data_ptr(): t.untyped_storage() for t in inputs}.values():
            if storage.data_ptr() not in saved:  # read by nothing after this forward
                storage.resize_(0)
        kept.inputs, kept.output, kept.first_run_done = inputs, output, True
        ctx.kept = kept
        return output.detach()

    @staticmethod
    def backward(ctx, grad):
        kept = ctx.kept
        grads = torch.autograd.grad(kept.output, kept.inputs, grad)
        kept.clear()
        return (*grads, None, None)


class CheckpointedLayer:
    """A layer as a checkpoint runs it: its first run keeps the LoRA products (and, with
    `keep_attention`, its attention); its second run, the rerun just before the layer's backward,
    reuses them and keeps the dense 4-bit weights it makes for that backward."""

    def __init__(self, layer: nn.Module, keep_attention: bool = False):
        self.layer, self.runs = layer, 0
        self.kept = KeptAttention() if keep_attention else None

    def __call__(self, *args):
        self.runs += 1
        if self.runs == 1:
            with products_for_rerun("keep"):
                return self.layer(*args, kept=self.kept)
        with rerun_keeps_weights(), products_for_rerun("reuse"):
            return self.layer(*args, kept=self.kept, rerun=True)


@contextlib.contextmanager
def tile_outside_rerun(mlp: nn.Module, index: int):
    """Around one sequence tile of an MLP (models/tiling.py), in forward and in its recompute:
    - outside the checkpoint's keep/reuse state: a tile keeps no LoRA products for a rerun and
      no dense weight for a backward (the tiles would take each other's: they share the keys);
    - each tile draws its own dropout masks: the seeded masks are a function of the element
      index within the tensor, which would repeat from tile to tile, so each tile's LoRA layers
      take their salts shifted by TILE_SALT_STEP per tile (in forward and recompute alike)."""
    layers = [m for m in mlp.modules() if isinstance(m, LoraLinear) and m.dropout_seed is not None]
    salts = [layer.dropout_salt for layer in layers]
    for layer in layers:
        layer.dropout_salt += index * TILE_SALT_STEP
    try:
        with weights_not_kept(), products_for_rerun(None):
            yield
    finally:
        for layer, salt in zip(layers, salts):
            layer.dropout_salt = salt


# A seed is ((run seed % 2^20) << 40) + micro-batch index x adapter layers + salt
# (adapters.set_dropout_seed). A tile's salts move by k x TILE_SALT_STEP: the 2^34 keeps tile k's
# seeds apart from every other (micro-batch, layer, tile) of the run while a run has fewer than
# 2^34 / adapter layers micro-batches (76 million at 224 adapter layers); the odd low part moves
# the low 32 bits too, which are all that torch's CPU generator takes (kernels/dropout.py's path
# where Triton does not run), so the tiles' masks differ there as well.
TILE_SALT_STEP = (1 << 34) + 0x9E3779B1
