"""Phi-3 (model_type phi3) against transformers, bitsandbytes and PEFT: its fused qkv_proj and
gate_up_proj, partial rotary, LongRoPE and sliding window; training, merge and GGUF export."""

from __future__ import annotations

import pytest
import torch

from qlora.models import load_model
from qlora.quant import QuantConfig

FP32 = torch.float32
HEAD_DIM = 16  # the tiny sizes' hidden 64 over 4 heads
ORIGINAL = 32  # LongRoPE's original context in the tests: rows of 24 use the short factors


def longrope(rotary_dim: int) -> dict:
    """LongRoPE parameters with factors unlike each other and unlike 1, so that a model that
    picks the wrong list, or ignores them, is caught."""
    pairs = rotary_dim // 2
    return {"rope_type": "longrope", "rope_theta": 10000.0,
            "short_factor": [1.0 + 0.25 * i for i in range(pairs)],
            "long_factor": [2.0 + 1.5 * i for i in range(pairs)]}


# name → config overrides of a tiny phi3
PHI3_VARIANTS = {
    "phi3": {},
    "phi3-partial": {"partial_rotary_factor": 0.5},
    # max_position_embeddings / original = 16: an attention factor of sqrt(1 + ln 16 / ln 32)
    "phi3-longrope": {"rope_parameters": {**longrope(HEAD_DIM // 2),
                                          "partial_rotary_factor": 0.5},
                      "original_max_position_embeddings": ORIGINAL},
    "phi3-su": {"rope_scaling": {**longrope(HEAD_DIM), "type": "su"},
                "original_max_position_embeddings": ORIGINAL},
    "phi3-window": {"sliding_window": 12},
}


@pytest.fixture(scope="module")
def phi3_models(tmp_path_factory) -> dict:
    from qlora.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("phi3")
    return {name: build_tiny_model(root / name, "phi3", seed=i, **overrides)
            for i, (name, overrides) in enumerate(PHI3_VARIANTS.items())}


def hf_model(path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=FP32, **kwargs).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def token_batch(seed: int = 0, batch: int = 2, length: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(6, 128, (batch, length), generator=g)


def fp32_model(path):
    return load_model(path, QuantConfig(method="none", compute_dtype=FP32))


# fp32 on both sides, the same weights and the same operations in the same order (fused
# projections split, RoPE tables computed in fp32 from the same frequencies): what differs is
# only the attention kernel's and matmuls' summation order, ~1e-7 relative; 1e-5 leaves room for
# that and catches any wrong split, factor or window (each moves the logits by 1e-2 or more)
@pytest.mark.parametrize("variant", list(PHI3_VARIANTS))
@pytest.mark.parametrize("length", [24, 40])  # shorter and longer than LongRoPE's ORIGINAL
def test_logits_match_transformers(phi3_models, variant, length):
    path = phi3_models[variant]
    ids = token_batch(length=length)
    with torch.no_grad():
        expected = hf_model(path)(ids).logits
        got = fp32_model(path)(ids)
    assert got.shape == expected.shape
    assert rel_err(expected, got) <= 1e-5
