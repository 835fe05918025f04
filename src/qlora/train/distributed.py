"""Several processes, one run: `qlora train` under `torchrun --nproc-per-node N`.

Data parallel through PyTorch's own DistributedDataParallel. Every rank holds the whole model;
only the adapter parameters are DDP's business: the frozen 4-bit base and the buffers are put on
DDP's ignore list, so they are neither broadcast at start nor put into gradient buckets.

One optimizer step consumes a *global window* of `accum * world_size` micro-batches, taken from
the single-process order (qlora.data.batch_order) exactly as one process with accumulation
`accum * world_size` would take them. Rank r takes micro-batches r, r + W, r + 2W, ... of the
window. The arithmetic that makes the step equal to the single-process one (docs/DISTRIBUTED.md):

    wanted gradient   g = sum over all micro-batches m of  d(loss_sum_m) / N       N = label tokens
                                                                                   of the window
    each rank backs up   loss_sum_m * W / N   for its micro-batches
    DDP averages:        (1/W) * sum_r sum_{m in r} d(loss_sum_m) * W / N  =  g

N is all-reduced once per step before any forward pass (together with the input-token count and
the stop flag, one small all-reduce).
"""

from __future__ import annotations

import datetime
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from qlora.errors import QloraError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistEnv()


def env_from_environ(environ=None) -> DistEnv:
    """RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them; one process when they are absent."""
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" not in environ or int(environ["WORLD_SIZE"]) <= 1:
        return SINGLE
    try:
        rank, world = int(environ["RANK"]), int(environ["WORLD_SIZE"])
        local = int(environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError):
        raise QloraError("WORLD_SIZE is set but RANK/LOCAL_RANK are missing or not integers; "
                         "launch with `torchrun --nproc-per-node N -m qlora.cli train ...`") from None
    return DistEnv(rank=rank, world_size=world, local_rank=local)


def init(env: DistEnv, device_type: str) -> torch.device | None:
    """Join the process group (nccl on CUDA, gloo on a CPU); the device this rank computes on."""
    if not env.enabled:
        return None
    if device_type == "cuda":
        if env.local_rank >= torch.cuda.device_count():
            raise QloraError(f"LOCAL_RANK {env.local_rank} but torch sees "
                             f"{torch.cuda.device_count()} GPU(s); --nproc-per-node must not "
                             f"exceed the GPUs of this host")
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                                timeout=datetime.timedelta(minutes=30), **kwargs)
    return device


def shutdown(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def all_reduce_sum(env: DistEnv, values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over the ranks (fp64, so token counts stay exact)."""
    if not env.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def rank_share(window: list[int], env: DistEnv) -> list[int]:
    """This rank's micro-batches of a global window: every W-th, starting at its rank."""
    return window[env.rank::env.world_size]


def frozen_names(model: torch.nn.Module) -> list[str]:
    """Fully-qualified names of everything DDP must leave alone: frozen parameters and buffers."""
    names = [n for n, p in model.named_parameters() if not p.requires_grad]
    names += [n for n, _ in model.named_buffers()]
    return names


def wrap_ddp(model: torch.nn.Module, env: DistEnv, device: torch.device):
    """DistributedDataParallel over the adapter parameters only.

    The base is loaded from the same files on every rank, so it is identical already; ignoring it
    keeps DDP from broadcasting gigabytes at construction and from bucketing frozen tensors (and
    bitsandbytes' Params4bit, whose quant_state a broadcast would not carry)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    DDP._set_params_and_buffers_to_ignore_for_model(model, frozen_names(model))
    # the buffers (RoPE tables) are on the ignore list too, so DDP has none to broadcast
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
               find_unused_parameters=False)


def sync_context(ddp_model, last: bool):
    """no_sync() for every micro-batch of the window but the last one of this rank."""
    if ddp_model is None or last:
        return nullcontext()
    return ddp_model.no_sync()


def check_sharding(sharding: str, env: DistEnv) -> None:
    """`--sharding fsdp` is not trainable yet: say so, and what works (docs/DISTRIBUTED.md)."""
    if sharding == "fsdp":
        raise QloraError(
            "option `sharding`: 'fsdp' (the 4-bit base sharded over ranks with FSDP2 fully_shard) "
            "is not wired into the training loop yet: the model shards and steps (shard_fsdp), "
            "but checkpoints, the adapter file, the 8-bit optimizer and evaluation do not yet "
            "handle sharded (DTensor) parameters (see docs/DISTRIBUTED.md). "
            "Use --sharding ddp (every rank holds the whole 4-bit base) under torchrun, and "
            "`qlora plan --gpus N --sharding fsdp` to see what sharding would need")


# --- sharded (FSDP2) building blocks: tested on CPU, not yet used by the loop ---------------------
def float_storage_4bit(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Re-store every bitsandbytes Linear4bit's packed bytes as `dtype` (bitsandbytes'
    `quant_storage`, the Answer.AI FSDP+QLoRA trick), so that FSDP2, which all-gathers one dtype
    per group, can shard them beside the adapters and norms. The bytes are the same (a view);
    the quant state (absmax, code; small) stays on the module, replicated on every rank, and
    bitsandbytes finds it there again (module.quant_state) when FSDP hands back a plain tensor.
    Returns how many layers were changed."""
    import bitsandbytes as bnb

    n = 0
    for m in model.modules():
        if not isinstance(m, bnb.nn.Linear4bit) or m.weight.dtype == dtype:
            continue
        w, qs = m.weight, m.weight.quant_state
        raw = w.data.reshape(-1).view(torch.uint8)
        if raw.numel() % dtype.itemsize:
            raise QloraError(f"a 4-bit weight of {raw.numel()} bytes cannot be stored as {dtype}")
        m.weight = bnb.nn.Params4bit(raw.view(dtype).reshape(-1, 1), requires_grad=False,
                                     quant_state=qs, blocksize=w.blocksize,
                                     compress_statistics=w.compress_statistics,
                                     quant_type=w.quant_type, quant_storage=dtype, module=m,
                                     bnb_quantized=True)
        m.quant_state, m.quant_storage = qs, dtype
        n += 1
    return n


def shard_fsdp(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """FSDP2: each decoder block one all-gather unit, the rest (embeddings, norm, head) the root's.

    Base bytes, norms, embeddings and adapters are sharded along dim 0 over the ranks; gradients
    come back reduce-scattered (averaged, like DDP) and an optimizer built afterwards holds only
    its shard of the states."""
    from torch.distributed.fsdp import fully_shard

    float_storage_4bit(model, dtype)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model
