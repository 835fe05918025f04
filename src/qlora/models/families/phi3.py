"""Phi-3, Phi-3.5 and Phi-4 (model_type phi3): Llama's block with q, k, v as one fused linear
(`qkv_proj`) and gate, up as one (`gate_up_proj`), RoPE on the first `partial_rotary_factor` of
each head only, LongRoPE ("longrope"; older files say "su" or "yarn" for it) and the sliding
window in every layer where config.json sets one. Its blocks are in phi3_blocks.py (built through
models/load.py's OWN_DECODERS); this module reads what its config.json means, as transformers'
Phi3Config reads it."""

from __future__ import annotations

import math
from dataclasses import dataclass

from qlora.errors import QloraError

MODEL_TYPE = "phi3"
GGUF_ARCH = "PHI3"
TINY_SIZES: dict = {}  # the shared tiny sizes; tests/conftest.py's variants add RoPE and windows
# q, k, v and gate, up are one linear each: what checkpoints hold, PEFT wraps and llama.cpp reads
LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@dataclass(frozen=True)
class Phi3Rope:
    """RoPE as Phi3's config reads it. `short_factor` / `long_factor`: LongRoPE's divisors per
    frequency (None: plain RoPE); the long ones apply to a forward whose largest position + 1
    exceeds `original_max_positions`. `attention_factor` scales cos and sin in both cases."""

    theta: float
    rotary_dim: int
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    original_max_positions: int = 4096
    attention_factor: float = 1.0


def head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def rope_settings(cfg: dict, source: str = "config.json") -> Phi3Rope:
    # transformers: rope_scaling (older files) wins over rope_parameters; theta and the partial
    # factor come from them, else from the top-level keys
    params = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    partial = float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
    rotary_dim = int(head_dim(cfg) * partial)
    kind = params.get("rope_type", params.get("type", "default"))
    kind = "longrope" if kind in ("su", "yarn") else kind  # Phi3Config's reading of old names
    if kind == "default":
        return Phi3Rope(theta, rotary_dim)
    if kind != "longrope":
        raise QloraError(f"{source}: phi3 rope type {kind!r} is not supported; supported: "
                         "default, longrope (su, yarn)")
    # Phi3Config's own top-level key wins over the one inside the rope parameters
    original = int(cfg.get("original_max_position_embeddings", 4096))
    short, long = params.get("short_factor"), params.get("long_factor")
    for name, factors in (("short_factor", short), ("long_factor", long)):
        if not isinstance(factors, list) or len(factors) != rotary_dim // 2:
            raise QloraError(f"{source}: longrope {name} must list {rotary_dim // 2} numbers "
                             f"(one per rotated frequency), got {factors!r}")
    return Phi3Rope(theta, rotary_dim, tuple(map(float, short)), tuple(map(float, long)),
                    original, _attention_factor(params, cfg, original))


def _attention_factor(params: dict, cfg: dict, original: int) -> float:
    """LongRoPE's scale of cos/sin: given, else sqrt(1 + ln(factor) / ln(original)), the factor
    being the context's growth (max_position_embeddings / original) unless given."""
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])
    factor = params.get("factor")
    if factor is None:
        factor = cfg.get("max_position_embeddings", 4096) / original
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(original))


def linear_shapes(spec) -> dict[str, tuple[int, int]]:
    """(out, in) of each linear of a phi3 block, by its leaf name, in layer order."""
    h, hd, i = spec.hidden_size, spec.head_dim, spec.intermediate_size
    return {
        "qkv_proj": ((spec.num_heads + 2 * spec.num_kv_heads) * hd, h),
        "o_proj": (h, spec.num_heads * hd),
        "gate_up_proj": (2 * i, h),
        "down_proj": (h, i),
    }


def spec_fields(cfg: dict) -> dict:
    rope = rope_settings(cfg)
    scaling = None if rope.short_factor is None else {
        "rope_type": "longrope", "short_factor": list(rope.short_factor),
        "long_factor": list(rope.long_factor),
        "original_max_position_embeddings": rope.original_max_positions,
        "attention_factor": rope.attention_factor}
    # transformers' Phi3 has no biases, and its window (when set) in every layer
    return dict(qkv_bias=False, o_bias=False, qk_norm=False,
                sliding_window=cfg.get("sliding_window"), layer_types=None,
                rope_theta=rope.theta, rope_scaling=scaling)
