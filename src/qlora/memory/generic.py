"""The generic path (transformers' own modules, models/generic.py): a coarser plan, the weights,
adapters and optimizer counted exactly, the activations estimated from the block's width."""

from __future__ import annotations

from dataclasses import replace

from qlora.errors import QloraError
from qlora.memory.breakdown import Breakdown
from qlora.memory.loss import loss_peak_bytes
from qlora.memory.settings import DTYPE_BYTES, PlanConfig, step_tokens
from qlora.memory.sizes import CUBLAS_WORKSPACE_BYTES, alloc
from qlora.memory.weights import optimizer_state_bytes, quantized_linear_tensors
from qlora.models.generic import GenericSpec, LinearLayer


def generic_targets(spec: GenericSpec, targets: str | tuple[str, ...] | list[str]
                    ) -> list[LinearLayer]:
    """The layers adapters go on: all-linear (PEFT's: every linear but the head) or the layers
    whose path is, or ends in "." + , a given name (as adapters.py and PEFT match); never one
    whose weight the model reads itself (generic.WEIGHT_READ_BY_MODEL: training refuses it)."""
    adaptable = [layer for layer in spec.linears if not layer.weight_read_by_model]
    if targets == "all-linear":
        return adaptable
    names = [t.strip() for t in targets.split(",") if t.strip()] if isinstance(targets, str) \
        else list(targets)
    refused = sorted({t for t in names for layer in spec.linears if layer.weight_read_by_model
                      and (layer.name == t or layer.name.endswith("." + t))})
    if refused:
        raise QloraError(f"--targets: {', '.join(refused)}: this {spec.model_type} model reads "
                         "their weights itself, so qlora train refuses adapters there; leave "
                         "them out (all-linear does)")
    chosen = [layer for layer in adaptable
              if any(layer.name == t or layer.name.endswith("." + t) for t in names)]
    unknown = [t for t in names if not any(l.name == t or l.name.endswith("." + t)
                                           for l in spec.linears)]
    if unknown or not chosen:
        leaves = sorted({layer.name.rsplit(".", 1)[-1] for layer in spec.linears})
        raise QloraError(f"--targets: {', '.join(unknown) or '(empty)'} match no linear layer of "
                         f"this {spec.model_type} model; use all-linear or some of {', '.join(leaves)}")
    return chosen


# Values a transformer block keeps per token for backward, in 16 bits, for a block of width h and
# MLP width i: the normed inputs of attention and MLP, q, k, v, the attention output, the MLP's
# two intermediate tensors, its activation and its product. The native decoder's terms, derived
# one by one (layer_activation_terms), come to about 9h + 4i at Llama's shapes; a generic block
# may keep more (biases, extra norms, its own dropout masks), hence the margin.
GENERIC_BLOCK_VALUES_PER_TOKEN = (12, 5)  # 12 h + 5 i


def coarse_plan(spec: GenericSpec, cfg: PlanConfig) -> Breakdown:
    """The memory of a training step of a model on the generic path (transformers' own modules).

    Coarser than plan(): the weights are counted exactly, layer by layer, from the model
    transformers builds (the quantized linears, everything else in 16 bits), and so are the
    adapters and the optimizer; the activations are not derived from the block's code but
    estimated from its width (GENERIC_BLOCK_VALUES_PER_TOKEN), and the loss reads whole logits.
    None of the speed layer applies (no fused kernels, no kept attention, no host embedding; no
    packed rows either, so a pair's prompt is never packed once: prompt_len counts for nothing),
    and FSDP sharding is not offered."""
    cfg.validate(targets=False)
    cfg = replace(cfg, kernels="eager", keep_attention=False, embedding_on_host=False,
                  loss="full", gpus=1, sharding="ddp", prompt_len=0)
    rnd = cfg.alloc_rounding
    nbytes = DTYPE_BYTES[cfg.nonquant_dtype]
    L, h, i = spec.num_layers, spec.hidden_size, spec.intermediate_size
    tokens = step_tokens(cfg)

    base = 0
    for layer in spec.linears:
        n_out, n_in = layer.out_features, layer.in_features
        sizes = (quantized_linear_tensors(n_out, n_in, cfg.quant, cfg.double_quant, cfg.blocksize)
                 if layer.quantized else [nbytes * n_out * n_in])
        base += sum(alloc(size, rnd) for size in sizes) + (alloc(nbytes * n_out, rnd) if layer.bias else 0)
    embeddings = alloc(spec.embedding_params * nbytes, rnd)
    others = alloc(spec.other_params * nbytes, rnd)

    targets = generic_targets(spec, cfg.targets)
    numels = [n for t in targets for n in
              [cfg.r * t.in_features, t.out_features * cfg.r] + ([t.out_features] if cfg.dora else [])]
    abytes = DTYPE_BYTES[cfg.adapter_dtype]
    adapters = sum(alloc(n * abytes, rnd) for n in numels)
    grads = adapters
    opt, opt_paged, opt_step = optimizer_state_bytes(numels, cfg)

    values_h, values_i = GENERIC_BLOCK_VALUES_PER_TOKEN
    lora = sum(2 * cfg.r + (2 * t.in_features if cfg.lora_dropout > 0 else 0) for t in targets) / L
    per_layer = 2 * (values_h * h + values_i * i) + lora
    copies = sum(alloc(2 * cfg.r * (t.in_features + t.out_features), rnd) for t in targets)
    working = 2 * 2 * h + 3 * 2 * i  # gradients in flight through one block
    if cfg.checkpointing:
        activations = tokens * (L * 2 * h + 2 * h)
        backward = tokens * (per_layer + working)
        copies = -(-copies // L)
    else:
        activations = tokens * (L * per_layer + 2 * h)
        backward = tokens * working
    loss, loss_note = loss_peak_bytes(spec, cfg)
    largest = max((l for l in spec.linears if l.quantized),
                  key=lambda l: l.in_features * l.out_features, default=None)
    dequant = 0
    if largest is not None and cfg.quant != "none":
        dequant = 2 * largest.in_features * largest.out_features
    workspace = CUBLAS_WORKSPACE_BYTES + 3 * 8 * tokens + dequant
    notes = [f"coarser estimate: {spec.model_type} ({spec.architecture}) runs on the generic path; "
             "its weights, adapters and optimizer are counted exactly, its activations estimated "
             "from the block's width, not derived: leave a margin",
             f"logits/loss: {loss_note} (the generic path's loss reads whole logits)"]
    return Breakdown(arch=spec, cfg=cfg, base=base, embeddings=embeddings, norms=others,
                     adapters=adapters, optimizer=opt, optimizer_paged=opt_paged,
                     activations=int(activations), adapter_copies=copies,
                     forward_copies=0 if cfg.checkpointing else copies, loss=loss,
                     backward=int(backward), adapter_grads=grads, layer_grads=-(-grads // L),
                     optimizer_step=opt_step, workspace=workspace, dequant=dequant,
                     adapter_params=sum(numels), notes=notes)
