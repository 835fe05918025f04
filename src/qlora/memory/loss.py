"""The loss: the logits and their gradient at the loss's peak, by how the loss is computed
(settings.LOSSES), in chunks of the decoder's own size."""

from __future__ import annotations

from qlora.memory.settings import PlanConfig, step_tokens
from qlora.models.families import FAMILIES
from qlora.models.spec import GEMMA_TYPES, ArchSpec


def loss_chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk of the decoder's chunked loss for this vocabulary: the decoder's own rule
    (qlora.models.decoder.loss_chunk_tokens: the power of two at or below 2**26 / vocab, clamped
    to [128, 4096]; Llama-3's 128256 -> 512, Qwen2.5's 151936 -> 256), imported rather than
    repeated so the planner and the model cannot drift apart. Imported here, not at the top: the
    decoder imports torch, which `qlora plan` otherwise does not need to load."""
    from qlora.models.decoder import loss_chunk_tokens as decoder_rule

    return decoder_rule(vocab_size)


def final_softcap(arch: ArchSpec) -> float | None:
    """Gemma's output logit soft-cap: the fused cross-entropy applies it inside its kernel
    (FastDecoderLM.final_softcap); the reference chunked loss keeps tanh's output too
    (loss_peak_bytes)."""
    if arch.model_type not in GEMMA_TYPES:
        return None
    return FAMILIES[arch.model_type].settings(arch.raw).final_softcap


def loss_peak_bytes(arch: ArchSpec, cfg: PlanConfig) -> tuple[int, str]:
    """The logits/loss transient at the loss's peak and how it is computed. The peak of the
    `chunked-fused` loss is in forward, that of the others in their backward; either way every saved
    activation is alive and no adapter gradient exists yet (Breakdown's first phase)."""
    tokens = step_tokens(cfg)
    v, h = arch.vocab_size, arch.hidden_size
    capped = isinstance(arch, ArchSpec) and final_softcap(arch) is not None
    if capped and cfg.loss == "chunked":
        # Gemma's soft-capped logits: the reference chunked loss (GemmaLM.chunk_loss, each chunk
        # checkpointed), as `chunked` below with tanh's bf16 output kept beside the fp32
        # log_softmax output and gradients: 14 B/entry in the recomputed chunk's backward
        # (chunked-fused: the fused cross-entropy caps inside its kernel, as below)
        chunk = min(tokens, cfg.loss_chunk_tokens or loss_chunk_tokens(v))
        return (14 * chunk * v + 4 * tokens * h,
                f"soft-capped logits, chunked and recomputed in backward: 14 B x {chunk}-token "
                f"chunk x {v} vocab (in backward)")
    if cfg.loss == "full":
        # transformers' ForCausalLMLoss: bf16 logits, .float() copy, log_softmax output (kept) =
        # 10 B/entry in forward; in backward the nll gradient, the kept log_softmax output and the
        # log_softmax input gradient are alive together = 12 B/entry (bf16 logits already freed).
        return 12 * tokens * v, f"full fp32 logits: 12 B x {tokens} tokens x {v} vocab"
    chunk = min(tokens, cfg.loss_chunk_tokens or loss_chunk_tokens(v))
    if cfg.loss == "chunked":
        # Each chunk is checkpointed: in backward it is recomputed (lm_head -> .float() ->
        # log_softmax, whose fp32 output is kept) and then log_softmax's backward holds its kept
        # output, the gradient coming from nll_loss and the gradient it makes: 3 fp32 [chunk, V] =
        # 12 B/entry. The gradient of the final hidden state for all tokens is accumulated over the
        # chunks: the running sum and one chunk's zero-padded slice gradient, 2 x bf16.
        return (12 * chunk * v + 4 * tokens * h,
                f"chunked, recomputed in backward: 12 B x {chunk}-token chunk x {v} vocab (in backward)")
    # kernels/cross_entropy.py (lm_head frozen): each chunk's gradient of the hidden states is made
    # in forward, so backward holds no logits, only grad_h and its scaled copy (2 x bf16 [tokens,
    # H]), and the peak is the forward's, while a chunk is computed: its bf16 logits (overwritten in
    # place by their gradient; the Triton kernel and the GEMMs need nothing but cuBLAS's workspace)
    # and one fp32 loss per row, beside the bf16 [tokens, H] tensors that outlive a chunk: grad_h
    # for every label token (kept for backward) and the final norm's output, alive in forward
    # only. The loss's input (the label rows gathered from that output) is the 2 B/token of
    # plan()'s `final`; the running sum is a scalar.
    return (2 * chunk * v + 4 * chunk + 2 * 2 * tokens * h,
            f"chunked, gradient made in forward: 2 B x {chunk}-token chunk x {v} vocab (in forward)")
