"""The model a run trains: its device and compute dtype, the quantized base with fresh adapters
(on this device, or under --sharding fsdp sharded over the ranks), and what the log says of it."""

from __future__ import annotations

from typing import Callable

import torch

from qlora.config import RunConfig
from qlora.device import compute_dtype, pick_device
from qlora.models.generic import GenericLM
from qlora.train import distributed as dist_
from qlora.train.distributed import DistEnv


def resolve_device(cfg: RunConfig) -> torch.device:
    return pick_device(cfg.device)


def resolve_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype:
    return compute_dtype(device) if cfg.dtype == "auto" else getattr(torch, cfg.dtype)


def build_model(cfg: RunConfig, device: torch.device, dtype: torch.dtype, part=None):
    """The quantized base with fresh adapters (their init draws from the seeded torch RNG).
    `part`: read only these rows of each tensor (models.load.RowPart; a sharded run's rank)."""
    from qlora.adapters import AdapterConfig, attach_adapters
    from qlora.models import load_model
    from qlora.quant import QuantConfig

    quant = QuantConfig(method=cfg.quant, double_quant=cfg.double_quant, compute_dtype=dtype)
    model = load_model(cfg.model, quant, device=device, part=part)
    torch.manual_seed(cfg.seed)
    targets = "all-linear" if cfg.target_modules == ["all-linear"] else cfg.target_modules
    alpha = int(cfg.lora_alpha) if float(cfg.lora_alpha).is_integer() else cfg.lora_alpha
    attach_adapters(model, AdapterConfig(r=cfg.lora_r, alpha=alpha, dropout=cfg.lora_dropout,
                                         target_modules=targets, use_rslora=cfg.use_rslora,
                                         use_dora=cfg.use_dora))
    model.gradient_checkpointing = cfg.gradient_checkpointing
    has_router_loss = (getattr(model.spec, "moe", None) is not None
                       or getattr(model, "router_loss", None) is not None)  # the generic path's
    if cfg.router_aux_loss is not None and has_router_loss:
        model.aux_loss = cfg.router_aux_loss  # else config.json's output_router_logits
    return model


def aux_loss_lines(model, cfg: RunConfig) -> list[str]:
    """What the log says where DPO or KTO trains a mixture of experts without its load-balancing
    loss: TRL's DPOTrainer and KTOTrainer add it wherever the coefficient is set, whatever
    config.json's output_router_logits, which is what decides here (as for SFT, and as TRL's
    ORPOTrainer and CPOTrainer decide)."""
    coef = getattr(model, "router_loss_coef", 0)  # 0: no router (a dense model)
    if cfg.method not in ("dpo", "kto") or coef == 0 or model.adds_router_loss:
        return []
    if getattr(model, "router_loss", True) is None:  # a generic model without transformers'
        return []  # function: nothing can add it here (its note says so where config.json asks)
    return [f"router_aux_loss: off (config.json's output_router_logits is not true); TRL's "
            f"DPOTrainer and KTOTrainer add router_aux_loss_coef ({coef:g}) x the router's "
            "load-balancing loss to the loss regardless: router_aux_loss: true does that"]


def generic_path_lines(model: GenericLM, cfg: RunConfig) -> list[str]:
    """What the log says about a model on the generic path: that it is, and what it costs."""
    spec = model.spec
    lines = [f"{spec.model_type} ({spec.architecture}) runs on the generic path: transformers' "
             f"own modules, {sum(l.quantized for l in spec.linears)} of its "
             f"{len(spec.linears)} linear layers quantized "
             f"({cfg.quant}), our adapters on them; the speed layer does not apply"]
    for option in ("keep_attention", "keep_activations", "offload_activations", "tile_mlp"):
        if getattr(cfg, option):
            lines.append(f"generic path: {option} acts on the native families' decoder only; "
                         "ignored")
    return lines + [f"generic path: {note}" for note in model.notes]


def model_for_run(cfg: RunConfig, env: DistEnv, device: torch.device, dtype: torch.dtype,
                  log: Callable[[str], None]):
    """The model `train` trains, said in the log: on `device`, or under --sharding fsdp each
    rank's share of the base, sharded over the ranks."""
    from qlora.adapters import trainable_summary

    sharded = dist_.check_sharding(cfg.sharding, env, cfg.use_dora)
    if sharded:
        dist_.check_shardable(cfg.model)
    # sharded: each rank reads (and quantizes) only the rows it keeps, in host memory;
    # fully_shard then moves one block at a time to the GPU and keeps this rank's shard of it, so
    # no GPU holds the whole base
    model = build_model(cfg, torch.device("cpu") if sharded else device, dtype,
                        part=dist_.row_part(env, device) if sharded else None)
    if isinstance(model, GenericLM):
        for line in generic_path_lines(model, cfg):
            log(line)
    for line in aux_loss_lines(model, cfg):
        log(line)
    log(trainable_summary(model))
    if sharded:
        dist_.shard_fsdp(model, dtype, device)
    return model
