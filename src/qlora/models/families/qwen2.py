"""Qwen2 and Qwen2.5: biases on q, k and v (none on o); the sliding window only where
config.json turns it on (use_sliding_window)."""

MODEL_TYPE = "qwen2"
GGUF_ARCH = "QWEN2"
TINY_SIZES: dict = {}


def spec_fields(cfg: dict) -> dict:
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", False) else None
    return dict(qkv_bias=True, o_bias=False, qk_norm=False, sliding_window=window)
