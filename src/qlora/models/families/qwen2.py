"""Qwen2 and Qwen2.5: biases on q, k and v (none on o); the sliding window only where
config.json turns it on (use_sliding_window), and then only in the layers `layer_types` names, or
when it is absent, in the layers from `max_window_layers` on (transformers' Qwen2Config)."""

MODEL_TYPE = "qwen2"
GGUF_ARCH = "QWEN2"
TINY_SIZES: dict = {}


def spec_fields(cfg: dict) -> dict:
    return dict(qkv_bias=True, o_bias=False, qk_norm=False, **windows(cfg))


def windows(cfg: dict) -> dict:
    """The window in effect and the layer types, read as transformers' Qwen2Config and
    Qwen3Config read them (same defaults: max_window_layers 28)."""
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", False) else None
    layer_types = cfg.get("layer_types") or [
        "sliding_attention" if window is not None and i >= cfg.get("max_window_layers", 28)
        else "full_attention"
        for i in range(cfg["num_hidden_layers"])]
    return dict(sliding_window=window, layer_types=layer_types)
