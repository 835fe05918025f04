"""Attention kept from a checkpointed layer's first run for its backward, so that the layer's rerun
skips q/k/v's base GEMM, RoPE and attention.

`AttentionKeptForRerun` is the autograd function a fast attention calls in place of its attention
(speed/fast_decoder.py); `KeptAttention` holds what it keeps, one per layer, made by the layer's
CheckpointedLayer (speed/checkpointing.py) where keep_attention covers the layer.
"""

from __future__ import annotations

import torch

from qlora.errors import QloraError


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
