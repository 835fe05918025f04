"""Gemma 2: Gemma's own blocks (gemma.py: (1 + w) RMSNorm around attention and MLP, GeGLU, the
embedding scaled by sqrt(hidden_size)), attention scores and output logits soft-capped, sliding
and full attention layers alternating (layer_types), queries scaled by query_pre_attn_scalar."""

from qlora.models.families.gemma_config import GemmaDefaults, read_settings
from qlora.models.families.gemma_config import spec_fields as gemma_spec_fields

MODEL_TYPE = "gemma2"
GGUF_ARCH = "GEMMA2"
# head_dim and query_pre_attn_scalar unlike hidden / heads, a window shorter than the test
# sequences, and soft-caps that change the logits (weights drawn 4x wider than transformers' 0.02
# make the scores and logits large enough for the caps to act): each caught if left out
TINY_SIZES = dict(head_dim=32, query_pre_attn_scalar=24, sliding_window=8,
                  attn_logit_softcapping=5.0, final_logit_softcapping=5.0,
                  tie_word_embeddings=True, initializer_range=0.08)
DEFAULTS = GemmaDefaults(sliding_pattern=2, attn_softcap=50.0, final_softcap=30.0,
                         reads_attn_softcap=True, local_rope=False)


def spec_fields(cfg: dict) -> dict:
    return gemma_spec_fields(cfg, DEFAULTS, qk_norm=False)


def settings(cfg: dict):
    return read_settings(cfg, DEFAULTS)
