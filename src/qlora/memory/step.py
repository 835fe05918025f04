"""plan(): the memory of one training step of a native model, part by part, from the tensors
autograd keeps (the model of a step: qlora/memory/__init__.py); a model on the generic path goes
to generic.coarse_plan."""

from __future__ import annotations

from dataclasses import replace

from qlora.memory.activations import (backward_working_bytes_per_token, layer_activation_terms,
                                      mlp_side_bytes_per_token, mlp_tile_tokens, rerun_terms,
                                      split_mlp_terms)
from qlora.memory.attention import (attention_backward_bytes_per_token, attention_softcap,
                                    capped_scores_in_torch, kept_attention_bytes_per_token,
                                    kept_attention_layers, keeps_attention, repeats_kv_heads)
from qlora.memory.breakdown import Breakdown
from qlora.memory.generic import coarse_plan
from qlora.memory.host import embedding_in_host_memory, host_offload_bytes, offload_applies
from qlora.memory.loss import loss_peak_bytes
from qlora.memory.preference import reference_forward_bytes
from qlora.memory.settings import (DTYPE_BYTES, MLP_LINEARS, PREFERENCE_METHODS, PlanConfig,
                                   fast_path, step_tokens, target_names, torch_norms)
from qlora.memory.sizes import CUBLAS_WORKSPACE_BYTES, alloc, gib
from qlora.memory.weights import (adapter_tensors, expert_run_elements, expert_stack_bytes,
                                  layer_weight_terms, optimizer_state_bytes,
                                  quantized_linear_tensors, rerun_dense_weights, tile_dequant_bytes)
from qlora.models.generic import GenericSpec
from qlora.models.spec import ArchSpec
from qlora.quant import FOUR_BIT_METHODS


def plan(arch: ArchSpec | GenericSpec, cfg: PlanConfig = PlanConfig()) -> Breakdown:
    """Predict the per-GPU memory of one training step of `arch` under `cfg` (coarsely for a
    model on the generic path: coarse_plan)."""
    if isinstance(arch, GenericSpec):
        return coarse_plan(arch, cfg)
    cfg.validate()
    rnd = cfg.alloc_rounding
    L, h, v = arch.num_layers, arch.hidden_size, arch.vocab_size
    tokens = step_tokens(cfg)
    nbytes = DTYPE_BYTES[cfg.nonquant_dtype]
    notes: list[str] = []

    # Static: frozen weights.
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

    # Trainable: adapters (static), their gradients (made in backward, set to None after the
    # step), optimizer states (static from the first step on).
    numels = adapter_tensors(arch, cfg)
    abytes = DTYPE_BYTES[cfg.adapter_dtype]
    adapters = sum(alloc(n * abytes, rnd) for n in numels)
    grads = sum(alloc(n * abytes, rnd) for n in numels)
    layer_grads = -(-grads // L)
    opt, opt_paged, opt_step = optimizer_state_bytes(numels, cfg)

    # Activations. With the MLP in tiles (mlp_tile_tokens), what the MLP keeps inside it and the
    # gradients it makes are one tile's, not the sequence's; the tiled MLP keeps only its input
    # (a term outside the MLP's inside) and makes its input's gradient whole.
    terms = layer_activation_terms(arch, cfg)
    per_layer = sum(terms.values())
    tile = mlp_tile_tokens(arch, cfg)
    if tile:
        outside, inside = split_mlp_terms(terms)
        mlp_working = 3 * 2 * arch.intermediate_size  # backward_working_bytes_per_token's MLP part
        per_layer = outside
        # one tile's inside and gradients, spread over the tokens. The tiled MLP's input gradient,
        # written tile by tile into one [tokens, hidden] tensor, is the gradient going out that
        # backward_working_bytes_per_token counts beside the one coming in (2 x 2h): no more.
        tile_extra = tile * (inside + mlp_working) / tokens
        notes.append(f"MLP in sequence tiles of {tile} tokens: its intermediates are one tile's "
                     f"({gib(tile * (inside + mlp_working)):.2f} GiB in backward)")
    per_layer_weights = sum(layer_weight_terms(arch, cfg).values())
    layer_input = 2 * h  # the bf16 hidden state entering a layer
    # After the layers: the final norm (fp32 input copy + rstd, eager), the loss's input (the
    # normed hidden state of the label positions: alive through the loss's forward, and kept by
    # each chunk's checkpoint until the loss's backward in `chunked`) with its int64
    # gather indices and targets; RoPE cos/sin in bf16, computed once and shared by all layers.
    final = (4 if torch_norms(arch, cfg) else 2) * h + 4 + 2 * h + 8 + 8
    # Gemma 3: a second table pair for its sliding layers' own RoPE base
    rope = 2 * 2 * arch.head_dim * (2 if arch.model_type == "gemma3_text" else 1)
    working = backward_working_bytes_per_token(arch, cfg)
    if tile:
        working += tile_extra - 3 * 2 * arch.intermediate_size
    offloaded = offload_applies(cfg)
    kept_layers = kept_attention_layers(arch, cfg)
    kept_each = (kept_attention_bytes_per_token(arch, cfg.seq_len, repeats_kv_heads(arch))
                 if kept_layers else 0)
    # attention's backward, the layer's other moment (the MLP's is `working`): what attention
    # keeps and the layer's first norm, the gradients of the residual stream and of attention's
    # output, and what flash's backward makes
    attention_extra = (2 * h + 2 * arch.num_heads * arch.head_dim
                       + attention_backward_bytes_per_token(arch, cfg)
                       - mlp_side_bytes_per_token(arch, cfg, terms, bool(tile)))
    if cfg.checkpointing:
        # Non-reentrant checkpointing keeps each layer's input; backward recomputes one layer.
        # Offloaded (speed/offload.py), two inputs are on the GPU at any time: in forward the one
        # still being copied out and the next; at the loss the last layer's (kept) and, at its
        # backward, the one fetched ahead. On the fast path each layer also keeps its LoRA
        # products H [tokens, r] per target for the rerun (kernels/lora.py), which then draws no
        # dropout mask again: on the GPU, offloaded or not.
        products = 2 * cfg.r * len(target_names(cfg.targets, arch)) if fast_path(cfg) else 0
        inputs_on_gpu = min(2, L) if offloaded else L
        # kept attention stays on the GPU under offload too (its own saved-tensor hooks)
        if kept_layers:
            notes.append(f"attention kept for backward in {kept_layers} of {L} "
                         f"layers: {gib(tokens * kept_layers * kept_each):.2f} GiB (keep_attention)")
        activations = tokens * (inputs_on_gpu * layer_input + L * products + kept_layers * kept_each
                                + final + rope)
        copies = per_layer_weights
    else:
        activations = tokens * (L * per_layer + final + rope)
        copies = L * per_layer_weights
        backward = tokens * max(working, attention_extra)
        # the last layer's backward comes after the final norm's and the loss's: theirs are gone
        backward_activations = tokens * (L * per_layer + rope)
    activations = int(activations)
    loss, loss_note = loss_peak_bytes(arch, cfg)
    notes.append(f"logits/loss: {loss_note}")
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

    # Workspace: the cuBLAS workspaces and the batch (ids, labels, positions) always; inside a
    # quantized matmul (forward and backward alike) the frozen weight dequantized, with double
    # quant first its fp32 absmax.
    largest = max(arch.linears(), key=lambda x: x[1] * x[2])
    n_largest = largest[1] * largest[2]
    experts = expert_run_elements(arch)
    dequant = 0
    if cfg.quant in FOUR_BIT_METHODS:
        dequant = 2 * n_largest + (4 * -(-n_largest // cfg.blocksize) if cfg.double_quant else 0)
        # the stack kernel reads the nested scales itself: no fp32 absmax beside the run
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
    if cfg.checkpointing:
        # The layer whose backward peaks, and at which of its two moments (the MLP's, with the
        # dense weights the rerun kept and one more being dequantized; attention's). With
        # attention kept in the last N < L layers, the last layer (every input alive, N kept) and
        # the last that reruns its attention (N inputs fewer, none kept, its q, k, v recomputed
        # and their dense weights kept) are both candidates.
        candidates = [(L - 1, kept_layers > 0)]
        if 0 < kept_layers < L:
            candidates.append((L - 1 - kept_layers, False))
        # a tile's backward dequantizes gate and up together (the fast path's group)
        dequant_now = max(dequant, tile_dequant_bytes(arch, cfg)) if tile else dequant
        best = None
        for layer, kept_here in candidates:
            alive = layer + 1  # layer inputs and products of this layer and the ones before it
            kept_alive = kept_layers - (L - 1 - layer) if kept_here else 0
            before = tokens * ((inputs_on_gpu if offloaded else alive) * layer_input
                               + alive * products + kept_alive * kept_each + rope)
            rerun = sum(rerun_terms(arch, cfg, terms, kept_here, bool(tile)).values())
            if tile:
                rerun -= split_mlp_terms(terms)[1]
            kept_dense, attention_dense = rerun_dense_weights(arch, cfg, kept_here, bool(tile))
            moments = [(tokens * (rerun + working), kept_dense + dequant_now),
                       (tokens * (rerun + attention_extra), attention_dense)]
            moment, dense = max(moments, key=sum)
            if best is None or before + moment + dense > sum(best):
                best = (before, moment, dense)
        backward_activations, backward, dequant = best
    workspace = CUBLAS_WORKSPACE_BYTES + 3 * 8 * tokens + dequant
    if cfg.method in PREFERENCE_METHODS:
        saved = ("the example's activations saved, its KL sequence's forward under no_grad"
                 if cfg.method == "kto" else "two sequences per example")
        notes.append(f"{cfg.method}: {saved} ({tokens} tokens with grad a micro-batch); "
                     "log-probs per token from the model's chunked loss")
    # The reference forward runs after the policy's loss and is gone before its backward: a
    # moment of its own (Breakdown.phases), not workspace alive in every phase. Beside it the
    # policy's fused loss keeps its gradient of the label rows' hidden states (bf16 [tokens, h]).
    reference = reference_forward_bytes(arch, cfg)
    if reference:
        if cfg.loss == "chunked-fused":
            reference += 2 * tokens * h
        notes.append(f"{cfg.method}: reference forward (adapters off, no grad) "
                     f"{gib(reference):.2f} GiB, an estimate, after the policy's loss and "
                     "before its backward")

    # Several GPUs: data parallel replicates everything and sums the flat gradient buffers in
    # place (no bucket copy: train/distributed.all_reduce_grads); FSDP shards the weights,
    # adapters, grads and optimizer, and gathers one layer at a time (twice: current +
    # prefetched).
    if cfg.gpus > 1:
        n = cfg.gpus
        if cfg.sharding == "ddp":
            notes.append(f"data parallel over {n} GPUs: each holds a full copy; micro-batch is "
                         "per GPU")
        else:
            layer_full = base_layer + sum(alloc(x * abytes, rnd) for x in numels[: len(numels) // L])
            base, embeddings, norms = -(-base // n), -(-embeddings // n), -(-norms // n)
            adapters, grads = -(-adapters // n), -(-grads // n)
            # sharded parameters are stepped by torch AdamW (train/distributed.sharded_optim)
            opt, opt_paged, opt_step = optimizer_state_bytes(numels, replace(cfg, optimizer="adamw_torch"))
            opt, opt_paged, opt_step = -(-opt // n), -(-opt_paged // n), -(-opt_step // n)
            gathered = 2 * layer_full + alloc(v * h * nbytes, rnd)  # + the gathered embedding/head
            workspace += gathered
            dequant += gathered
            notes.append(f"FSDP over {n} GPUs: weights, adapters, grads, optimizer (torch AdamW) "
                         "sharded; two gathered layers and the gathered embedding/head in workspace")
    if offloaded:
        notes.append(f"offload: the checkpointed layer inputs wait in pinned host memory "
                     f"({gib(host_offload_bytes(arch, cfg)):.2f} GiB of host RAM); two are on "
                     "the GPU at a time")
    elif cfg.offload_activations:
        notes.append("offload: only the inputs checkpointing keeps are offloaded; without "
                     "checkpointing it does nothing")
    if cfg.optimizer.startswith("paged_") and opt_paged:
        notes.append("paged optimizer states are in CUDA managed memory: counted in total, "
                     "not in torch.cuda.max_memory_allocated")

    return Breakdown(arch=arch, cfg=cfg, base=base, embeddings=embeddings, norms=norms, adapters=adapters,
                     optimizer=opt, optimizer_paged=opt_paged, activations=activations, adapter_copies=copies,
                     loss=loss, backward=int(backward), adapter_grads=grads, layer_grads=layer_grads,
                     optimizer_step=opt_step, workspace=workspace, dequant=dequant,
                     reference=reference, adapter_params=sum(numels), notes=notes,
                     backward_activations=int(backward_activations),
                     flat_grads=cfg.flat_grads and (cfg.gpus == 1 or cfg.sharding == "ddp"))
