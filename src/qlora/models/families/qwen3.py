"""Qwen3: RMSNorm over head_dim on q and k before RoPE; biases as attention_bias says; the
sliding window only where config.json turns it on."""

MODEL_TYPE = "qwen3"
GGUF_ARCH = "QWEN3"
TINY_SIZES = {"head_dim": 16}  # Qwen3's head_dim is its own, not hidden / heads


def spec_fields(cfg: dict) -> dict:
    bias = bool(cfg.get("attention_bias", False))
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", False) else None
    return dict(qkv_bias=bias, o_bias=bias, qk_norm=True, sliding_window=window)
