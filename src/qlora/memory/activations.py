"""Activations, per token: what autograd keeps of one decoder layer in forward (a sparse layer's
routed terms in place of the dense MLP's; the MLP's inside one tile's where it runs in sequence
tiles), the gradients in flight while a layer runs backward, and what a checkpointed layer's
rerun makes new. tests/test_memory.py counts them against the tensors autograd saves."""

from __future__ import annotations

from qlora.memory.attention import (capped_attention_bytes_per_token, capped_scores_in_torch,
                                    repeats_kv_heads)
from qlora.memory.settings import (MLP_LINEARS, PlanConfig, expert_targets, fast_path, step_tokens,
                                   target_names, torch_activation, torch_norms)
from qlora.models.spec import GEMMA_TYPES, ArchSpec


def whole_layer_bytes_per_token(arch: ArchSpec, cfg: PlanConfig, terms: dict[str, float]) -> float:
    """What a layer left whole by keep_activations saves, per token: `terms` (what a layer saves
    without checkpointing), less the ones a whole layer remakes in backward instead of holding
    (remade_in_whole_layer)."""
    remade = remade_in_whole_layer(arch, cfg)
    return sum(v for k, v in terms.items() if k not in remade)


def remade_in_whole_layer(arch: ArchSpec, cfg: PlanConfig) -> tuple[str, ...]:
    """The layer terms speed/whole_layer.py remakes in backward in a layer left whole (a dense
    block's; a mixture of experts' and Gemma's keep theirs): the normed inputs of attention and
    of the MLP where the fused RMSNorm makes them, and down_proj's input where the packed SwiGLU
    kernel does on the fast path."""
    if arch.moe is not None or arch.model_type in GEMMA_TYPES:
        return ()
    remade = () if torch_norms(arch, cfg) else ("attention input (normed)", "MLP input (normed)")
    # as the runtime runs the packed SwiGLU: Phi-3's one gate_up_proj whenever the fused kernel
    # runs; Llama's gate and up only grouped (both LoRA targets, no DoRA, not sharded by FSDP)
    grouped = ({"gate_proj", "up_proj"} <= set(target_names(cfg.targets, arch)) and not cfg.dora
               and not (cfg.gpus > 1 and cfg.sharding == "fsdp"))
    if (fast_path(cfg) and not torch_activation(arch, cfg)
            and ("gate_up_proj" in arch.block_linears() or grouped)):
        remade += ("MLP: down_proj input",)
    return remade


def layer_activation_terms(arch: ArchSpec, cfg: PlanConfig, dropout_mask_bytes: int = 1) -> dict[str, float]:
    """Bytes per token that autograd keeps for one decoder layer, term by term (bf16 = 2 bytes).

    A LLaMA block as qlora.models.decoder computes it: x -> RMSNorm -> q,k,v -> RoPE -> SDPA -> o
    -> +x -> RMSNorm -> gate,up -> silu(gate)*up -> down -> +. The frozen 4-bit matmul keeps no
    input (bitsandbytes' MatMul4Bit saves only the packed weight; the input gradient needs the
    weight alone, dequantized again in backward) and the dequantized weight is never saved; an
    input is kept only because the LoRA A of the projections that read it needs it for its weight
    gradient. With LoRA dropout that is the dropped copy, so the normed input itself is kept by
    no one. tests/test_memory.py checks this sum against the tensors autograd saves on the CPU.

    dropout_mask_bytes: 1 on CUDA (native_dropout keeps a bool mask); the CPU's dropout keeps a
    noise tensor in the input dtype (2).
    """
    h, i = arch.hidden_size, arch.intermediate_size
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    eager_norms = torch_norms(arch, cfg)
    targets = target_names(cfg.targets, arch)
    inputs = {name: n_in for name, n_in, _ in arch.linears()}
    outputs = {name: n_out for name, _, n_out in arch.linears()}
    # dropout's copies are what LoRA A reads, and kept for its gradient -- except on the fast path,
    # which draws the masks inside the products and keeps the undropped input, as without dropout
    dropout = cfg.lora_dropout > 0 and not fast_path(cfg)
    t: dict[str, float] = {}
    # RMSNorm, twice (Gemma: four, before and after attention and MLP). Eager (x.float(); x *
    # rsqrt(mean(x^2) + eps); w * x.to(bf16)) keeps the fp32 copy of its input and the fp32 rstd
    # per token; a fused kernel keeps the bf16 input + rstd.
    norms = 4 if arch.model_type in GEMMA_TYPES else 2
    t[f"norm inputs ({norms} norms)"] = norms * ((4 if eager_norms else 2) * h + 4)
    # The normed hidden state read by q,k,v and, in the MLP, by gate,up: one tensor each, shared,
    # kept for LoRA A's weight gradient -- unless every reader targets dropout's copy instead.
    attn_readers = [n for n in ("q_proj", "k_proj", "v_proj", "qkv_proj") if n in targets]
    mlp_readers = [n for n in ("gate_proj", "up_proj", "gate_up_proj") if n in targets]
    if attn_readers and not dropout:
        t["attention input (normed)"] = 2 * h
    # ... and an MLP in tiles keeps it whatever reads it: its tiles' rerun starts from it
    # (models/tiling.py)
    if (mlp_readers and not dropout) or mlp_tile_tokens(arch, cfg) is not None:
        t["MLP input (normed)"] = 2 * h
    if arch.qk_norm:  # qwen3, gemma3: per-head RMSNorm of q and k, same rule as above
        t["q/k norm inputs"] = (4 if eager_norms else 2) * (q + kv) + 4 * (arch.num_heads + arch.num_kv_heads)
    # SDPA (flash/efficient) keeps q and k after RoPE, v, its output and a fp32 logsumexp per
    # head. Where the attention takes no grouped kv heads, the decoder repeats k and v to all
    # heads (repeat_interleave) before it, so the kept k and v have nh heads (repeats_kv_heads).
    # RoPE is a linear map: its backward needs cos/sin only.
    capped = capped_scores_in_torch(arch, cfg)
    if capped:
        # Gemma 2: no SDPA; capped_attention keeps what capped_attention_bytes_per_token says
        # (fused kernels: flex_attention, which keeps what SDPA keeps, below)
        t["q, k/v repeated, scores (capped, in torch)"] = capped_attention_bytes_per_token(
            arch, cfg.seq_len)
    elif arch.model_type == "phi3" and cfg.kernels == "eager":
        # Phi-3: q and k rotated into new tensors, v a view of the fused qkv_proj output, whose
        # whole storage SDPA's saved v then keeps (Phi3Attention; its fork copies v out)
        t["q, k (after RoPE)"] = 2 * (q + kv)
        t["qkv_proj output (kept whole by v's view)"] = 2 * (q + 2 * kv)
    elif not repeats_kv_heads(arch):  # SDPA (varlen) shares the kv heads: k and v stay small
        t["q, k, v (after RoPE)"] = 2 * (q + 2 * kv)
    else:
        t["q, k, v (after RoPE, k/v repeated to all heads)"] = 2 * 3 * q
    # The output, [B, T, H, D] in memory, is also o_proj's input (transpose + reshape is a view):
    # kept by SDPA; the capped attention's last matmul keeps its operands, not its output, which
    # o_proj's LoRA A keeps then (unless it reads dropout's copy).
    if not capped:
        t["attention output (= o_proj input)"] = 2 * q
        t["attention logsumexp (fp32)"] = 4 * arch.num_heads
    elif "o_proj" in targets and not dropout:
        t["o_proj input"] = 2 * q
    # MLP: gate and up outputs (silu's input, the product's other factor; Phi-3's one gate_up
    # output); silu(gate) (Gemma: gelu(gate)) kept by torch's autograd for the product's backward
    # (a fused SwiGLU recomputes it); the product is down_proj's input, kept for its LoRA A unless
    # dropout's copy is kept instead. (Terms named "MLP: ..." are kept inside the MLP: sequence
    # tiles, mlp_tile_tokens, bound them.)
    t["MLP: gate, up outputs"] = 2 * 2 * i
    if torch_activation(arch, cfg):
        t["MLP: activation(gate)"] = 2 * i
    if "down_proj" in targets and not dropout:
        t["MLP: down_proj input"] = 2 * i
    # LoRA: lora_B's weight gradient needs lora_A's output [tokens, r] per target.
    attn = [name for name in targets if name not in MLP_LINEARS]
    mlp = [name for name in targets if name in MLP_LINEARS]
    for prefix, names in (("", attn), ("MLP: ", mlp)):
        if not names:
            continue
        t[prefix + "LoRA A outputs"] = sum(2 * cfg.r for _ in names)
        if dropout:
            # Dropout per target: the dropped bf16 copy of the input (kept by lora_A) and the
            # mask (kept by dropout's backward).
            mask = 0 if cfg.seeded_dropout else dropout_mask_bytes
            t[prefix + "LoRA dropout copies + masks"] = sum((2 + mask) * inputs[n] for n in names)
        if cfg.dora:
            # DoRA (qlora.adapters): (scale - 1) * base and scale * lora keep the base output and
            # the LoRA output for the magnitude's gradient: 2 x out per target.
            t[prefix + "DoRA base + LoRA outputs"] = sum(2 * 2 * outputs[n] for n in names)
    if arch.moe is not None and arch.moe.num_sparse_layers:
        # a sparse layer's (every layer counted as one: an overestimate for dense layers of a
        # mixture of experts, which Mixtral and Qwen3-30B-A3B do not have): the routed terms
        # replace the dense MLP's, its adapters' included
        for name in [n for n in t if n.startswith("MLP")]:
            t.pop(name)
        t.update(routed_activation_terms(arch, cfg))
    return t


def routed_activation_terms(arch: ArchSpec, cfg: PlanConfig) -> dict[str, float]:
    """Bytes per token a sparse layer keeps for backward in the grouped computation
    (speed/moe.py), in place of the dense MLP's terms. Each token is k rows whatever the routing:
    all tokens to the same experts (the worst case of an unbalanced router) keeps exactly what a
    balanced one keeps, since the grouped GEMMs take rows sorted by expert, not padded per
    expert (tests/test_moe.py counts both)."""
    moe, h = arch.moe, arch.hidden_size
    k, i, e = moe.top_k, moe.expert_intermediate_size, moe.num_experts
    targets = expert_targets(cfg.targets, arch)
    t: dict[str, float] = {}
    # the router: softmax keeps its fp32 output, top_k its indices, renormalising its values
    # and their sum (the logits' linear keeps nothing: the router is frozen)
    t["router softmax, top-k"] = 4 * e + 8 * k + (4 * k + 4 if moe.renormalize else 0)
    # the sort's inverse (read by the row sums in backward) and, where the sums run in torch,
    # its order (read by the router weights' gather): kernels/routing.py
    t["sort indices (int64)"] = (2 if cfg.kernels == "eager" else 1) * 8 * k
    if "gate_up_proj" in targets:  # the sorted rows, read by gate_up's LoRA A
        t["routed rows (k per token)"] = 2 * k * h
    t["experts' gate, up outputs"] = 2 * k * 2 * i
    if torch_activation(arch, cfg):  # the fused SwiGLU reads the packed gate, up output alone
        t["silu(gate)"] = 2 * k * i
    if "down_proj" in targets:
        t["experts' down_proj input"] = 2 * k * i
    t["experts' LoRA A outputs"] = sum(2 * k * cfg.r for _ in targets)
    # each row's output, kept to multiply by its router weight (which depends on the hidden
    # state), and that weight (fp32 in Mixtral, the hidden dtype in Qwen3-MoE)
    t["expert outputs, router weights"] = 2 * k * h + (2 if moe.weights_in_hidden_dtype else 4) * k
    return t


def mlp_tile_tokens(arch: ArchSpec, cfg: PlanConfig) -> int | None:
    """Tokens per MLP tile (models/tiling.py), or None: whole (off, no more tokens than a tile,
    where the tiled MLP runs whole, or a mixture of experts: speed.apply_speed leaves its sparse
    blocks whole, their router logits kept for the aux loss, and the plan counts every layer as
    sparse)."""
    if not cfg.tile_mlp or (arch.moe is not None and arch.moe.num_sparse_layers):
        return None
    from qlora.models.tiling import default_tile_tokens

    tile = default_tile_tokens(arch.intermediate_size) if cfg.tile_mlp is True else cfg.tile_mlp
    return tile if step_tokens(cfg) > tile else None


def split_mlp_terms(terms: dict[str, float]) -> tuple[float, float]:
    """(per-token bytes outside the MLP's inside, per-token bytes inside it) of
    layer_activation_terms."""
    inside = sum(n for name, n in terms.items() if name.startswith("MLP: "))
    return sum(terms.values()) - inside, inside


def mlp_width(arch: ArchSpec) -> int:
    """The MLP's width a token at its widest: the dense MLP's, or a sparse layer's k rows of an
    expert's width where that is more (max(k·I_e, I))."""
    if arch.moe is None or not arch.moe.num_sparse_layers:
        return arch.intermediate_size
    return max(arch.moe.top_k * arch.moe.expert_intermediate_size, arch.intermediate_size)


def backward_working_bytes_per_token(arch: ArchSpec, cfg: PlanConfig) -> float:
    """Gradients alive while one layer runs backward (estimate, an upper bound).

    The gradient of the residual stream coming in and going out (2 x bf16 h) and, at the MLP's
    peak, the gradients of silu(gate), of up and of gate (3 x bf16 I) while the layer's saved
    tensors are still counted in full. Gemma 2's capped attention adds, at its backward, the
    gradients of a row of scores in flight (estimate: the probabilities' bf16 gradient, softmax's
    fp32 gradient and the capped scores' bf16 gradient, 2 + 4 + 4 bytes a score with the fp32
    copy).
    """
    working = 2 * 2 * arch.hidden_size + 3 * 2 * mlp_width(arch)
    if capped_scores_in_torch(arch, cfg):
        working += 10 * arch.num_heads * cfg.seq_len
    return working


def mlp_side_bytes_per_token(arch: ArchSpec, cfg: PlanConfig, terms: dict[str, float],
                             tiled: bool) -> float:
    """Of a layer's saved terms, those its MLP half keeps (the post-attention half of the norms,
    the MLP's normed input, untiled the MLP's inside, and a sparse layer's routed terms, which
    tiles leave whole): freed by the time attention runs backward."""
    norms = sum(n for name, n in terms.items() if name.startswith("norm inputs"))
    inside = 0 if tiled else split_mlp_terms(terms)[1]
    routed = (sum(routed_activation_terms(arch, cfg).values())
              if arch.moe is not None and arch.moe.num_sparse_layers else 0)
    return norms / 2 + terms.get("MLP input (normed)", 0) + inside + routed


def rerun_terms(arch: ArchSpec, cfg: PlanConfig, terms: dict[str, float],
                attention_kept: bool, tiled: bool) -> dict[str, float]:
    """A checkpointed layer's saved terms as its rerun makes them new, without what is alive
    already: with a norm kernel that saves its bf16 input (fused), the first norm's input is the
    checkpoint's saved layer input; on the fast path the LoRA products are the first run's H
    (kept for the rerun, counted with the layer inputs; a tiled MLP's tiles make their own); with
    its attention kept, the rerun makes no q, k, v, output or log-sum-exp (the kept ones are
    keep_attention's term)."""
    t = dict(terms)
    if not torch_norms(arch, cfg):
        name = next(n for n in t if n.startswith("norm inputs"))
        t[name] -= 2 * arch.hidden_size
    if fast_path(cfg):
        for name in ("LoRA A outputs",) + (() if tiled else ("MLP: LoRA A outputs",)):
            t.pop(name, None)
    if attention_kept:
        for name in ("q, k, v (after RoPE)", "q, k, v (after RoPE, k/v repeated to all heads)",
                     "attention output (= o_proj input)", "attention logsumexp (fp32)"):
            t.pop(name, None)
    return t
