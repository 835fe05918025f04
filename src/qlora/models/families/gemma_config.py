"""What a Gemma 2 or Gemma 3 (text) config.json means beyond the fields every family shares.

Read here once, for gemma2.py and gemma3.py (their ArchSpec fields, and refusals named when the
config is read) and for gemma.py (the blocks, which read `settings(spec.raw)`). Plain Python: the
family modules are imported wherever a spec is read, below the torch blocks.

Missing keys take transformers' defaults for the family (Gemma2Config, Gemma3TextConfig), so a
config.json means here what it means there.
"""

from __future__ import annotations

from dataclasses import dataclass

from qlora.errors import QloraError

SLIDING, FULL = "sliding_attention", "full_attention"  # transformers' layer_types values
# the activation of Gemma's GeGLU MLP; transformers' gelu_pytorch_tanh is torch's tanh approximation
ACTIVATIONS = ("gelu_pytorch_tanh",)


@dataclass(frozen=True)
class GemmaSettings:
    layer_windows: tuple[int | None, ...]  # each layer's attention window; None: full attention
    query_scale: float  # query_pre_attn_scalar ** -0.5, in place of head_dim ** -0.5
    attn_softcap: float | None  # scores become cap · tanh(scores / cap) before the softmax
    final_softcap: float | None  # the same on the output logits, before any loss
    local_rope_theta: float | None  # RoPE base of the sliding layers (Gemma 3); None: the model's
    hidden_act: str


@dataclass(frozen=True)
class GemmaDefaults:
    """Where Gemma 2 and Gemma 3 read the same keys differently (transformers' config classes)."""
    sliding_pattern: int  # without layer_types: every N-th layer is full, the others slide
    attn_softcap: float | None
    final_softcap: float | None
    reads_attn_softcap: bool  # Gemma 3's attention never applies attn_logit_softcapping
    local_rope: bool  # the sliding layers rotate with a base of their own


def read_settings(cfg: dict, defaults: GemmaDefaults, source: str = "config.json") -> GemmaSettings:
    if cfg.get("use_bidirectional_attention"):
        raise QloraError(f"{source}: use_bidirectional_attention (an embedding model's encoder) is "
                         "not supported: qlora trains causal language models")
    act = cfg.get("hidden_activation") or "gelu_pytorch_tanh"
    if act not in ACTIVATIONS:
        raise QloraError(f"{source}: hidden_activation {act!r} is not supported; Gemma's MLP "
                         f"computes {', '.join(ACTIVATIONS)}")
    attn_softcap = cfg.get("attn_logit_softcapping", defaults.attn_softcap)
    return GemmaSettings(
        layer_windows=layer_windows(cfg, defaults.sliding_pattern, source),
        query_scale=float(cfg.get("query_pre_attn_scalar", 256)) ** -0.5,
        attn_softcap=attn_softcap if defaults.reads_attn_softcap else None,
        final_softcap=cfg.get("final_logit_softcapping", defaults.final_softcap),
        local_rope_theta=local_rope_theta(cfg, source) if defaults.local_rope else None,
        hidden_act=act,
    )


def layer_windows(cfg: dict, sliding_pattern: int, source: str = "config.json"
                  ) -> tuple[int | None, ...]:
    """Each layer's attention window, from layer_types as transformers reads it: a sliding layer
    attends to the last `sliding_window` tokens (itself included), a full one to all before it.
    Without layer_types (older config.json files), every `sliding_pattern`-th layer is full."""
    n = cfg["num_hidden_layers"]
    kinds = cfg.get("layer_types") or [SLIDING if (i + 1) % sliding_pattern else FULL
                                        for i in range(n)]
    if len(kinds) != n or not set(kinds) <= {SLIDING, FULL}:
        raise QloraError(f"{source}: layer_types must name {n} layers, each {SLIDING!r} or "
                         f"{FULL!r}; got {kinds!r}")
    window = cfg.get("sliding_window", 4096)
    if SLIDING in kinds and not window:
        raise QloraError(f"{source}: layer_types has sliding layers but sliding_window is "
                         f"{window!r}; give the window in tokens")
    return tuple(int(window) if kind == SLIDING else None for kind in kinds)


def local_rope_theta(cfg: dict, source: str = "config.json") -> float:
    """Gemma 3's sliding layers: transformers 5 writes rope_parameters per layer kind, older
    files rope_local_base_freq. Plain RoPE only (the full layers' scaling is read by spec._rope)."""
    params = (cfg.get("rope_parameters") or {}).get(SLIDING)
    if params is None:
        return float(cfg.get("rope_local_base_freq", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise QloraError(f"{source}: rope_parameters.{SLIDING}.rope_type {kind!r} is not "
                         "supported (the sliding layers' RoPE must be the default)")
    return float(params.get("rope_theta", 10000.0))


def spec_fields(cfg: dict, defaults: GemmaDefaults, qk_norm: bool) -> dict:
    """The ArchSpec fields of a Gemma family; reading the settings here refuses a bad config.json
    where it is read. sliding_window is the sliding layers' window (None when no layer slides):
    what the rest of qlora asks of a model's longest-reaching restriction (train/graphs.py)."""
    settings = read_settings(cfg, defaults)
    bias = bool(cfg.get("attention_bias", False))
    windows = [w for w in settings.layer_windows if w is not None]
    return dict(qkv_bias=bias, o_bias=bias, qk_norm=qk_norm,
                sliding_window=windows[0] if windows else None,
                # spec.layer_windows, the model's record, is built from these as for any family
                layer_types=[FULL if w is None else SLIDING for w in settings.layer_windows],
                hidden_act=settings.hidden_act,
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)))
