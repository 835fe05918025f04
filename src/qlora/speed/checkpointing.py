"""A layer under the checkpoint: what its first run keeps for its rerun and backward.

A checkpoint reruns a layer's forward just before its backward. The fast path makes that rerun
cheaper in three ways, all owned by `CheckpointedLayer`:
- the LoRA products H = dropout(x)·A of each LoRA group are kept from the first run
  (kernels/lora.products_for_rerun) instead of drawing the dropout masks again;
- the rerun keeps the dense 4-bit weights it makes for that backward
  (kernels/kept_weights.rerun_keeps_weights: one dequantize less per weight);
- with keep_attention, the attention's autograd graph is kept from the first run
  (speed/kept_attention.py) and the rerun skips q/k/v's base GEMM, RoPE and attention.
`tile_outside_rerun` is the context a sequence tile of the MLP runs in: outside that keep/reuse
state, with dropout masks of its own.
"""

from __future__ import annotations

import contextlib

from torch import nn

from qlora.adapters import LoraLinear
from qlora.kernels.kept_weights import rerun_keeps_weights, weights_not_kept
from qlora.kernels.lora import products_for_rerun
from qlora.speed.kept_attention import KeptAttention


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
