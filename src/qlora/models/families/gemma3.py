"""Gemma 3, its text model (model_type gemma3_text, Gemma3ForCausalLM): Gemma 2's blocks with
(1 + w) RMSNorm on q and k per head, one full attention layer in six by default, and RoPE bases
per layer kind (rope_local_base_freq for the sliding layers, rope_theta and its scaling for the
full ones). Its attention is not soft-capped: transformers ignores attn_logit_softcapping for it,
and so does qlora; final_logit_softcapping applies where config.json sets it."""

from qlora.models.families.gemma_config import GemmaDefaults, read_settings
from qlora.models.families.gemma_config import spec_fields as gemma_spec_fields

MODEL_TYPE = "gemma3_text"
GGUF_ARCH = "GEMMA3"
# as gemma2's (weights drawn 4x wider, for the final soft-cap to act), and every other layer full
# (sliding_window_pattern), so that two layers hold both kinds
TINY_SIZES = dict(head_dim=32, query_pre_attn_scalar=24, sliding_window=8,
                  final_logit_softcapping=5.0, sliding_window_pattern=2,
                  tie_word_embeddings=True, initializer_range=0.08)


def defaults(cfg: dict) -> GemmaDefaults:
    # sliding_window_pattern: the key older config.json files give instead of layer_types
    return GemmaDefaults(sliding_pattern=int(cfg.get("sliding_window_pattern", 6)),
                         attn_softcap=None, final_softcap=None, reads_attn_softcap=False,
                         local_rope=True)


def spec_fields(cfg: dict) -> dict:
    return gemma_spec_fields(cfg, defaults(cfg), qk_norm=True)


def settings(cfg: dict):
    return read_settings(cfg, defaults(cfg))
