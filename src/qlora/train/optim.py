"""The optimizer (bitsandbytes' paged / 8-bit AdamW, or torch's AdamW) and the learning-rate schedule;
a run's optimizer and schedule built from its options (`run_optimizer`), and the fp16 loss scaler.

The schedules are transformers' `get_{cosine,linear,constant}_schedule_with_warmup`, written out as
one small function of the step so that a checkpoint only has to remember the step.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from qlora.config import RunConfig
from qlora.errors import QloraError
from qlora.train.distributed import sharded_optim

PAGED = {"paged_adamw_8bit", "paged_adamw_32bit"}


def resolve_optim(name: str, device: torch.device) -> tuple[str, str | None]:
    """The optimizer this machine can run, and a note for the log when it is not the one asked for.

    Paged optimizers page their state between GPU and host memory through CUDA unified memory; on a
    CPU there is nothing to page, so the paged 8-bit AdamW becomes bitsandbytes' plain 8-bit AdamW
    (same update, same 8-bit state) and the paged 32-bit one torch's AdamW.
    """
    if device.type == "cuda" or name not in PAGED:
        return name, None
    fallback = {"paged_adamw_8bit": "adamw_8bit", "paged_adamw_32bit": "adamw_torch"}[name]
    return fallback, f"optimizer {name} needs CUDA (paged memory); using {fallback} on {device.type}"


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: decayed (LoRA A/B matrices) and not decayed.

    Decision: no weight decay on DoRA's magnitude vectors or on any bias/norm-like 1-D parameter.
    Decay pulls parameters towards zero; for A/B that means "towards the base model", which is the
    point, but a magnitude vector at zero would erase the weight, so decaying it is harmful.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "lora_magnitude_vector" in name else decay).append(p)
    if not decay and not no_decay:
        raise QloraError("the model has no trainable parameters: no adapter was attached")
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def flatten_group(params: list[torch.nn.Parameter]) -> torch.nn.Parameter:
    """One parameter whose storage holds all of `params` (which become views of it), with a
    gradient buffer whose views are their gradients.

    Why: a LoRA model has hundreds of small matrices; the optimizer, the clipping norm and the
    zeroing then each run once over one tensor instead of once per matrix (per-matrix Python and
    launch overhead was 25-45 ms of a step), and backward accumulates into fixed buffers that a
    CUDA graph can capture. Gradients must then be zeroed in place (zero_grads), never set to None.
    """
    first = params[0]
    if any(p.dtype != first.dtype or p.device != first.device for p in params):
        raise ValueError("flatten_group needs parameters of one dtype and device")
    total = sum(p.numel() for p in params)
    flat = torch.nn.Parameter(torch.empty(total, dtype=first.dtype, device=first.device))
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            flat[offset:offset + n].copy_(p.reshape(-1))
            p.data = flat.data[offset:offset + n].view_as(p)  # frees p's own storage
            p.grad = None
            offset += n
    # the gradient buffer only once the parameters' own storages are gone: a mixture of experts'
    # adapters are GiBs, and the buffer made first would hold three copies at once, not two
    flat.grad = torch.zeros_like(flat)
    offset = 0
    for p in params:
        p.grad = flat.grad[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    return flat


def zero_grads(optimizer: torch.optim.Optimizer) -> None:
    """Zero every gradient in place: flattened parameters share their gradient buffers."""
    optimizer.zero_grad(set_to_none=False)


def build_optimizer(model: torch.nn.Module, name: str, lr: float, weight_decay: float,
                    betas: tuple[float, float], eps: float, flat: bool = True) -> torch.optim.Optimizer:
    """`flat`: each parameter group handed over as one flattened parameter (flatten_group)."""
    groups = param_groups(model, weight_decay)
    if flat:
        groups = [dict(g, params=[flatten_group(g["params"])]) for g in groups]
    if name == "adamw_torch":
        # foreach=False: the same arithmetic on every machine, which exact resume relies on
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=False)
    import bitsandbytes as bnb

    cls = {"paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
           "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
           "adamw_8bit": bnb.optim.AdamW8bit}.get(name)
    if cls is None:
        raise QloraError(f"option `optim`: {name!r} is not one of paged_adamw_8bit, "
                         f"paged_adamw_32bit, adamw_8bit, adamw_torch")
    return cls(groups, lr=lr, betas=betas, eps=eps)


def lr_factor(step: int, kind: str, warmup: int, total: int) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based), as transformers.

    Warm-up rises linearly from 0; then cosine decays to 0 over the remaining steps (half a
    period), linear decays to 0, constant stays at 1.
    """
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise QloraError(f"option `lr_scheduler_type`: {kind!r} is not one of cosine, linear, constant")


def warmup_steps(total: int, warmup_steps: int, warmup_ratio: float) -> int:
    """transformers' rule: explicit warm-up steps win, else ceil(ratio * total)."""
    return warmup_steps if warmup_steps > 0 else math.ceil(warmup_ratio * total)


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup: int,
                    total: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, kind, warmup, total))


def optim_for_run(name: str, device: torch.device, sharded: bool) -> tuple[str, str | None]:
    """The optimizer a run uses, and a note for the log when it is not the one asked for: what
    this machine can run (resolve_optim), and under --sharding fsdp what steps sharded parameters."""
    optim_name, note = resolve_optim(name, device)
    if sharded:
        optim_name, note = sharded_optim(optim_name)
    return optim_name, note


def run_optimizer(model, cfg: RunConfig, device: torch.device, sharded: bool, total: int,
                  warmup: int, log: Callable[[str], None]):
    """(the optimizer's name, the optimizer, its lr schedule), with the model in training mode."""
    optim_name, note = optim_for_run(cfg.optim, device, sharded)
    if note:
        log(note)
    model.train()
    optimizer = build_optimizer(model, optim_name, cfg.learning_rate, cfg.weight_decay,
                                (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_epsilon,
                                flat=not sharded)  # sharded parameters cannot share one storage
    return optim_name, optimizer, build_scheduler(optimizer, cfg.lr_scheduler_type, warmup, total)


def fp16_scaler(dtype: torch.dtype, device: torch.device):
    """The loss scaler of an fp16 run on CUDA (fp16 gradients underflow without scaling), else
    None."""
    return torch.amp.GradScaler("cuda") if dtype == torch.float16 and device.type == "cuda" \
        else None
