"""Llama 2 and 3.x: the reference decoder as it is (rope scaling "llama3" read by spec._rope)."""

MODEL_TYPE = "llama"
GGUF_ARCH = "LLAMA"  # llama.cpp's rope for it rotates interleaved pairs: q/k rows permuted on export
TINY_SIZES: dict = {}


def spec_fields(cfg: dict) -> dict:
    bias = bool(cfg.get("attention_bias", False))
    # transformers' Llama has no window, whatever sliding_window or layer_types config.json holds
    return dict(qkv_bias=bias, o_bias=bias, qk_norm=False, sliding_window=None, layer_types=None)
