"""Host memory: the checkpointed layer inputs offloaded to pinned host memory (speed/offload.py),
the check that the host can hold them, and the input embedding kept there."""

from __future__ import annotations

from qlora.errors import QloraError
from qlora.memory.settings import PlanConfig, step_tokens
from qlora.memory.sizes import gib
from qlora.models.generic import GenericSpec
from qlora.models.spec import ArchSpec


def offload_applies(cfg: PlanConfig) -> bool:
    """Whether the checkpointed layer inputs go to host memory: asked for, with checkpointing."""
    return cfg.offload_activations and cfg.checkpointing


def host_offload_bytes(arch: ArchSpec, cfg: PlanConfig) -> int:
    """The offloaded layer inputs' bytes: every layer's but the last. Pinned at exactly this size
    (speed/offload.page_locked registers plain memory; torch's pinned allocator would round each
    layer's buffer up to a power of two: 4 GiB for Llama-3-8B's 3 GiB at 393,216 tokens)."""
    return (arch.num_layers - 1) * step_tokens(cfg) * 2 * arch.hidden_size if offload_applies(cfg) else 0


def host_available_bytes() -> int | None:
    """The host memory free for a new allocation (MemAvailable of /proc/meminfo), or None where
    the system does not say (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_host_offload(arch: ArchSpec, cfg: PlanConfig, chosen_by_plan: bool) -> None:
    """Refuse, before loading, an offload whose pinned buffers the host cannot hold: pinned memory
    is never swapped, so the run would fail when its buffers grow in the first step, or push the
    rest of the machine out of memory. A tenth of what is available is left for the rest of the
    run's host memory (its data, the loader, Python)."""
    if isinstance(arch, GenericSpec):  # offload is ignored on the generic path
        return
    need, available = host_offload_bytes(arch, cfg), host_available_bytes()
    if not need or available is None:
        return
    layers = arch.num_layers - 1
    if need <= 0.9 * available:
        return
    why = (" (the memory plan turned it on: the run does not fit the GPU without it)"
           if chosen_by_plan else "")
    raise QloraError(
        f"offload_activations needs ~{gib(need):.1f} GiB of pinned host memory{why}: the inputs of "
        f"{layers} layers x {step_tokens(cfg)} tokens x {arch.hidden_size} x 2 bytes, and "
        f"this machine has {gib(available):.1f} GiB available (MemAvailable in /proc/meminfo). "
        "Shorten max_seq_length, lower per_device_train_batch_size, or free host memory")


def embedding_in_host_memory(arch: ArchSpec, cfg: PlanConfig) -> bool:
    """Whether the input embedding sits in pinned host memory: asked for, not the head's weight
    too (tied), and not sharded (each data parallel rank moves its whole copy, as one GPU does;
    FSDP shards the embedding instead)."""
    return cfg.embedding_on_host and not arch.tie_word_embeddings and (
        cfg.gpus == 1 or cfg.sharding == "ddp")
