"""Mistral (7B, Nemo, Ministral): Llama's blocks with a sliding attention window in every layer
and an explicit head_dim where config.json gives one."""

MODEL_TYPE = "mistral"
GGUF_ARCH = "LLAMA"  # llama.cpp runs Mistral as llama
TINY_SIZES: dict = {}


def spec_fields(cfg: dict) -> dict:
    bias = bool(cfg.get("attention_bias", False))
    return dict(qkv_bias=bias, o_bias=bias, qk_norm=False, sliding_window=cfg.get("sliding_window"))
