"""The speed layer: a SpeedPlan made from the run's settings, and apply_speed, the one call that
puts the training step's fast paths on a built reference model (models/), in the one order that
is correct. `qlora train`, the tests and every benchmark go through it; nothing else sets the
fast path's switches on a model.

The order: (1) the model's blocks become their forks (speed/fast_decoder.py) with their kernel
switches set; (2) the LoRA dropout masks are seeded, before (3) grouping, which groups only
layers that share one seed; (4) the 4-bit bases go through our dequantize and the projections
are grouped; (5) the input embedding moves to host memory, after the model is on its device.
CUDA graphs come last, once the optimizer exists (train/fast_paths.py), and capture whatever
this set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from qlora.errors import QloraError
from qlora.speed.plan import SpeedPlan

__all__ = ["Applied", "SpeedPlan", "apply_speed", "grouped_modules", "use_fast_path"]


@dataclass
class Applied:
    """What apply_speed did that the training loop needs."""
    dropout_seed: torch.Tensor | None  # the seeded masks' seed (set per micro-batch), or None
    dropout_stride: int  # how far the seed advances between micro-batches (adapter layers)
    fast_layers: int  # LoRA layers whose 4-bit base runs through kernels/matmul_4bit.py
    embedding_bytes_freed: int  # GPU bytes the host embedding freed


def apply_speed(model: nn.Module, plan: SpeedPlan, log: Callable[[str], None] = print) -> Applied:
    """Put `plan`'s fast paths on `model` (a models.DecoderLM, adapters attached, on its device).
    Applying another plan later resets every switch to that plan (the host embedding excepted:
    it stays where it is)."""
    from qlora.adapters import LoraLinear, seed_dropout
    from qlora.models.decoder import DecoderLM, compute_device
    from qlora.speed.fast_decoder import (FORKS, FastAttention, FastDecoderLM, FastGemmaLM,
                                          FastGemmaRMSNorm, FastMLP, FastPhi3MLP, FastRMSNorm)
    from qlora.speed.moe import FastExperts

    if plan.generic or not isinstance(model, DecoderLM):
        raise QloraError(f"apply_speed takes the reference decoder (models.DecoderLM), not "
                         f"{type(model).__name__}: a model on the generic path takes no fast path")
    for module in model.modules():
        fork = _forked_class(type(module), FORKS)
        if fork is not None:
            module.__class__ = fork  # the same parameters and buffers; the fork's forward
        if isinstance(module, (FastRMSNorm, FastGemmaRMSNorm, FastAttention, FastMLP, FastPhi3MLP)):
            module.fused = plan.fused_kernels
        if isinstance(module, FastExperts):
            module.grouped = plan.grouped_experts
            module.fused = plan.fused_kernels
    assert isinstance(model, FastDecoderLM)
    model.keep_attention = plan.keep_attention
    model.keep_activations = plan.keep_activations
    if isinstance(model, FastGemmaLM):
        model.flex_attention = plan.fused_kernels
    seed, stride = None, 0
    if plan.seeded_dropout:
        seed = torch.zeros((), dtype=torch.int64, device=compute_device(model))
        stride = seed_dropout(model, seed)
    else:
        for module in model.modules():
            if isinstance(module, LoraLinear):
                module.dropout_seed, module.dropout_salt = None, 0
    # no layer draws from the global RNG once every dropout is seeded or off
    model.layers_use_rng = not plan.seeded_dropout and any(
        m.dropout_p > 0 for m in model.modules() if isinstance(m, LoraLinear))
    if model.spec.moe is not None and model.spec.moe.jitter_noise > 0:
        model.layers_use_rng = True  # Mixtral's router jitter draws from the global RNG
    fast = use_fast_path(model, group=plan.grouped) if plan.fast_base else use_fast_path(
        model, group=False, on=False)
    set_long_context(model, plan)
    freed = move_embedding_to_host(model, log) if plan.embedding_on_host else 0
    return Applied(dropout_seed=seed, dropout_stride=stride, fast_layers=fast,
                   embedding_bytes_freed=freed)


_WRAPPED_FORKS: dict[type, type] = {}


def _forked_class(cls: type, forks: dict[type, type]) -> type | None:
    """The class a block of class `cls` becomes: its fork. FSDP2's fully_shard (train/
    distributed.py) has already swapped a sharded block's class for a subclass of (FSDPModule,
    the block's class): that one becomes the same subclass of the fork. None: not a block, or a
    subclass FORKS does not name (a family's block, say, with math of its own: forking it by its
    base would drop that math)."""
    if cls in forks:
        return forks[cls]
    if cls in forks.values():
        return cls
    if not _made_by_fully_shard(cls):
        return None
    for base in cls.__bases__:
        if base in forks.values():
            return cls
        if base in forks:
            if cls not in _WRAPPED_FORKS:
                bases = tuple(forks[b] if b is base else b for b in cls.__bases__)
                _WRAPPED_FORKS[cls] = type(cls.__name__.replace(base.__name__, forks[base].__name__),
                                           bases, {})
            return _WRAPPED_FORKS[cls]
    return None


def _made_by_fully_shard(cls: type) -> bool:
    """Whether `cls` is FSDP2's (FSDPModule, block class) subclass, which adds no math."""
    return any(base.__name__ == "FSDPModule" for base in cls.__bases__)


def use_fast_path(model: nn.Module, group: bool = True, on: bool = True) -> int:
    """Route every 4-bit LoRA base through our dequantize+matmul (kernels/matmul_4bit.py) and the LoRA
    products through kernels/lora.py (on=False: back to bitsandbytes).

    group=True also lets each block that names `group_members` (FastAttention: q, k, v; FastMLP:
    gate, up) run those projections as one group (adapters.grouped_forward: one base GEMM over
    their stacked weights, x's gradient formed once), where every member can
    (adapters.groupable); the others run one by one. Costs a transient dense weight of the whole
    group instead of one member (Llama-3-8B gate+up: 224 MiB in bf16, 112 MiB more; the measured
    peak did not move). Measured on an H200 (docs/BENCHMARKS.md): Qwen2.5-1.5B 2048 +4.5%,
    Llama-3-8B 2048 +0.1%.

    Returns the number of layers switched. Call it after the model is on its device.
    """
    import bitsandbytes as bnb

    from qlora.adapters import LoraLinear, groupable
    from qlora.kernels.matmul_4bit import Base4bit

    switched = 0
    for module in model.modules():
        if isinstance(module, LoraLinear):
            four_bit = isinstance(module.base_layer, bnb.nn.Linear4bit)
            module.fast_base = Base4bit(module.base_layer) if on and four_bit else None
            switched += module.fast_base is not None
    for module in model.modules():
        names = getattr(module, "group_members", None)
        if names:
            # a switch, not references: the members stay where the module tree has them
            module.grouped = on and group and groupable([getattr(module, n) for n in names])
    return switched


def set_long_context(model: nn.Module, plan: SpeedPlan) -> None:
    """The plan's offload of the checkpointed layer inputs (speed/offload.py) and sequence tiles
    of the MLP (models/tiling.py), on or off: the model's layer_input_offload, each layer's
    mlp.sequence_tiling."""
    from qlora.models.tiling import SequenceTiling, default_tile_tokens
    from qlora.speed.checkpointing import tile_outside_rerun
    from qlora.speed.offload import LayerInputOffload

    model.layer_input_offload = LayerInputOffload() if plan.offload_activations else None
    tiling = None
    if plan.tile_mlp:
        tokens = (default_tile_tokens(model.spec.intermediate_size) if plan.tile_mlp is True
                  else int(plan.tile_mlp))
        # with seeded dropout (or none) a tile's recompute draws its masks again from the seed:
        # no RNG state to keep (which a CUDA graph could not read anyway)
        tiling = SequenceTiling(tokens, tile_outside_rerun,
                                preserve_rng=model.layers_use_rng)
    for layer in model.model.layers:
        # a sparse block keeps its router logits for the aux loss: tiles would keep the last
        # tile's only, so mixtures of experts run their sparse blocks whole
        routes = hasattr(layer.mlp, "router_logits")
        layer.mlp.sequence_tiling = None if routes else tiling


def grouped_modules(model: nn.Module) -> int:
    """How many blocks run their projections grouped."""
    return sum(bool(getattr(m, "grouped", False)) for m in model.modules())


def move_embedding_to_host(model: nn.Module, log: Callable[[str], None] = print) -> int:
    """The input embedding's table into pinned host memory, where the GPU gathers each step's
    rows (kernels/embedding.py), if it is on a GPU where Triton runs, frozen and not the head's
    weight too. Returns the GPU bytes freed (0: left where it was, said in the log when the host
    refused it: a speed-neutral memory saving, so the run goes on without it)."""
    from qlora.kernels.dropout import use_triton
    from qlora.kernels.embedding import move_to_host

    table = model.model.embed_tokens.weight
    if (model.spec.tie_word_embeddings or table.requires_grad or table.device.type != "cuda"
            or not use_triton(table)):
        return 0
    try:
        freed = move_to_host(model.model.embed_tokens)
    except QloraError as err:
        log(f"input embedding left on the GPU: {err}")
        return 0
    log(f"input embedding in pinned host memory ({freed / 2**30:.2f} GiB of GPU memory "
        "freed; embedding_on_host: false keeps it on the GPU)")
    return freed
