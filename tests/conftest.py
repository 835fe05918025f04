"""Shared fixtures: tiny random models of each family, built once per test session."""

from __future__ import annotations

import os
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*kernels.*")

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
               "rope_theta": 500000.0}

# Gemma 3's full layers with linear rope scaling (as Gemma 3 4B and larger), no final soft-cap
GEMMA3_SCALED_ROPE = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                      "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}

# name → (family, config overrides): every family, plus the variants that take other code paths
VARIANTS = {
    "llama": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama3-rope": ("llama", {"rope_parameters": LLAMA3_ROPE}),
    "mistral-window": ("mistral", {"sliding_window": 16}),
    "qwen2": ("qwen2", {}),
    # the window in the second layer only (layer_types from max_window_layers)
    "qwen2-window": ("qwen2", {"use_sliding_window": True, "sliding_window": 16,
                               "max_window_layers": 1}),
    "qwen3": ("qwen3", {}),
    "gemma2": ("gemma2", {}),
    "gemma3": ("gemma3_text", {}),
    "gemma3-scaled-rope": ("gemma3_text", {"rope_parameters": GEMMA3_SCALED_ROPE,
                                           "final_logit_softcapping": None}),
    # last: each variant's seed is its place (the ones before keep theirs)
    # Mistral Nemo / Ministral: head_dim given (32), not hidden 64 / 4 heads
    "mistral-nemo-head-dim": ("mistral", {"head_dim": 32, "sliding_window": None}),
}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    """name → directory of a saved tiny random model (fp32 weights, char tokenizer)."""
    from qlora.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    return {name: build_tiny_model(root / name, family, seed=i, **overrides)
            for i, (name, (family, overrides)) in enumerate(VARIANTS.items())}


@pytest.fixture(scope="session")
def llama_dir(tiny_models):
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def run_inputs(tmp_path_factory):
    """(model dir, data.jsonl): a tiny llama and 16 prompt/completion rows for training runs."""
    import json

    from qlora.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("train")
    model = build_tiny_model(root / "model", "llama")
    rows = [{"prompt": f"{w} = ", "completion": w.upper()}
            for w in ("cat", "dog", "sun", "moon", "tree", "fish", "bird", "rain", "snow", "wind",
                      "leaf", "rock", "sand", "star", "lake", "hill")]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model, data


def reference_attention(path) -> dict:
    """from_pretrained's keywords for the transformers model to compare with: transformers' sdpa
    attention (its default) leaves out Gemma 2's soft-capping of the scores; its eager attention,
    the one Gemma 2 was trained with, applies it."""
    import json
    from pathlib import Path

    model_type = json.loads((Path(path) / "config.json").read_text())["model_type"]
    return {"attn_implementation": "eager"} if model_type == "gemma2" else {}


def fp32_bnb_reference(model):
    """transformers' 4-bit model, computing in the fp32 it was asked for.

    On a CPU with AVX512-BF16, bitsandbytes repacks a Linear4bit on its first no-grad eval
    forward and computes it in bf16 from then on; qlora.quant turns that off for our layers, so
    the reference must not use it either.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model
