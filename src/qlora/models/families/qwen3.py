"""Qwen3: RMSNorm over head_dim on q and k before RoPE; biases as attention_bias says; the
sliding window read as Qwen2's is."""

from qlora.models.families import qwen2

MODEL_TYPE = "qwen3"
GGUF_ARCH = "QWEN3"
TINY_SIZES = {"head_dim": 16}  # Qwen3's head_dim is its own, not hidden / heads


def spec_fields(cfg: dict) -> dict:
    bias = bool(cfg.get("attention_bias", False))
    return dict(qkv_bias=bias, o_bias=bias, qk_norm=True, **qwen2.windows(cfg))
