"""SpeedPlan: which of the training step's fast paths a run uses, decided once at set-up."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SpeedPlan:
    """The fast paths apply_speed puts on a model. All off is the reference decoder's math.

    fused_kernels: RMSNorm (with the residual add), SwiGLU and RoPE through Triton kernels where
        Triton runs (CUDA, or the CPU under TRITON_INTERPRET=1).
    fast_base: each 4-bit LoRA base through our dequantize + matmul (kernels/matmul_4bit.py), its
        LoRA product added by the base GEMM (kernels/lora.py).
    grouped: with fast_base, q/k/v and gate/up each as one base GEMM over stacked weights.
    keep_attention: with checkpointing, attention kept for backward instead of rerun: True in
        every layer, N in the last N, False in none.
    keep_activations: with checkpointing, the last N layers not checkpointed: every activation
        kept for backward, no rerun (True: every layer; False: none). Not with offload or tiles.
    seeded_dropout: LoRA dropout masks drawn from (seed, micro-batch, layer) instead of the
        global RNG: resumable, and capturable in a CUDA graph.
    embedding_on_host: a frozen, untied input embedding in pinned host memory, gathered by the GPU.
    grouped_experts: a mixture of experts' expert GEMMs grouped over tokens sorted by expert
        (speed/moe.py) instead of the reference's loop over experts.
    cuda_graphs: each micro-batch replayed as a CUDA graph (train/graphs.py) where it can be.
    offload_activations: with checkpointing, each layer's saved input in pinned host memory
        from its forward to its backward (speed/offload.py); kept attention stays on the GPU.
    tile_mlp: the MLP computed in sequence tiles where a forward has more tokens than a tile
        (models/tiling.py): True in tiles of models.tiling.default_tile_tokens, N in tiles of N
        tokens, False whole.
    generic: the model is transformers' own (models/generic.py): every path above forks or
        switches the reference decoder's classes, so none applies, and apply_speed is not called.
        Its LoRA dropout draws from the global RNG, which checkpoints save and restore and
        torch's checkpointing replays, so resume stays exact.
    """

    fused_kernels: bool = False
    fast_base: bool = False
    grouped: bool = False
    keep_attention: bool | int = False
    keep_activations: bool | int = False
    seeded_dropout: bool = False
    embedding_on_host: bool = False
    grouped_experts: bool = False
    cuda_graphs: bool = False
    offload_activations: bool = False
    tile_mlp: bool | int = False
    generic: bool = False

    @classmethod
    def for_run(cls, cfg, device: torch.device, *, sharded: bool = False,
                generic: bool = False) -> "SpeedPlan":
        """What `qlora train` uses for a RunConfig on `device`: every path its settings ask for
        where it runs. FSDP shards the base bytes the 4-bit fast path reads whole and the
        embedding the host path would hold whole; data parallel ranks (not
        sharded) each hold the whole model and get every path one process gets.
        A model on the generic path gets none of them."""
        if generic:
            return cls(generic=True)
        cuda = device.type == "cuda"
        fast_base = bool(cfg.fused_kernels and cuda and not sharded)
        return cls(
            fused_kernels=bool(cfg.fused_kernels),
            fast_base=fast_base,
            grouped=fast_base,
            keep_attention=(cfg.keep_attention or False) if cfg.gradient_checkpointing else False,
            keep_activations=((cfg.keep_activations or False) if cfg.gradient_checkpointing
                              else False),
            seeded_dropout=True,
            embedding_on_host=bool(cfg.embedding_on_host and cuda and not sharded),
            grouped_experts=True,
            cuda_graphs=bool(cfg.cuda_graphs),
            # auto (None) is resolved by the memory planner before this (memory.check_run)
            offload_activations=bool(cfg.offload_activations and cfg.gradient_checkpointing),
            tile_mlp=cfg.tile_mlp or False,
        )
