"""Settings that fit a GPU, each checked by running plan(): what `qlora train` picks where it is
left to the plan (long_context_choice, attention_layers_that_fit, auto_fit), and what `qlora
plan` and `qlora train`'s refusals advise to change (advise)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from qlora.memory.activations import mlp_tile_tokens
from qlora.memory.attention import keeps_attention
from qlora.memory.breakdown import Breakdown, fits
from qlora.memory.settings import PlanConfig
from qlora.memory.sizes import gib
from qlora.memory.step import plan
from qlora.models.generic import GenericSpec
from qlora.models.spec import ArchSpec


def long_context_choice(arch: ArchSpec | GenericSpec, cfg: PlanConfig, gpu_bytes: int,
                        offload_auto: bool = True, tile_auto: bool = True) -> PlanConfig:
    """`cfg` with offload and MLP tiles decided where they are left to the plan (`*_auto`): the
    first of none, tiles, offload, both that fits `gpu_bytes`, with attention recomputed in every
    layer (kept attention gets what is left, after). Tiles before offload: their saving is
    measured on an H100 (Llama-3-8B at 32k tokens in 15.8 GiB; this plan: 15.7), they
    take no pinned host memory (offload: 7.75 GiB at 32k) and no PCIe traffic, and offload was
    no faster where both ran (32k: 6,329 tokens/s with it and tiles, 6,327 with tiles alone;
    16k: 2% slower). Where nothing fits, both where left to
    the plan (the error and its advice then start from there). Neither applies to the generic
    path (no speed layer), nor offload without checkpointing; a tile longer than the step's
    tokens changes nothing, so it is not chosen."""
    if isinstance(arch, GenericSpec):
        return replace(cfg, offload_activations=cfg.offload_activations and not offload_auto,
                       tile_mlp=cfg.tile_mlp if not tile_auto else False)
    offloads = [False, True] if offload_auto and cfg.checkpointing else [cfg.offload_activations]
    tiles = [False, True] if tile_auto else [cfg.tile_mlp]
    base = replace(cfg, keep_attention=False)
    candidates = [(o, t) for o in offloads for t in tiles]  # none, tiles, offload, both
    for offload, tile in candidates:
        trial = replace(base, offload_activations=offload, tile_mlp=tile)
        if tile is True and mlp_tile_tokens(arch, trial) is None and len(tiles) > 1:
            continue
        if fits(plan(arch, trial), gpu_bytes):
            return replace(cfg, offload_activations=offload, tile_mlp=tile)
    tile = tiles[-1]
    if tile_auto and mlp_tile_tokens(arch, replace(base, tile_mlp=tile)) is None:
        tile = False
    return replace(cfg, offload_activations=offloads[-1], tile_mlp=tile)


def attention_layers_that_fit(arch: ArchSpec | GenericSpec, cfg: PlanConfig, gpu_bytes: int) -> int:
    """The most layers that can keep their attention with the plan still fitting `gpu_bytes` (0
    without checkpointing, for a model that cannot keep it, or where even none fits). The plan
    grows with the count: bisected."""
    if not keeps_attention(arch, cfg) or not cfg.checkpointing:
        return 0
    return _largest_that_fits(arch, cfg, gpu_bytes, "keep_attention", 0, arch.num_layers)


def activation_layers_that_fit(arch: ArchSpec | GenericSpec, cfg: PlanConfig, gpu_bytes: int) -> int:
    """The most layers keep_activations can leave whole (every activation kept, no rerun) with
    the plan still fitting `gpu_bytes`: 0 without checkpointing, on the generic path (no speed
    layer), with offload or MLP tiles (long sequences, where memory is short), or where even one
    does not fit. The plan grows with the count past the first layers (whose whole backward
    drops the rerun's kept dense weights): bisected."""
    if (isinstance(arch, GenericSpec) or not cfg.checkpointing or cfg.offload_activations
            or cfg.tile_mlp):
        return 0
    return _largest_that_fits(arch, cfg, gpu_bytes, "keep_activations", 0, arch.num_layers)


# Two searches for a value of one PlanConfig field, on purpose: what the plan picks itself
# (auto_fit's micro-batch, the layers that keep attention) is the largest whole number that fits
# (_largest_that_fits, bisected); what advise offers is the value halved until it fits
# (_first_halving_that_fits), as one would change it by hand: a micro-batch k times smaller keeps
# the batch with x k gradient accumulation. One serving both would change their answers: from
# micro-batch 16 (Llama-3-8B, 4096 tokens, 24 GiB) the largest that fits is 5, and advise says 4
# (x4 accumulation keeps the batch of 16; 5 would make it 15).
def _largest_that_fits(arch: ArchSpec, cfg: PlanConfig, gpu_bytes: int, field_name: str, low: int,
                       high: int) -> int:
    """The largest value of `field_name` in [low, high] whose plan fits, for a plan that grows
    with it and fits at `low`: bisected."""
    while low < high:
        mid = (low + high + 1) // 2
        if fits(plan(arch, replace(cfg, **{field_name: mid})), gpu_bytes):
            low = mid
        else:
            high = mid - 1
    return low


def auto_fit(arch: ArchSpec, cfg: PlanConfig, gpu_bytes: int, max_micro_batch: int = 64,
             global_batch: int | None = None) -> PlanConfig | None:
    """The largest micro-batch that fits, and whether checkpointing is on; None if nothing fits.

    SFT: checkpointing costs a recomputed forward (about a third more compute), so no
    checkpointing at micro-batch 1 is preferred to checkpointing at a larger micro-batch.
    A preference method (`cfg.method`) takes checkpointing where it gives a larger micro-batch:
    each micro-batch dequantizes the 4-bit base for its policy forward, its reference forward
    and its backward, and every further micro-batch pays that again. At Llama-3-8B DPO on an
    H100, 4 pairs in one checkpointed micro-batch ran 1.05x as fast as one pair a micro-batch
    without checkpointing, in less memory (docs/BENCHMARKS.md, 2026-12-07) -- measured while the
    graph's staging padded that one pair's 1,536 tokens to 1,792 (the four pairs' 6,144 to
    6,400; fixed since, train/graphs.ALIGNED_PADDING), and for DPO alone: to be measured again
    before it is relied on. The micro-batches
    compared are those the run would use: divisors of `global_batch`, where given (the run keeps
    its global batch: micro-batch x accumulation).
    """
    without = _largest_micro_batch(arch, cfg, gpu_bytes, False, max_micro_batch)
    if cfg.method == "sft" and without is not None:
        return without
    with_ckpt = _largest_micro_batch(arch, cfg, gpu_bytes, True, max_micro_batch)
    if with_ckpt is None or without is None:
        return with_ckpt or without

    def used(best: PlanConfig) -> int:
        return (micro_batch_dividing(global_batch, best.micro_batch) if global_batch
                else best.micro_batch)

    # no larger micro-batch with it: the recompute would only be a cost
    return with_ckpt if used(with_ckpt) > used(without) else without


def micro_batch_dividing(global_batch: int, largest: int) -> int:
    """The largest micro-batch up to `largest` that divides `global_batch`: the one a run keeping
    its global batch (micro-batch x accumulation) can use."""
    return max(d for d in range(1, largest + 1) if global_batch % d == 0)


def _largest_micro_batch(arch: ArchSpec, cfg: PlanConfig, gpu_bytes: int, checkpointing: bool,
                         max_micro_batch: int) -> PlanConfig | None:
    """`cfg` at the largest micro-batch that fits with checkpointing on or off; None where not
    even micro-batch 1 does."""
    base = replace(cfg, checkpointing=checkpointing, micro_batch=1)
    if not fits(plan(arch, base), gpu_bytes):
        return None
    return replace(base, micro_batch=_largest_that_fits(arch, base, gpu_bytes, "micro_batch", 1,
                                                        max_micro_batch))


# --- what to change -------------------------------------------------------------------------------
@dataclass
class Advice:
    changes: dict  # PlanConfig field -> new value
    text: str
    breakdown: Breakdown


# How each knob is spelled on the command line: `qlora plan` and `qlora train`.
PLAN_OPTIONS = dict(keep_activations="no --keep-activations", micro_batch="--micro-batch",
                    checkpointing="--checkpointing", seq_len="--seq-len",
                    r="--r", offload_activations="--offload-activations", tile_mlp="--tile-mlp")
TRAIN_OPTIONS = dict(keep_activations="--keep_activations false", micro_batch="--micro_batch_size",
                     checkpointing="--gradient_checkpointing true",
                     seq_len="--max_seq_length", r="--lora_r",
                     offload_activations="--offload_activations true", tile_mlp="--tile_mlp true")


def advise(arch: ArchSpec, cfg: PlanConfig, gpu_bytes: int, names: dict = PLAN_OPTIONS) -> list[Advice]:
    """Changes that make the run fit, each checked by re-running the planner; [] if it fits.

    Tried one at a time, in this order: smaller micro-batch, checkpointing on, shorter sequence,
    smaller rank, offload of activations, the MLP in tiles; then offload and tiles together where
    neither fits alone. If no single change fits, they are
    combined (micro-batch 1 and checkpointing, then offload and tiles, then the sequence and the
    rank), each at its most conservative setting, until the plan fits. If even that does not fit,
    one Advice with empty changes says so. `names` spells the options (a knob named None is not
    offered).
    """
    offload = names.get("offload_activations") is not None
    if fits(plan(arch, cfg), gpu_bytes):
        return []
    if cfg.keep_activations:
        # layers left whole spend memory for speed: giving them back comes first, and the other
        # changes are tried without them (offload and tiles exclude them)
        lean = replace(cfg, keep_activations=False)
        first = [Advice(_changes(cfg, lean), _describe(cfg, lean, names), plan(arch, lean))]
        if fits(first[0].breakdown, gpu_bytes):
            return first
        # each relative to the run as asked; a verdict that nothing fits stays one
        return [Advice(_changes(cfg, a.breakdown.cfg), _describe(cfg, a.breakdown.cfg, names),
                       a.breakdown) if a.changes else a
                for a in advise(arch, lean, gpu_bytes, names)]
    # MLP tiles are offered where they act: not for a mixture of experts' sparse blocks
    tiles = not cfg.tile_mlp and mlp_tile_tokens(arch, replace(cfg, tile_mlp=True)) is not None
    singles: list[PlanConfig | None] = []
    if cfg.micro_batch > 1:
        singles.append(_first_halving_that_fits(arch, cfg, gpu_bytes, "micro_batch", cfg.micro_batch // 2, 1))
    if not cfg.checkpointing:
        singles.append(replace(cfg, checkpointing=True))
    shortest = max(128, cfg.prompt_len + 1)  # a sequence is longer than its prompt
    if cfg.seq_len > shortest:
        singles.append(_first_halving_that_fits(arch, cfg, gpu_bytes, "seq_len", cfg.seq_len // 2, shortest))
    if cfg.r > 4:
        singles.append(_first_halving_that_fits(arch, cfg, gpu_bytes, "r", cfg.r // 2, 4))
    if offload and not cfg.offload_activations and cfg.checkpointing:
        singles.append(replace(cfg, offload_activations=True))
    if tiles:
        singles.append(replace(cfg, tile_mlp=True))
    out = []
    for new in singles:
        if new is not None:
            b = plan(arch, new)
            if fits(b, gpu_bytes):
                out.append(Advice(_changes(cfg, new), _describe(cfg, new, names), b))
    # offload and tiles together, where neither alone fits: they change nothing of what the run
    # computes, which a shorter sequence or a smaller rank does (qlora train's auto picks them)
    if (offload and cfg.checkpointing and not cfg.offload_activations and tiles
            and not any(a.changes.keys() & {"offload_activations", "tile_mlp"} for a in out)):
        both = replace(cfg, offload_activations=True, tile_mlp=True)
        b = plan(arch, both)
        if fits(b, gpu_bytes):
            out.append(Advice(_changes(cfg, both), _describe(cfg, both, names), b))
    if out:
        return out
    # Combine: micro-batch 1 and checkpointing on; then offload and MLP tiles (which change
    # nothing of what the run computes); then the longest sequence, the largest rank; a knob
    # that cannot make it fit alone is left at its floor.
    combined = replace(cfg, micro_batch=1, checkpointing=True)
    if fits(plan(arch, combined), gpu_bytes):
        return [Advice(_changes(cfg, combined), _describe(cfg, combined, names), plan(arch, combined))]
    combined = replace(combined, offload_activations=offload or cfg.offload_activations,
                       tile_mlp=cfg.tile_mlp or tiles)
    if fits(plan(arch, combined), gpu_bytes):
        return [Advice(_changes(cfg, combined), _describe(cfg, combined, names), plan(arch, combined))]
    for knob, floor in (("seq_len", shortest), ("r", 4)):
        trial = _first_halving_that_fits(arch, combined, gpu_bytes, knob, getattr(combined, knob), floor)
        if trial is not None:
            return [Advice(_changes(cfg, trial), _describe(cfg, trial, names), plan(arch, trial))]
        combined = replace(combined, **{knob: min(getattr(combined, knob), floor)})
    b = plan(arch, combined)
    more = _min_fsdp_gpus(arch, replace(cfg, micro_batch=1, checkpointing=True), gpu_bytes)
    text = (f"does not fit even with {_describe(cfg, combined, names)}: the static part alone is "
            f"{gib(b.static + b.optimizer_paged):.1f} GiB; use a larger GPU"
            + (f" or {more} GPUs with FSDP sharding" if more else ""))
    return [Advice({}, text, b)]


def _first_halving_that_fits(arch: ArchSpec, cfg: PlanConfig, gpu_bytes: int, field_name: str,
                             start: int, floor: int) -> PlanConfig | None:
    """`cfg` with `field_name` at the first of start, start // 2, ... down to `floor` whose plan
    fits (None if none does); not bisected: see _largest_that_fits."""
    value = start
    while value >= floor:
        new = replace(cfg, **{field_name: value})
        if fits(plan(arch, new), gpu_bytes):
            return new
        value //= 2
    return None


def _describe(cfg: PlanConfig, new: PlanConfig, names: dict = PLAN_OPTIONS) -> str:
    parts = []
    if new.keep_activations != cfg.keep_activations:
        parts.append(names["keep_activations"])
    if new.micro_batch != cfg.micro_batch:
        k = cfg.micro_batch // new.micro_batch
        parts.append(f"{names['micro_batch']} {new.micro_batch} (and x{k} gradient accumulation to keep the batch)")
    if new.checkpointing != cfg.checkpointing:
        parts.append(names["checkpointing"])
    if new.seq_len != cfg.seq_len:
        parts.append(f"{names['seq_len']} {new.seq_len}")
    if new.r != cfg.r:
        parts.append(f"{names['r']} {new.r}")
    if new.offload_activations != cfg.offload_activations:
        parts.append(names["offload_activations"])
    if new.tile_mlp != cfg.tile_mlp:
        parts.append(names["tile_mlp"])
    return " + ".join(parts)


def _changes(old: PlanConfig, new: PlanConfig) -> dict:
    return {f: getattr(new, f) for f in old.__dataclass_fields__ if getattr(old, f) != getattr(new, f)}


def _min_fsdp_gpus(arch: ArchSpec, cfg: PlanConfig, gpu_bytes: int, most: int = 8) -> int | None:
    for n in range(2, most + 1):
        if fits(plan(arch, replace(cfg, gpus=n, sharding="fsdp")), gpu_bytes):
            return n
    return None
