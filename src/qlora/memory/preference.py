"""Preference methods (DPO, ORPO, SimPO, KTO): two sequences per example (settings.step_tokens
counts those with grad: a pair's two, KTO's example), and for DPO and KTO the reference forward, a
moment of the step of its own (KTO's: each half's apart, its KL sequence's no-grad forward too)."""

from __future__ import annotations

from qlora.memory.activations import mlp_tile_tokens
from qlora.memory.loss import loss_chunk_tokens
from qlora.memory.settings import PlanConfig, step_tokens
from qlora.models.spec import ArchSpec

REFERENCE_METHODS = ("dpo", "kto")  # the base model with adapters off, under no_grad


def reference_forward_bytes(arch: ArchSpec, cfg: PlanConfig) -> int:
    """DPO / KTO: the reference forward (adapters off) runs under no_grad after the policy's loss,
    while all of the policy's activations are saved; it keeps nothing, so it holds one layer's
    working tensors at a time, at their largest in the MLP: the layer's input and attention's
    output (2·2h), the gate/up output and SwiGLU's output (fused kernels: 2·2I + 2I; eager: gate
    and up, silu(gate), the product: 4·2I), a tile's where the MLP runs in tiles; then the label
    rows' final hidden states (bf16) and one chunk of the per-token loss: the fused
    cross-entropy's bf16 logits and fp32 losses (2·chunk·V + 4·chunk), the reference chunked
    loss's bf16 logits, fp32 copy and log-softmax (10·chunk·V). The planner counted a layer's
    saved tensors before, and the old loss: at Qwen2.5-1.5B (8,192 tokens) 0.95 GiB, and in every
    phase, where the step measured no more at DPO than at ORPO (5.45 GiB both, H100)."""
    if cfg.method not in REFERENCE_METHODS or cfg.reference_precomputed:
        return 0
    tokens, h, v = step_tokens(cfg), arch.hidden_size, arch.vocab_size
    width = arch.intermediate_size
    if arch.moe is not None and arch.moe.num_sparse_layers:  # k rows of an expert's width
        width = max(arch.moe.top_k * arch.moe.expert_intermediate_size, width)
    mlp_tokens = min(tokens, mlp_tile_tokens(arch, cfg) or tokens)
    mlp = (6 if cfg.kernels == "fused" else 8) * width * mlp_tokens
    chunk = min(tokens, cfg.loss_chunk_tokens or loss_chunk_tokens(v))
    fused_loss = cfg.loss == "chunked-fused"  # Gemma's soft-cap too: inside the fused kernel
    loss = 2 * chunk * v + 4 * chunk if fused_loss else 10 * chunk * v
    return 2 * 2 * tokens * h + mlp + 2 * tokens * h + loss
