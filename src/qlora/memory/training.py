"""`qlora train`'s side of the planner: the PlanConfig of a RunConfig, the check before anything is
loaded (the long-context choices, kept attention, auto-fit, a refusal naming what to change), and
the advice of an out-of-memory error mid-run."""

from __future__ import annotations

from dataclasses import replace

from qlora.errors import QloraError
from qlora.memory.activations import mlp_tile_tokens
from qlora.memory.arch import resolve_arch
from qlora.memory.attention import kept_attention_layer_bytes, kept_attention_layers
from qlora.memory.breakdown import fits, fits_tightly, needed_bytes, tight_fit_line
from qlora.memory.fitting import (TRAIN_OPTIONS, activation_layers_that_fit, advise,
                                  attention_layers_that_fit, auto_fit, long_context_choice,
                                  micro_batch_dividing)
from qlora.memory.host import check_host_offload, host_offload_bytes
from qlora.memory.settings import EXPERT_TARGETS, PlanConfig, whole_layers
from qlora.memory.sizes import GiB, gib, parse_size
from qlora.memory.step import plan
from qlora.methods import method_module
from qlora.models.generic import GenericSpec
from qlora.models.spec import KNOWN_BLOCK_LINEARS as PROJECTIONS  # every family's, in layer order
from qlora.models.spec import ArchSpec, last_layers


def plan_config_for_run(cfg, dtype=None, world_size: int = 1) -> PlanConfig:
    """The PlanConfig of a RunConfig (qlora.config): what `qlora train` will run, as the planner
    sees it. Target names the planner does not know (not one of the seven projections) are left
    out; the model layer refuses them later if they do not exist."""
    targets = "all-linear" if "all-linear" in cfg.target_modules else tuple(
        t.removeprefix("mlp.") for t in cfg.target_modules
        if t in PROJECTIONS or t.removeprefix("mlp.") in EXPERT_TARGETS) or "all-linear"
    name = str(dtype).removeprefix("torch.") if dtype is not None else "bfloat16"
    nonquant = {"float32": "fp32", "float16": "fp16"}.get(name, "bf16")
    return PlanConfig(quant=cfg.quant, double_quant=cfg.double_quant, r=cfg.lora_r, targets=targets,
                      dora=cfg.use_dora, lora_dropout=cfg.lora_dropout, nonquant_dtype=nonquant,
                      seq_len=cfg.max_seq_length, micro_batch=cfg.micro_batch_size,
                      checkpointing=cfg.gradient_checkpointing, optimizer=cfg.optim,
                      keep_attention=(getattr(cfg, "keep_attention", False) or False)
                      if cfg.gradient_checkpointing else False,
                      keep_activations=(getattr(cfg, "keep_activations", False) or False)
                      if cfg.gradient_checkpointing else False,
                      embedding_on_host=bool(getattr(cfg, "embedding_on_host", False)),
                      offload_activations=bool(getattr(cfg, "offload_activations", False)
                                               and cfg.gradient_checkpointing),
                      tile_mlp=getattr(cfg, "tile_mlp", False) or False,
                      kernels="fused" if getattr(cfg, "fused_kernels", False) else "eager",
                      gpus=world_size, sharding=cfg.sharding, **_method_fields(cfg))


def _method_fields(cfg) -> dict:
    """A preference run's method (its log-probs come per token from the model's own loss, the
    chunked one an SFT run uses: methods/preference.py)."""
    method = getattr(cfg, "method", "sft")
    if method_module(method) is None:  # SFT
        return {}
    # no prompt_len: the check plans the worst case for any micro-batch, each sequence whole
    return {"method": method,
            "reference_precomputed": bool(getattr(cfg, "precompute_ref_log_probs", False))}


def run_gpu_bytes(cfg, device) -> tuple[int | None, str]:
    """The GPU size to plan for: --gpu-memory, else the CUDA device's, else None (CPU run)."""
    if cfg.gpu_memory:
        return parse_size(cfg.gpu_memory, "--gpu_memory"), f"--gpu_memory {cfg.gpu_memory}"
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        props = torch.cuda.get_device_properties(device)
        return props.total_memory, f"{props.name} ({props.total_memory / GiB:.1f} GiB)"
    return None, ""


def check_run(cfg, device, dtype=None, world_size: int = 1, log=print):
    """Run the planner for `qlora train` before anything is loaded.

    Returns (cfg, facts): cfg possibly changed by --auto_fit (micro-batch, gradient accumulation,
    checkpointing), facts for the resolved config. Raises QloraError, naming what to change, when
    the run will not fit. On the CPU without --gpu_memory it only checks the keep_attention and
    keep_activations counts against the model's layers.
    """
    import dataclasses

    gpu_bytes, gpu_name = run_gpu_bytes(cfg, device)
    keep = cfg.keep_attention
    if gpu_bytes is None:  # keep_attention's default is on only where a plan says it fits
        for option in ("keep_attention", "keep_activations"):
            count = getattr(cfg, option)
            if count is not True and count:  # checked against the model's layers before loading
                last_layers(count, resolve_arch(model_dir=cfg.model).num_layers, option)
        return dataclasses.replace(cfg, keep_attention=keep or False,  # as are offload and tiles
                                   keep_activations=cfg.keep_activations or False,
                                   offload_activations=cfg.offload_activations or False,
                                   tile_mlp=cfg.tile_mlp or False), {}
    arch = resolve_arch(model_dir=cfg.model)
    pc = plan_config_for_run(cfg, dtype, world_size)
    if isinstance(arch, GenericSpec) and "all-linear" not in cfg.target_modules:
        pc = replace(pc, targets=tuple(cfg.target_modules))  # its own layer names (c_attn...)
    offload_auto, tile_auto = cfg.offload_activations is None, cfg.tile_mlp is None
    if offload_auto or tile_auto:
        # decided as if no layer were left whole: keep_activations spends spare memory, after
        pc = replace(long_context_choice(arch, replace(pc, keep_activations=False), gpu_bytes,
                                         offload_auto, tile_auto),
                     keep_activations=pc.keep_activations)
        cfg = dataclasses.replace(cfg, offload_activations=pc.offload_activations,
                                  tile_mlp=pc.tile_mlp)
        chosen = [text for on, text in (
            (offload_auto and pc.offload_activations, "offload_activations: on (the checkpointed layer inputs in "
             f"pinned host memory, {gib(host_offload_bytes(arch, pc)):.1f} GiB of it)"),
            (tile_auto and pc.tile_mlp, "tile_mlp: on (the MLP in sequence tiles of "
             f"{mlp_tile_tokens(arch, pc)} tokens)")) if on]
        if chosen:
            log("; ".join(chosen) + f": the memory plan fits {gib(gpu_bytes):.1f} GiB ({gpu_name}) "
                "only with " + ("them" if len(chosen) > 1 else "it") + " (set to false to turn off)")
    check_host_offload(arch, replace(pc, offload_activations=bool(cfg.offload_activations)),
                       chosen_by_plan=bool(cfg.offload_activations) and offload_auto)
    if cfg.keep_activations and (cfg.offload_activations or cfg.tile_mlp):
        raise QloraError(f"keep_activations: {cfg.keep_activations}, but the memory plan fits "
                         f"{gib(gpu_bytes):.1f} GiB ({gpu_name}) only with offload_activations or "
                         "tile_mlp, which exclude it: set keep_activations: false (or leave it "
                         "out)")
    if cfg.keep_attention is None:
        # the plan is per GPU, under torchrun (DDP, FSDP) too; auto_fit spends memory on the
        # micro-batch instead
        n = attention_layers_that_fit(arch, pc, gpu_bytes) if not cfg.auto_fit else 0
        keep = True if n == arch.num_layers else n or False
        cfg = dataclasses.replace(cfg, keep_attention=keep)
        pc = replace(pc, keep_attention=keep)
        if n:
            which = "each layer's" if keep is True else f"the last {n} of {arch.num_layers} layers'"
            log(f"keep_attention: {'on' if keep is True else n} ({which} attention kept for "
                "backward, not rerun: as many layers as the memory plan fits; keep_attention: "
                "false turns it off)")
    cfg, pc = _keep_activations_that_fit(cfg, arch, pc, gpu_bytes, gpu_name, log)
    b = plan(arch, pc)
    if kept_attention_layers(arch, pc) and not fits(b, gpu_bytes):
        n = attention_layers_that_fit(arch, pc, gpu_bytes)
        if n or fits(plan(arch, replace(pc, keep_attention=False)), gpu_bytes):
            kept = kept_attention_layers(arch, pc)
            kept_bytes = kept * kept_attention_layer_bytes(arch, pc)
            raise QloraError(
                f"this run fits in {gib(gpu_bytes):.1f} GiB ({gpu_name}) only with attention kept "
                f"in at most {n} layers (keep_attention keeps "
                f"~{gib(kept_bytes):.2f} GiB "
                f"in {kept}): set keep_attention: {n or 'false'} (or leave it out: as many as fit)")
    need = needed_bytes(b)
    coarse = " (a coarser estimate: the generic path)" if isinstance(arch, GenericSpec) else ""
    facts = {"memory plan": f"needs ~{gib(need):.1f} GiB of {gib(gpu_bytes):.1f} GiB ({gpu_name}), "
                            f"peak allocated ~{gib(b.allocated):.2f} GiB{coarse}"}
    if cfg.auto_fit:
        global_batch = cfg.micro_batch_size * cfg.gradient_accumulation_steps
        best = auto_fit(arch, pc, gpu_bytes, max_micro_batch=max(global_batch, 1),
                        global_batch=max(global_batch, 1))
        if best is None:
            smallest = replace(pc, micro_batch=1, checkpointing=True)
            # auto-fit picks only what fits with the usual slack; say so where the user's own
            # choice of the smallest step would still run (a tight fit, warned about)
            tight = ("; it may fit tightly (allocated peak and CUDA context within the GPU, not "
                     "the allocator's usual slack): to try it, leave out --auto_fit and set "
                     "--micro_batch_size 1 --gradient_checkpointing true"
                     if fits_tightly(plan(arch, smallest), gpu_bytes) else "")
            raise QloraError(
                f"--auto_fit: nothing fits in {gib(gpu_bytes):.1f} GiB ({gpu_name}), even micro-batch 1 with "
                f"gradient checkpointing (needs ~{gib(needed_bytes(plan(arch, smallest))):.1f} GiB){tight}. "
                "Change:\n" + "\n".join(_advice_lines(arch, smallest, gpu_bytes)))
        # the largest micro-batch that fits and divides the global batch, so the global batch
        # (micro-batch x accumulation) stays what the config asked for
        mb = micro_batch_dividing(global_batch, best.micro_batch)
        accum = global_batch // mb
        chosen = replace(best, micro_batch=mb)
        text = (f"auto-fit: micro-batch {mb} x gradient accumulation {accum} (global batch {global_batch} kept; "
                f"largest micro-batch that fits: {best.micro_batch}), gradient checkpointing "
                f"{'on' if chosen.checkpointing else 'off'}; was micro-batch {cfg.micro_batch_size} x "
                f"{cfg.gradient_accumulation_steps}, checkpointing {'on' if cfg.gradient_checkpointing else 'off'}; "
                f"needs ~{gib(needed_bytes(plan(arch, chosen))):.1f} of {gib(gpu_bytes):.1f} GiB ({gpu_name})")
        log(text)
        cfg = dataclasses.replace(cfg, micro_batch_size=mb, gradient_accumulation_steps=accum,
                                  gradient_checkpointing=chosen.checkpointing, auto_fit=False)
        facts = {"memory plan": text}
        return cfg, facts
    if fits_tightly(b, gpu_bytes):
        log("warning: " + tight_fit_line(b, gpu_bytes, gpu_name) + "\n"
            + "\n".join(_advice_lines(arch, pc, gpu_bytes)))
        if cfg.cuda_graphs:
            # Qwen3-30B-A3B's graphed step trained under a 22.35 GiB cap at 21.53 GiB allocated,
            # 22.06 reserved, planned 21.84 (H100, 2026-12-07; the planner has no term of its own
            # for a capture, docs/MEMORY.md); a capture that runs out of memory leaves the steps
            # eager
            log("cuda_graphs: on (if capturing the step runs out of memory, the steps run "
                "eagerly from there on)")
    elif not fits(b, gpu_bytes):
        raise QloraError(
            f"this run will not fit in {gib(gpu_bytes):.1f} GiB ({gpu_name}): the memory planner predicts{coarse} "
            f"~{gib(need):.1f} GiB (peak allocated {gib(b.allocated):.2f} GiB at the {b.peak_phase}, "
            f"+ paged optimizer states, allocator slack and CUDA context; `qlora plan --model {cfg.model}` "
            f"shows the parts). Change one of:\n" + "\n".join(_advice_lines(arch, pc, gpu_bytes))
            + "\nor pass --auto_fit true to pick the micro-batch and checkpointing automatically.")
    log(f"memory plan: {facts['memory plan']}")
    return cfg, facts


def _keep_activations_that_fit(cfg, arch, pc: PlanConfig, gpu_bytes: int, gpu_name: str, log):
    """keep_activations for the run: auto (None) leaves whole as many of the last layers as the
    memory plan fits, after keep_attention (under auto_fit none: it spends the memory on the
    micro-batch); a count that does not fit is refused with the count that does."""
    if cfg.keep_activations is None:
        n = activation_layers_that_fit(arch, pc, gpu_bytes) if not cfg.auto_fit else 0
        whole = True if n == arch.num_layers else n or False
        if n:
            which = "every layer" if whole is True else f"the last {n} of {arch.num_layers} layers"
            log(f"keep_activations: {'on' if whole is True else n} ({which} not checkpointed: "
                "every activation kept for backward, no rerun; as many layers as the memory plan "
                "fits; keep_activations: false turns it off)"
                + ("; keep_attention then keeps nothing: no layer is rerun"
                   if whole is True and pc.keep_attention else ""))
        return replace(cfg, keep_activations=whole), replace(pc, keep_activations=whole)
    if isinstance(arch, GenericSpec):  # no speed layer: the option is ignored, said in the log
        return cfg, pc
    lean = replace(pc, keep_activations=False)
    if whole_layers(arch, pc) and not fits(plan(arch, pc), gpu_bytes) and fits(plan(arch, lean),
                                                                               gpu_bytes):
        n = activation_layers_that_fit(arch, lean, gpu_bytes)
        raise QloraError(
            f"this run fits in {gib(gpu_bytes):.1f} GiB ({gpu_name}) only with at most {n} layers "
            f"left whole (keep_activations: {cfg.keep_activations} keeps every activation of "
            f"{whole_layers(arch, pc)}): set keep_activations: {n or 'false'} (or leave it out: "
            "as many as fit)")
    return cfg, pc


def _advice_lines(arch: ArchSpec, pc: PlanConfig, gpu_bytes: int) -> list[str]:
    lines = []
    for a in advise(arch, pc, gpu_bytes, names=TRAIN_OPTIONS):
        if a.changes:
            lines.append(f"  - {a.text}: ~{gib(needed_bytes(a.breakdown)):.1f} GiB")
        else:
            lines.append(f"  - {a.text}")
    return lines


def out_of_memory_error(cfg, device, err: BaseException, checkpoint=None, dtype=None,
                        world_size: int = 1) -> QloraError:
    """The QloraError `qlora train` raises when CUDA runs out of memory mid-run: what happened,
    the checkpoint kept, and the planner's advice against a budget the run did not have."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    lines = [f"out of GPU memory during training: {first}"]
    lines.append(f"checkpoint kept: {checkpoint} (continue with --resume latest after changing the options)"
                 if checkpoint else "no checkpoint was written yet (or it could not be saved)")
    try:
        arch = resolve_arch(model_dir=cfg.model)
        pc = plan_config_for_run(cfg, dtype, world_size)
        b = plan(arch, pc)
        gpu_bytes, gpu_name = run_gpu_bytes(cfg, device)
        need = needed_bytes(b)
        # The planner said (or would have said) it fits, yet memory ran out: other processes,
        # fragmentation or an estimate off. Advise changes that fit in 85% of what it predicted.
        budget = min(gpu_bytes or need, int(0.85 * need))
        lines.append(f"the planner predicted ~{gib(need):.1f} GiB"
                     + (f" on {gib(gpu_bytes):.1f} GiB ({gpu_name})" if gpu_bytes else "")
                     + f"; to need at most {gib(budget):.1f} GiB, change one of:")
        if pc.keep_activations:  # the first things to give back: speed, not the run's settings
            freed = need - needed_bytes(plan(arch, replace(pc, keep_activations=False)))
            if freed > 0:  # the first whole layer can cost nothing at the peak
                lines.append(f"  keep_activations: false (~{gib(freed):.1f} GiB less: every "
                             "layer checkpointed)")
                need -= freed
            pc = replace(pc, keep_activations=False)
        if pc.keep_attention:
            freed = need - needed_bytes(plan(arch, replace(pc, keep_attention=False)))
            lines.append(f"  keep_attention: false (~{gib(freed):.1f} GiB less: attention is "
                         "recomputed in backward instead of kept)")
            pc = replace(pc, keep_attention=False)
        lines += _advice_lines(arch, pc, budget)
    except QloraError as planner_err:  # a model the planner cannot read: still say what happened
        lines.append(f"(no memory plan: {planner_err})")
    lines.append("other processes on the GPU also take memory; PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "
                 "reduces fragmentation")
    return QloraError("\n".join(lines))
