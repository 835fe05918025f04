"""plan(): the memory of one training step of a native model, part by part, from the tensors
autograd keeps (the model of a step: qlora/memory/__init__.py); a model on the generic path goes
to generic.coarse_plan.

plan() reads as the step's parts in turn: the frozen weights, the adapters and their optimizer,
what one layer keeps and makes per token (_PerToken), the activations saved through the forward,
the loss, the dequantized weight, the backward's peak, the reference forward of a preference
method, then what several GPUs change. The parts append their notes (Breakdown.notes) as they go,
so the notes read in that order."""

from __future__ import annotations

from dataclasses import dataclass, replace

from qlora.errors import QloraError
from qlora.memory.activations import (backward_working_bytes_per_token, layer_activation_terms,
                                      mlp_side_bytes_per_token, mlp_tile_tokens, rerun_terms,
                                      split_mlp_terms, whole_layer_bytes_per_token)
from qlora.memory.attention import (attention_backward_bytes_per_token, attention_softcap,
                                    capped_scores_in_torch, gathered_key_bytes,
                                    kept_attention_layer_bytes, kept_attention_layers,
                                    keeps_attention)
from qlora.memory.breakdown import Breakdown
from qlora.memory.generic import coarse_plan
from qlora.memory.host import embedding_in_host_memory, host_offload_bytes, offload_applies
from qlora.memory.loss import loss_peak_bytes
from qlora.memory.preference import reference_moment_bytes
from qlora.memory.settings import (DTYPE_BYTES, EXPERT_TARGETS, MLP_LINEARS, PlanConfig,
                                   expert_targets, fast_path, step_tokens, target_names,
                                   torch_norms, whole_layers)
from qlora.memory.sizes import CUBLAS_WORKSPACE_BYTES, alloc, gib
from qlora.memory.weights import (adapter_tensors, expert_part_elements, expert_stack_bytes,
                                  layer_weight_terms, optimizer_state_bytes,
                                  quantized_linear_tensors, rerun_dense_weights, rerun_expert_dense,
                                  tile_dequant_bytes)
from qlora.methods import method_module
from qlora.models.generic import GenericSpec
from qlora.models.spec import ArchSpec
from qlora.quant import FOUR_BIT_METHODS


def plan(arch: ArchSpec | GenericSpec, cfg: PlanConfig = PlanConfig()) -> Breakdown:
    """Predict the per-GPU memory of one training step of `arch` under `cfg` (coarsely for a
    model on the generic path: coarse_plan)."""
    if isinstance(arch, GenericSpec):
        return coarse_plan(arch, cfg)
    cfg.validate()
    _check_targets_present(arch, cfg)
    notes: list[str] = []
    frozen = _frozen_weights(arch, cfg, notes)
    trainable = _adapters_and_optimizer(arch, cfg)
    per_token = _per_token(arch, cfg, notes)
    activations, copies, forward_copies = _saved_activations(arch, cfg, per_token, notes)
    loss = _loss_peak(arch, cfg, notes)
    _note_attention(arch, cfg, per_token.tokens, notes)
    dequant = _dequantized_weight(arch, cfg, per_token.tokens, notes)
    if cfg.checkpointing:
        backward_activations, backward, dequant = _checkpointed_backward_peak(arch, cfg, per_token,
                                                                              dequant)
    else:
        backward_activations, backward = _backward_without_checkpointing(arch, per_token)
    # the cuBLAS workspaces and the batch (ids, labels, positions) always, the dequantized
    # weight inside a quantized matmul
    workspace = CUBLAS_WORKSPACE_BYTES + 3 * 8 * per_token.tokens + dequant
    reference = _reference_forward(arch, cfg, per_token.tokens, notes)
    one_gpu = Breakdown(
        arch=arch, cfg=cfg, base=frozen.base, embeddings=frozen.embeddings, norms=frozen.norms,
        adapters=trainable.adapters, optimizer=trainable.optimizer,
        optimizer_paged=trainable.optimizer_paged, activations=activations, adapter_copies=copies,
        forward_copies=forward_copies, loss=loss, backward=int(backward),
        adapter_grads=trainable.grads,
        layer_grads=trainable.layer_grads, optimizer_step=trainable.optimizer_step,
        workspace=workspace, dequant=dequant, reference=reference,
        adapter_params=sum(trainable.numels), notes=notes,
        backward_activations=int(backward_activations),
        flat_grads=cfg.flat_grads and (cfg.gpus == 1 or cfg.sharding == "ddp"))
    b = _across_gpus(arch, cfg, one_gpu, frozen.layer, trainable.numels) if cfg.gpus > 1 else one_gpu
    b.notes.extend(_memory_outside_allocator_notes(arch, cfg, b.optimizer_paged))
    return b


def _check_targets_present(arch: ArchSpec, cfg: PlanConfig) -> None:
    """Refuse, as the training run would (adapters.py), targets that plan no adapter (known names
    this family's block lacks: Phi-3's q_proj, its q, k and v being one qkv_proj) and DoRA on
    expert projections (PEFT's LoRA on expert parameters has none)."""
    option = "--targets (qlora train: target_modules)"
    named = cfg.targets if isinstance(cfg.targets, str) else ",".join(cfg.targets)
    experts = expert_targets(cfg.targets, arch)
    if not target_names(cfg.targets, arch) and not experts:
        present = target_names("all-linear", arch) + (EXPERT_TARGETS if arch.moe else ())
        raise QloraError(f"{option}: {named} match no linear layer of this {arch.model_type} model; "
                         f"use all-linear or some of {', '.join(present)}")
    if cfg.dora and experts:
        raise QloraError(f"{option}: DoRA cannot adapt expert projections (PEFT's LoRA on expert "
                         f"parameters has no DoRA); leave experts.gate_up_proj and experts.down_proj "
                         f"out (name the attention projections), or use LoRA")


# --- static: what lives across steps --------------------------------------------------------------
@dataclass(frozen=True)
class _Frozen:
    base: int  # the decoder's linears (quantized), their biases, a mixture of experts' stacks
    embeddings: int
    norms: int
    layer: int  # one layer's linears without a mixture of experts' MLP (what FSDP gathers)


def _frozen_weights(arch: ArchSpec, cfg: PlanConfig, notes: list[str]) -> _Frozen:
    """The frozen weights on the GPU: the linears as quantized, embeddings, head and norms in
    `nonquant_dtype`."""
    rnd = cfg.alloc_rounding
    L, h, v = arch.num_layers, arch.hidden_size, arch.vocab_size
    nbytes = DTYPE_BYTES[cfg.nonquant_dtype]
    base_layer = mlp_layer = 0
    moe = arch.moe is not None
    for name, n_in, n_out in arch.linears():
        weight = sum(alloc(s, rnd) for s in
                     quantized_linear_tensors(n_out, n_in, cfg.quant, cfg.double_quant, cfg.blocksize))
        if moe and name in MLP_LINEARS:  # a mixture of experts' dense layers only
            mlp_layer += weight
            continue
        base_layer += weight
        if arch.qkv_bias and name in ("q_proj", "k_proj", "v_proj"):
            base_layer += alloc(2 * n_out, rnd)  # bias stays in bf16
    base = L * base_layer
    if moe:
        sparse = arch.moe.num_sparse_layers
        base += (L - sparse) * mlp_layer + sparse * expert_stack_bytes(arch, cfg)
        notes.append(f"{arch.moe.num_experts} experts in {sparse} of {L} layers, "
                     f"{arch.moe.top_k} per token: {gib(sparse * expert_stack_bytes(arch, cfg)):.2f}"
                     " GiB of expert weights")
    host_embedding = embedding_in_host_memory(arch, cfg)
    embeddings = alloc(v * h * nbytes, rnd) * (1 if arch.tie_word_embeddings or host_embedding else 2)
    if host_embedding:
        notes.append(f"input embedding in pinned host memory: {gib(v * h * nbytes):.2f} GiB "
                     "of host RAM, not on the GPU")
    norms = sum(alloc(n * nbytes, rnd) for n in arch.norm_sizes())
    return _Frozen(base=base, embeddings=embeddings, norms=norms, layer=base_layer)


@dataclass(frozen=True)
class _Trainable:
    numels: list[int]  # every adapter tensor's elements (adapter_tensors)
    adapters: int
    grads: int
    layer_grads: int
    optimizer: int
    optimizer_paged: int
    optimizer_step: int


def _adapters_and_optimizer(arch: ArchSpec, cfg: PlanConfig) -> _Trainable:
    """Adapters (static), their gradients (made in backward, set to None after the step),
    optimizer states (static from the first step on)."""
    rnd = cfg.alloc_rounding
    numels = adapter_tensors(arch, cfg)
    abytes = DTYPE_BYTES[cfg.adapter_dtype]
    adapters = sum(alloc(n * abytes, rnd) for n in numels)
    grads = sum(alloc(n * abytes, rnd) for n in numels)
    opt, opt_paged, opt_step = optimizer_state_bytes(numels, cfg)
    return _Trainable(numels=numels, adapters=adapters, grads=grads,
                      layer_grads=-(-grads // arch.num_layers), optimizer=opt,
                      optimizer_paged=opt_paged, optimizer_step=opt_step)


# --- activations: what one layer keeps and makes, per token ---------------------------------------
@dataclass(frozen=True)
class _PerToken:
    """What the saved activations and the backward's peak share: bytes per token of the step's
    `tokens` (floats where the MLP runs in tiles: one tile's spread over the tokens)."""
    tokens: int  # of one micro-batch's forward with grad (step_tokens)
    terms: dict[str, float]  # what a layer saves for backward (layer_activation_terms)
    tile: int | None  # the MLP's tile (mlp_tile_tokens), None: whole
    per_layer: float  # the sum of `terms`, less the tiled MLP's inside
    per_layer_weights: int  # the adapter copies a layer's graph keeps (layer_weight_terms)
    layer_input: int  # the bf16 hidden state entering a layer
    final: int  # after the layers: the final norm and the loss's input
    rope: int  # RoPE's cos and sin
    working: float  # a layer's backward at its MLP's moment
    attention_extra: int  # a layer's backward at attention's moment
    offloaded: bool  # the checkpointed layer inputs in host memory (offload_applies)
    inputs_on_gpu: int  # checkpointed layer inputs on the GPU at once
    kept_layers: int  # checkpointed layers that keep attention for backward (keep_attention)
    whole: int  # the last layers that checkpointing leaves whole (keep_activations)
    whole_per_layer: float  # what each of them saves (whole_layer_bytes_per_token)
    kept_each: int  # what one of them keeps over the micro-batch (not per token)
    products: int  # the fast path's LoRA products a checkpointed layer keeps for its rerun
    gathered_keys: int  # a layer's gathered prompt keys over the micro-batch (gathered_key_bytes)


def _per_token(arch: ArchSpec, cfg: PlanConfig, notes: list[str]) -> _PerToken:
    L, h = arch.num_layers, arch.hidden_size
    tokens = step_tokens(cfg)
    terms = layer_activation_terms(arch, cfg)
    tile = mlp_tile_tokens(arch, cfg)
    per_layer, working = _layer_saved_and_mlp_backward(arch, cfg, terms, tile, tokens, notes)
    # After the layers: the final norm (fp32 input copy + rstd, eager), the loss's input (the
    # normed hidden state of the label positions: alive through the loss's forward, and kept by
    # each chunk's checkpoint until the loss's backward in `chunked`) with its int64
    # gather indices and targets; RoPE cos/sin in bf16, computed once and shared by all layers.
    final = (4 if torch_norms(arch, cfg) else 2) * h + 4 + 2 * h + 8 + 8
    # Gemma 3: a second table pair for its sliding layers' own RoPE base
    rope = 2 * 2 * arch.head_dim * (2 if arch.model_type == "gemma3_text" else 1)
    offloaded = offload_applies(cfg)
    kept_layers = kept_attention_layers(arch, cfg)
    kept_each = kept_attention_layer_bytes(arch, cfg) if kept_layers else 0
    # attention's backward, the layer's other moment (the MLP's is `working`): what attention
    # keeps and the layer's first norm, the gradients of the residual stream and of attention's
    # output, and what flash's backward makes
    attention_extra = (2 * h + 2 * arch.num_heads * arch.head_dim
                       + attention_backward_bytes_per_token(arch, cfg)
                       - mlp_side_bytes_per_token(arch, cfg, terms, bool(tile)))
    # Non-reentrant checkpointing keeps each layer's input; backward recomputes one layer.
    # Offloaded (speed/offload.py), two inputs are on the GPU at any time: in forward the one
    # still being copied out and the next; at the loss the last layer's (kept) and, at its
    # backward, the one fetched ahead. On the fast path each layer also keeps its LoRA products
    # H [tokens, r] per target for the rerun (kernels/lora.py), which then draws no dropout mask
    # again: on the GPU, offloaded or not.
    products = 2 * cfg.r * len(target_names(cfg.targets, arch)) if fast_path(cfg) else 0
    whole = whole_layers(arch, cfg)
    inputs_on_gpu = min(2, L) if offloaded else L - whole  # offload leaves no layer whole
    return _PerToken(tokens=tokens, terms=terms, tile=tile, per_layer=per_layer,
                     per_layer_weights=sum(layer_weight_terms(arch, cfg).values()),
                     layer_input=2 * h, final=final, rope=rope, working=working,
                     attention_extra=attention_extra, offloaded=offloaded,
                     inputs_on_gpu=inputs_on_gpu, kept_layers=kept_layers, whole=whole,
                     whole_per_layer=whole_layer_bytes_per_token(arch, cfg, terms),
                     kept_each=kept_each,
                     products=products, gathered_keys=gathered_key_bytes(arch, cfg))


def _layer_saved_and_mlp_backward(arch: ArchSpec, cfg: PlanConfig, terms: dict[str, float],
                                  tile: int | None, tokens: int, notes: list[str]) -> tuple[float, float]:
    """(what a layer saves for backward, its backward at the MLP's moment), per token.

    With the MLP in tiles (mlp_tile_tokens), what the MLP keeps inside it and the gradients it
    makes are one tile's, not the sequence's; the tiled MLP keeps only its input (a term outside
    the MLP's inside) and makes its input's gradient whole."""
    working = backward_working_bytes_per_token(arch, cfg)
    if not tile:
        return sum(terms.values()), working
    outside, inside = split_mlp_terms(terms)
    mlp_working = 3 * 2 * arch.intermediate_size  # backward_working_bytes_per_token's MLP part
    # one tile's inside and gradients, spread over the tokens. The tiled MLP's input gradient,
    # written tile by tile into one [tokens, hidden] tensor, is the gradient going out that
    # backward_working_bytes_per_token counts beside the one coming in (2 x 2h): no more.
    tile_extra = tile * (inside + mlp_working) / tokens
    notes.append(f"MLP in sequence tiles of {tile} tokens: its intermediates are one tile's "
                 f"({gib(tile * (inside + mlp_working)):.2f} GiB in backward)")
    return outside, working + (tile_extra - mlp_working)


def _saved_activations(arch: ArchSpec, cfg: PlanConfig, t: _PerToken,
                       notes: list[str]) -> tuple[int, int, int]:
    """What the forward leaves saved for backward at its end, and the adapter copies the graph
    keeps: at a layer's backward (one layer's under checkpointing, which reruns one layer at a
    time, or the whole layers' where keep_activations leaves some) and at the loss (checkpointed
    layers keep none from their first run)."""
    L = arch.num_layers
    if not cfg.checkpointing:
        saved = t.tokens * (L * t.per_layer + t.final + t.rope) + L * t.gathered_keys
        return int(saved), L * t.per_layer_weights, L * t.per_layer_weights
    # kept attention stays on the GPU under offload too (its own saved-tensor hooks)
    if t.kept_layers:
        notes.append(f"attention kept for backward in {t.kept_layers} of {L} "
                     f"layers: {gib(t.kept_layers * t.kept_each):.2f} GiB (keep_attention)")
    whole = t.tokens * t.whole * t.whole_per_layer + t.whole * t.gathered_keys
    if t.whole:
        notes.append(f"the last {t.whole} of {L} layers not checkpointed, every activation kept: "
                     f"{gib(whole):.2f} GiB (keep_activations)")
    checkpointed = L - t.whole
    activations = (t.tokens * (t.inputs_on_gpu * t.layer_input + checkpointed * t.products
                               + t.final + t.rope)
                   + t.kept_layers * t.kept_each + whole)
    return (int(activations), max(t.whole, 1) * t.per_layer_weights,
            t.whole * t.per_layer_weights)


# --- the loss and the weights a matmul dequantizes ------------------------------------------------
def _loss_peak(arch: ArchSpec, cfg: PlanConfig, notes: list[str]) -> int:
    loss, loss_note = loss_peak_bytes(arch, cfg)
    notes.append(f"logits/loss: {loss_note}")
    return loss


def _note_attention(arch: ArchSpec, cfg: PlanConfig, tokens: int, notes: list[str]) -> None:
    """Attention that the speed layer does not run as flash or cannot keep: Gemma 2's soft-capped
    scores; keep_attention for a model whose attention is always recomputed."""
    if capped_scores_in_torch(arch, cfg):
        scores = tokens * (8 * arch.num_heads + 1) * cfg.seq_len
        notes.append(f"soft-capped attention (Gemma 2) runs in torch, not flash: its scores are "
                     f"{gib(scores):.2f} GiB a layer, kept while that layer runs backward "
                     "(fused_kernels: flex_attention, without them)")
    elif attention_softcap(arch) is not None:
        notes.append("soft-capped attention (Gemma 2) through flex_attention: no [heads, T, T] "
                     "scores kept")
    if cfg.keep_attention and cfg.checkpointing and not keeps_attention(arch, cfg):
        notes.append(f"keep_attention: {arch.model_type}'s attention is recomputed in backward "
                     "(the speed layer keeps none of it)")


def _dequantized_weight(arch: ArchSpec, cfg: PlanConfig, tokens: int, notes: list[str]) -> int:
    """Inside a quantized matmul (forward and backward alike) the frozen weight dequantized, with
    double quant first its fp32 absmax."""
    largest = max(arch.linears(), key=lambda x: x[1] * x[2])
    n_largest = largest[1] * largest[2]
    experts = expert_part_elements(arch, cfg)
    dequant = 0
    if cfg.quant in FOUR_BIT_METHODS:
        dequant = 2 * n_largest + (4 * -(-n_largest // cfg.blocksize) if cfg.double_quant else 0)
        # the stack kernel reads the nested scales itself: no fp32 absmax beside the part
        dequant = max(dequant, 2 * experts)
    elif cfg.quant == "int8":
        # backward turns int8 rows back to bf16; forward quantizes the input to int8 and gets int32
        dequant = 2 * n_largest + tokens * (largest[1] + 4 * largest[2])
    if cfg.dora:
        # DoRA (qlora.adapters) takes the row norms of W + s·BA each forward: the dequantized
        # weight, B @ A and their sum in bf16, for the largest target (estimate).
        t = [x for x in arch.linears() if x[0] in target_names(cfg.targets, arch)]
        big = max(t, key=lambda x: x[1] * x[2])
        dequant += 3 * 2 * big[1] * big[2]
        notes.append("DoRA: its workspace term is an estimate")
    return dequant


# --- the backward's peak --------------------------------------------------------------------------
def _backward_without_checkpointing(arch: ArchSpec, t: _PerToken) -> tuple[float, float]:
    """(activations still saved, the layer's backward) at the last layer's backward, every layer's
    activations saved since the forward."""
    backward = t.tokens * max(t.working, t.attention_extra)
    # the last layer's backward comes after the final norm's and the loss's: theirs are gone
    backward_activations = (t.tokens * (arch.num_layers * t.per_layer + t.rope)
                            + arch.num_layers * t.gathered_keys)
    return backward_activations, backward


def _checkpointed_backward_peak(arch: ArchSpec, cfg: PlanConfig, t: _PerToken,
                                dequant: int) -> tuple[float, float, int]:
    """(activations still saved, the layer's backward, the dense weights beside it) at the layer
    backward that peaks; the dense weights are that phase's dequantized weight.

    The layer whose backward peaks, and at which of its two moments (the MLP's, with the dense
    weights the rerun kept and one more being dequantized; attention's). Where keep_activations
    leaves the last layers whole, the last one's backward comes first, every activation alive
    and nothing rerun. Then the last checkpointed layer (every checkpointed input alive, the
    kept attention with it) and, with attention kept in its last N < all layers, the last that
    reruns its attention (N inputs fewer, none kept, its q, k, v recomputed and their dense
    weights kept) are candidates."""
    L = arch.num_layers
    best = None
    if t.whole:
        before = (t.tokens * ((L - t.whole) * (t.layer_input + t.products)
                              + t.whole * t.whole_per_layer + t.rope)
                  + t.kept_layers * t.kept_each + t.whole * t.gathered_keys)
        best = (before, t.tokens * max(t.working, t.attention_extra), dequant)
    last = L - 1 - t.whole  # the last checkpointed layer (none: -1)
    candidates = [(last, t.kept_layers > 0)] if last >= 0 else []
    if 0 < t.kept_layers <= last:
        candidates.append((last - t.kept_layers, False))
    # a tile's backward dequantizes gate and up together (the fast path's group)
    dequant_now = max(dequant, tile_dequant_bytes(arch, cfg)) if t.tile else dequant
    for layer, kept_here in candidates:
        alive = layer + 1  # layer inputs and products of this layer and the ones before it
        kept_alive = t.kept_layers - (last - layer) if kept_here else 0
        before = t.tokens * ((t.inputs_on_gpu if t.offloaded else alive) * t.layer_input
                             + alive * t.products + t.rope) + kept_alive * t.kept_each
        rerun = sum(rerun_terms(arch, cfg, t.terms, kept_here, bool(t.tile)).values())
        if t.tile:
            rerun -= split_mlp_terms(t.terms)[1]
        kept_dense, attention_dense = rerun_dense_weights(arch, cfg, kept_here, bool(t.tile))
        # a sparse layer's last part of each projection of experts, kept by its rerun (gone by
        # attention's backward), beside a fresh part: an upper bound (rerun_expert_dense says why)
        layer_dense = dequant_now + rerun_expert_dense(arch, cfg)
        # a rerun attention gathers its prompt keys again (a kept one's are keep_attention's)
        gathered = 0 if kept_here else t.gathered_keys
        moments = [(t.tokens * (rerun + t.working) + gathered, kept_dense + layer_dense),
                   (t.tokens * (rerun + t.attention_extra) + gathered, attention_dense)]
        moment, dense = max(moments, key=sum)
        if best is None or before + moment + dense > sum(best):
            best = (before, moment, dense)
    return best


# --- preference methods' reference forward --------------------------------------------------------
def _reference_forward(arch: ArchSpec, cfg: PlanConfig, tokens: int, notes: list[str]) -> int:
    """The reference forward's own moment (0 for none). It runs after the policy's loss and is
    gone before its backward: a moment of its own (Breakdown.phases), not workspace alive in
    every phase."""
    method = method_module(cfg.method)
    if method is not None:
        once = f", each prompt of {cfg.prompt_len} tokens packed once" if cfg.prompt_len else ""
        saved = ("the example's activations saved, its KL sequence's forward under no_grad"
                 if method.LAYOUT == "unpaired" else f"two sequences per example{once}")
        notes.append(f"{cfg.method}: {saved} ({tokens} tokens with grad a micro-batch); "
                     "log-probs per token from the model's chunked loss")
    reference = reference_moment_bytes(arch, cfg)
    if reference:
        notes.append(f"{cfg.method}: reference forward (adapters off, no grad) "
                     f"{gib(reference):.2f} GiB, an estimate, after the policy's loss and "
                     "before its backward")
    return reference


# --- several GPUs, and what is not in the allocator -----------------------------------------------
def _across_gpus(arch: ArchSpec, cfg: PlanConfig, b: Breakdown, frozen_layer: int,
                 numels: list[int]) -> Breakdown:
    """Several GPUs: data parallel replicates everything and sums the flat gradient buffers in
    place (no bucket copy: train/distributed.all_reduce_grads); FSDP shards the weights,
    adapters, grads and optimizer, and gathers one layer at a time (twice: current +
    prefetched)."""
    n = cfg.gpus
    if cfg.sharding == "ddp":
        b.notes.append(f"data parallel over {n} GPUs: each holds a full copy; micro-batch is "
                       "per GPU")
        return b
    rnd = cfg.alloc_rounding
    abytes = DTYPE_BYTES[cfg.adapter_dtype]
    one_layer_adapters = numels[: len(numels) // arch.num_layers]
    layer_full = frozen_layer + sum(alloc(x * abytes, rnd) for x in one_layer_adapters)
    # sharded parameters are stepped by torch AdamW (train/distributed.sharded_optim)
    opt, opt_paged, opt_step = optimizer_state_bytes(numels, replace(cfg, optimizer="adamw_torch"))
    embedding = alloc(arch.vocab_size * arch.hidden_size * DTYPE_BYTES[cfg.nonquant_dtype], rnd)
    gathered = 2 * layer_full + embedding  # + the gathered embedding/head
    b.notes.append(f"FSDP over {n} GPUs: weights, adapters, grads, optimizer (torch AdamW) "
                   "sharded; two gathered layers and the gathered embedding/head in workspace")
    return replace(b, base=-(-b.base // n), embeddings=-(-b.embeddings // n), norms=-(-b.norms // n),
                   adapters=-(-b.adapters // n), adapter_grads=-(-b.adapter_grads // n),
                   optimizer=-(-opt // n), optimizer_paged=-(-opt_paged // n),
                   optimizer_step=-(-opt_step // n), workspace=b.workspace + gathered,
                   dequant=b.dequant + gathered)


def _memory_outside_allocator_notes(arch: ArchSpec, cfg: PlanConfig, optimizer_paged: int) -> list[str]:
    """Host memory the run takes (offload), GPU memory torch's allocator does not count (paged
    optimizer states)."""
    notes = []
    if offload_applies(cfg):
        notes.append(f"offload: the checkpointed layer inputs wait in pinned host memory "
                     f"({gib(host_offload_bytes(arch, cfg)):.2f} GiB of host RAM); two are on "
                     "the GPU at a time")
    elif cfg.offload_activations:
        notes.append("offload: only the inputs checkpointing keeps are offloaded; without "
                     "checkpointing it does nothing")
    if cfg.optimizer.startswith("paged_") and optimizer_paged:
        notes.append("paged optimizer states are in CUDA managed memory: counted in total, "
                     "not in torch.cuda.max_memory_allocated")
    return notes
