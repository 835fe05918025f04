"""Attention: what it keeps for backward (flash attention's tensors, or Gemma 2's capped scores
in torch), what keep_attention keeps from forward to backward and in how many layers, and what
attention's backward makes while it runs."""

from __future__ import annotations

from qlora.memory.settings import PlanConfig, key_tokens, step_tokens, whole_layers
from qlora.models.families import FAMILIES
from qlora.models.generic import GenericSpec
from qlora.models.spec import GEMMA_TYPES, ArchSpec, last_layers


def attention_softcap(arch: ArchSpec) -> float | None:
    """Gemma 2's score soft-cap: flash attention cannot apply it (capped_scores_in_torch)."""
    if arch.model_type not in GEMMA_TYPES:
        return None
    return FAMILIES[arch.model_type].settings(arch.raw).attn_softcap


def capped_scores_in_torch(arch: ArchSpec, cfg: PlanConfig) -> bool:
    """Whether Gemma 2's capped attention runs in torch over dense [heads, T, T] scores
    (models/families/gemma.capped_attention): eager kernels. With fused kernels it goes through
    flex_attention (kernels/capped_attention.py), which keeps what flash attention keeps."""
    return attention_softcap(arch) is not None and cfg.kernels == "eager"


def repeats_kv_heads(arch: ArchSpec) -> bool:
    """Whether attention saves k and v copied to every query head (grouped kv heads only): SDPA
    without enable_gqa (torch < 2.5). Packed rows' varlen attention hands grouped heads to the
    kernel (models/attention.varlen_attention), so it never does."""
    if arch.num_kv_heads == arch.num_heads:
        return False
    from qlora.models.decoder import sdpa_takes_gqa

    return not sdpa_takes_gqa()


def capped_attention_bytes_per_token(arch: ArchSpec, seq_len: int) -> int:
    """What Gemma 2's capped attention keeps per token of a row of `seq_len` tokens: q, and k
    and v repeated to every head (the matmuls keep their operands), each query's row of scores
    three times (tanh's bf16 output, the fp32 softmax, its bf16 probabilities that the second
    matmul keeps: 2 + 4 + 2 bytes a score) and masked_fill's bool mask (1 byte a score)."""
    q = arch.num_heads * arch.head_dim
    return 2 * 3 * q + (8 * arch.num_heads + 1) * seq_len


def kept_query_bytes_per_token(arch: ArchSpec) -> int:
    """What attention's backward reads, kept by keep_attention, of each query token and layer:
    RoPE'd q, the output (bf16) and the fp32 log-sum-exp of each head (flash's, and
    flex_attention's for Gemma 2's capped scores; dense capped scores are never kept:
    keeps_attention)."""
    return 2 * 2 * arch.num_heads * arch.head_dim + 4 * arch.num_heads


def kept_key_bytes_per_token(arch: ArchSpec, repeated_kv: bool) -> int:
    """The same of each key token: RoPE'd k and v (bf16; v a copy, not a view of the grouped
    projection output), copied to every query head first where `repeated_kv` (repeats_kv_heads)."""
    kv = arch.num_heads if repeated_kv else arch.num_kv_heads
    return 2 * 2 * kv * arch.head_dim


def gathered_key_bytes(arch: ArchSpec, cfg: PlanConfig) -> int:
    """What one layer's attention keeps over a micro-batch beyond its step tokens' k and v
    (layer_activation_terms' per-token term): where pairs pack their prompt once, the copy of
    each prompt's k and v gathered before its rejected completion's (key_tokens − step_tokens
    key tokens; models/attention)."""
    return ((key_tokens(cfg) - step_tokens(cfg))
            * kept_key_bytes_per_token(arch, repeats_kv_heads(arch)))


def kept_attention_layer_bytes(arch: ArchSpec, cfg: PlanConfig) -> int:
    """What one layer's kept attention holds over a micro-batch: q, the output and the
    log-sum-exp at its step_tokens, k and v at its key_tokens (more where pairs pack their
    prompt once: settings.key_tokens)."""
    return (step_tokens(cfg) * kept_query_bytes_per_token(arch)
            + key_tokens(cfg) * kept_key_bytes_per_token(arch, repeats_kv_heads(arch)))


def keeps_attention(arch: ArchSpec | GenericSpec, cfg: PlanConfig) -> bool:
    """Whether the speed layer can keep this model's attention for backward: not on the generic
    path (no speed layer), nor Gemma 2's capped scores where they run dense in torch (eager
    kernels: [heads, T, T] a layer, speed/fast_decoder.FastGemmaAttention keeps none of it)."""
    return not isinstance(arch, GenericSpec) and not capped_scores_in_torch(arch, cfg)


def kept_attention_layers(arch: ArchSpec | GenericSpec, cfg: PlanConfig) -> int:
    """Layers whose attention is kept for backward: keep_attention's count, with checkpointing
    (none where the model cannot keep it: keeps_attention), less the layers keep_activations
    leaves whole (the last ones: autograd keeps their attention anyway)."""
    if not keeps_attention(arch, cfg) or not cfg.checkpointing:
        return 0
    return max(0, last_layers(cfg.keep_attention, arch.num_layers) - whole_layers(arch, cfg))


def attention_backward_bytes_per_token(arch: ArchSpec, cfg: PlanConfig) -> int:
    """What attention's backward makes while it runs, per token (torch's flash attention, FA2's
    mha_bwd, which SDPA and varlen attention call): the bf16 gradients of q, k and v, an fp32
    accumulator for q's (dq_accum, [tokens, heads, head_dim]) and softmax_d (fp32 per head), and
    with grouped kv heads k's and v's gradients at every query head (dk_expanded, dv_expanded)
    before they are summed to the kv heads (plan() adds what is alive beside them: the gradients
    of attention's output, 2·q, and of the residual stream, 2h). Gemma 2's capped scores in
    torch: none here (their gradients are in backward_working_bytes_per_token)."""
    if capped_scores_in_torch(arch, cfg):
        return 0
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    expanded = 2 * 2 * q if arch.num_kv_heads != arch.num_heads else 0
    return 2 * (q + 2 * kv) + 4 * q + 4 * arch.num_heads + expanded
