"""A run's fast paths: speed/'s plan applied to the model (fused kernels, the 4-bit fast path,
seeded dropout, offload and MLP tiles), then the CUDA-graph runner of the micro-batches where one
can run. The generic path gets none of them, said in the log."""

from __future__ import annotations

from typing import Callable

import torch

from qlora.config import RunConfig
from qlora.models.generic import GenericLM
from qlora.speed import SpeedPlan, apply_speed
from qlora.train.distributed import DistEnv
from qlora.train.method import preference_options


def apply_fast_paths(model, optimizer, scaler, cfg: RunConfig, env: DistEnv, device: torch.device,
                     sharded: bool, log: Callable[[str], None]):
    """Every fast path the settings ask for: (dropout seed tensor, its stride, the CUDA-graph
    runner or None). A preference method's micro-batch is captured too (its body: the method's
    batch loss, train/graphs.py)."""
    from qlora.methods import method_module

    # every fast path the settings ask for, from one place (speed/), before any graph is
    # captured: the kernels go in it. Dropout masks are drawn from (seed, micro-batch index,
    # layer): the same on resume, and no global RNG inside the layers, which a graph needs
    plan = SpeedPlan.for_run(cfg, device, sharded=sharded,
                             generic=isinstance(model, GenericLM))
    if plan.generic:
        log("speed layer off: the model runs on the generic path (transformers' own modules), "
            "so no fused kernels, no 4-bit fast path, no CUDA graphs and no host embedding; "
            "the loss reads the whole logits: expect about the speed and memory of "
            "transformers + peft")
        return None, 0, None
    applied = apply_speed(model, plan, log)
    dropout_seed, dropout_stride = applied.dropout_seed, applied.dropout_stride
    for line in long_context_lines(plan, cfg, model):
        log(line)
    method = method_module(cfg.method)
    preference = (method, preference_options(cfg)) if method is not None else None
    graphed = graphed_steps(model, optimizer, plan, env, sharded, device, scaler, log,
                            cfg.max_seq_length, preference=preference)
    return dropout_seed, dropout_stride, graphed


def long_context_lines(plan: SpeedPlan, cfg: RunConfig, model) -> list[str]:
    """What the log says of offload and MLP tiles where they are on: both run inside the CUDA
    graph of a step (their copies and tiles are captured with it; a capture that fails falls
    back to eager steps, said in the log)."""
    lines = []
    if plan.offload_activations:
        lines.append("offload_activations: each checkpointed layer's input waits in pinned host "
                     "memory until its backward (copied on a side stream, fetched one layer ahead); "
                     "kept attention stays on the GPU")
    if plan.tile_mlp:
        tokens = model.model.layers[0].mlp.sequence_tiling.tokens
        lines.append(f"tile_mlp: the MLP runs in sequence tiles of {tokens} tokens where a "
                     f"micro-batch has more (max_seq_length {cfg.max_seq_length})")
    return lines


def graphed_steps(model, optimizer, plan: SpeedPlan, env: DistEnv, sharded: bool,
                  device: torch.device, scaler, log: Callable[[str], None], max_seq_length: int,
                  preference=None):
    """The CUDA-graph runner of the micro-batches (train/graphs.py), or None with the reason logged.
    Data parallel runs replay graphs as one process does: their one collective, the gradient
    all-reduce, comes after the micro-batches (Stepper.update). `preference`: (a preference
    method, its options), whose batch loss the graphs then hold."""
    if not plan.cuda_graphs:
        return None
    from qlora.train.graphs import GraphedSteps, unsupported_reason

    reason = unsupported_reason(model, device, max_seq_length)
    if reason is None and sharded:
        reason = "--sharding fsdp (its gathers and reduce-scatters run inside forward and backward)"
    if reason is None and scaler is not None:
        reason = "fp16 loss scaling"
    if reason is not None:
        if device.type == "cuda":
            log(f"CUDA graphs off: {reason}")
        return None
    grads = [p.grad for g in optimizer.param_groups for p in g["params"]]
    if any(g is None for g in grads):
        log("CUDA graphs off: the optimizer's parameters are not flattened")
        return None
    log("CUDA graphs on: each micro-batch shape is captured once (the first steps of a new "
        "shape take longer)")
    # thread_local: under torchrun, NCCL's watchdog thread queries events while a graph is
    # captured; "global" would let that call fail the capture
    return GraphedSteps(model, grads, log=log, preference=preference,
                        capture_error_mode="thread_local" if env.enabled else "global")
