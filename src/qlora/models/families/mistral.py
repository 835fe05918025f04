"""Mistral (7B, Nemo, Ministral): Llama's blocks with a sliding attention window, an explicit
head_dim where config.json gives one."""

MODEL_TYPE = "mistral"
GGUF_ARCH = "LLAMA"  # llama.cpp runs Mistral as llama
TINY_SIZES: dict = {}


def spec_fields(cfg: dict) -> dict:
    bias = bool(cfg.get("attention_bias", False))
    # the window in every layer; but transformers reads a mistral config.json that has
    # layer_types as Ministral's, which windows only the layers layer_types calls sliding
    return dict(qkv_bias=bias, o_bias=bias, qk_norm=False,
                sliding_window=cfg.get("sliding_window"), layer_types=cfg.get("layer_types"))
