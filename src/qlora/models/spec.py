"""config.json → ArchSpec: everything the decoder needs to know about an architecture.

One decoder class serves every supported family; the differences between families are the few
fields below (biases, q/k norms, rope scaling, tied head, each layer's attention window), which
each family's module (models/families/) sets from its config.json. Gemma 2 and 3 differ beyond them:
their blocks are their own (models/families/gemma.py), built from the rest of their config.json.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from qlora.errors import QloraError

from qlora.models.families import FAMILIES
from qlora.models.families.moe_config import MoeSpec, expert_shapes

if TYPE_CHECKING:  # torch is imported where tensors are made: reading a config needs none
    import torch

SUPPORTED_FAMILIES = tuple(FAMILIES)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "dynamic", "yarn")
# The seven linear layers of the reference decoder's block, by their HF leaf names, in layer
# order; a family whose block has other linears (phi3's fused ones) gives its own linear_shapes
# the families with Gemma's blocks (models/families/gemma.py): four norms a block, GeGLU
GEMMA_TYPES = ("gemma2", "gemma3_text")
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# every block linear name of any family: what a target name may be before a model is known
KNOWN_BLOCK_LINEARS = tuple(dict.fromkeys(
    BLOCK_LINEARS + tuple(name for family in FAMILIES.values()
                          for name in getattr(family, "LINEARS", ()))))


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # {"rope_type": "llama3", "factor": ..., ...} or None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # qwen2: bias on q, k, v
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool  # qwen3: RMSNorm over head_dim on q and k before rope
    # each layer's attention window (a token attends to the last `window` tokens, itself
    # included), None where the layer attends to every earlier token: the one home of this fact
    layer_windows: tuple[int | None, ...]
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    moe: MoeSpec | None = None  # a mixture-of-experts family's routing and experts (Mixtral, Qwen3-MoE)
    raw: dict = field(default_factory=dict, compare=False, repr=False)
    name: str = field(default="model", compare=False)  # what the memory planner calls it

    def narrowest_window(self) -> int | None:
        """The smallest window of any layer; None when every layer attends to all earlier tokens."""
        return min((w for w in self.layer_windows if w is not None), default=None)

    def block_linears(self) -> tuple[str, ...]:
        """The leaf names of a block's linears, in layer order (BLOCK_LINEARS, or the family's)."""
        return tuple(self.linear_shapes())

    def linears(self) -> list[tuple[str, int, int]]:
        """(name, in_features, out_features) of the linears of a block, in layer order."""
        return [(name, n_in, n_out) for name, (n_out, n_in) in self.linear_shapes().items()]

    def expert_shapes(self) -> dict[str, tuple[int, int, int]]:
        """(experts, out, in) of each expert projection of a sparse layer; empty without experts."""
        return {} if self.moe is None else expert_shapes(self.moe, self.hidden_size)

    def dense_mlp_layers(self) -> int:
        """Layers whose MLP is dense (all of them, but for a mixture-of-experts family's sparse ones)."""
        return self.num_layers - (self.moe.num_sparse_layers if self.moe else 0)

    def num_params(self) -> int:
        """Parameters of the model: linears and their biases, norms, embedding (and untied head),
        experts and routers."""
        shapes = self.linear_shapes()
        mlp = ("gate_proj", "up_proj", "down_proj")
        dense = sum(shapes[n][0] * shapes[n][1] for n in mlp if n in shapes)
        per_layer = sum(n_in * n_out for n_out, n_in in shapes.values()) - dense
        biased = ((("q_proj", "k_proj", "v_proj") if self.qkv_bias else ()) + (("o_proj",) if self.o_bias else ())
                  + (("gate_proj", "up_proj", "down_proj") if self.mlp_bias else ()))
        per_layer += sum(shapes[name][0] for name in biased if name in shapes)
        embed = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        experts = (self.moe.num_sparse_layers * (
            sum(e * o * i for e, o, i in self.expert_shapes().values())
            + self.moe.num_experts * self.hidden_size) if self.moe else 0)
        return (self.num_layers * per_layer + self.dense_mlp_layers() * dense + experts
                + sum(self.norm_sizes()) + embed)

    def norm_sizes(self) -> list[int]:
        """The length of every norm weight of the model: each block's (two; Gemma's four, around
        attention and MLP), q/k norms per head (qwen3, gemma3), and the final norm."""
        per_block = 4 if self.model_type in GEMMA_TYPES else 2
        block = [self.hidden_size] * per_block + ([self.head_dim] * 2 if self.qk_norm else [])
        return block * self.num_layers + [self.hidden_size]

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each linear layer of a decoder block, by its HF leaf name."""
        family = FAMILIES[self.model_type]
        if hasattr(family, "linear_shapes"):  # a block with linears of its own (phi3's fused)
            return family.linear_shapes(self)
        h, hd = self.hidden_size, self.head_dim
        shapes = {
            "q_proj": (self.num_heads * hd, h),
            "k_proj": (self.num_kv_heads * hd, h),
            "v_proj": (self.num_kv_heads * hd, h),
            "o_proj": (h, self.num_heads * hd),
        }
        if self.dense_mlp_layers():  # a mixture of experts' sparse layers have none
            shapes.update({
                "gate_proj": (self.intermediate_size, h),
                "up_proj": (self.intermediate_size, h),
                "down_proj": (h, self.intermediate_size),
            })
        return shapes


# Real sizes of the shapes the seeds, benchmarks and `qlora plan --shape` name (from each model's
# config.json): an ArchSpec without the model's files (spec_from_shape).
NAMED_SHAPES: dict[str, dict] = {
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                         tie_word_embeddings=True),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       tie_word_embeddings=False),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       tie_word_embeddings=False),
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                       tie_word_embeddings=False),
    "llama-2-13b": dict(model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
                        tie_word_embeddings=False),
    "llama-2-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, vocab_size=32000,
                        tie_word_embeddings=False),
    # Mistral-7B-v0.1 (v0.3 has a 32768 vocabulary; the difference is 6 MiB of embeddings)
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                       tie_word_embeddings=False),
    # Mistral-Nemo-Base-2407: head_dim 128, not hidden / heads (160)
    "mistral-nemo-12b": dict(model_type="mistral", hidden_size=5120, intermediate_size=14336,
                             num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8,
                             head_dim=128, vocab_size=131072, rope_theta=1000000.0, rms_norm_eps=1e-5,
                             max_position_embeddings=1024000, sliding_window=None,
                             tie_word_embeddings=False),
    # Gemma 2: sliding (4096) and full layers alternating, scores capped at 50, logits at 30, a
    # head_dim unlike hidden / heads; the embedding tied (Gemma2Config's default, which
    # config.json leaves out)
    "gemma-2-2b": dict(model_type="gemma2", hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                       query_pre_attn_scalar=256, vocab_size=256000, sliding_window=4096,
                       attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                       hidden_activation="gelu_pytorch_tanh", rope_theta=10000.0, rms_norm_eps=1e-6,
                       max_position_embeddings=8192, tie_word_embeddings=True),
    "gemma-2-9b": dict(model_type="gemma2", hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                       query_pre_attn_scalar=256, vocab_size=256000, sliding_window=4096,
                       attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                       hidden_activation="gelu_pytorch_tanh", rope_theta=10000.0, rms_norm_eps=1e-6,
                       max_position_embeddings=8192, tie_word_embeddings=True),
    # Gemma 3 1B (text only): five sliding layers (512) in six, local RoPE base 10000, no caps
    "gemma-3-1b": dict(model_type="gemma3_text", hidden_size=1152, intermediate_size=6912,
                       num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                       query_pre_attn_scalar=256, vocab_size=262144, sliding_window=512,
                       sliding_window_pattern=6, rope_theta=1000000.0, rope_local_base_freq=10000.0,
                       hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
                       max_position_embeddings=32768, final_logit_softcapping=None,
                       attn_logit_softcapping=None, tie_word_embeddings=True),
    # Phi-3-mini-4k-instruct (phi3: fused qkv_proj and gate_up_proj) and Phi-4 (14B, the same
    # family: model_type phi3, no sliding window, no LongRoPE)
    "phi-3-mini-4k": dict(model_type="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                          rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=4096,
                          original_max_position_embeddings=4096, sliding_window=2047,
                          tie_word_embeddings=False),
    "phi-4": dict(model_type="phi3", hidden_size=5120, intermediate_size=17920, num_hidden_layers=40,
                  num_attention_heads=40, num_key_value_heads=10, vocab_size=100352, rope_theta=250000.0,
                  rms_norm_eps=1e-5, max_position_embeddings=16384, original_max_position_embeddings=16384,
                  sliding_window=None, tie_word_embeddings=False),
    # StableLM 2 1.6B: a family with no native module (LayerNorm with biases, q/k/v biases, RoPE
    # on a quarter of each head): the generic path's shape (models/generic.py; `qlora plan`
    # reads it through transformers' empty model)
    "stablelm-2-1.6b": dict(model_type="stablelm", hidden_size=2048, intermediate_size=5632,
                            num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32,
                            vocab_size=100352, partial_rotary_factor=0.25, rope_theta=10000.0,
                            layer_norm_eps=1e-5, use_qkv_bias=True, use_parallel_residual=False,
                            qk_layernorm=False, hidden_act="silu", max_position_embeddings=4096,
                            tie_word_embeddings=False),
    # Mixtral-8x7B-v0.1: 8 experts of 14336, 2 per token, in every layer
    "mixtral-8x7b": dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         vocab_size=32000, num_local_experts=8, num_experts_per_tok=2,
                         rope_theta=1e6, max_position_embeddings=32768, rms_norm_eps=1e-5,
                         router_aux_loss_coef=0.02, tie_word_embeddings=False),
    # Qwen3-30B-A3B: 128 experts of 768, 8 per token (renormalised), in every layer; head_dim 128
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144,
                          moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, vocab_size=151936, num_experts=128,
                          num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
                          mlp_only_layers=[], rope_theta=1e6, max_position_embeddings=40960,
                          rms_norm_eps=1e-6, router_aux_loss_coef=0.001,
                          tie_word_embeddings=False),
}


def spec_from_shape(shape: str) -> ArchSpec:
    """The ArchSpec of a named shape (NAMED_SHAPES), e.g. "llama-3-8b"; the name is kept."""
    key = shape.lower()
    if key not in NAMED_SHAPES:
        raise QloraError(f"shape {shape!r} is not known; known shapes: {', '.join(NAMED_SHAPES)}")
    return spec_from_config(NAMED_SHAPES[key], source=f"shape {key}", name=key)


def read_config(model_dir: str | Path) -> tuple[dict, str]:
    """`model_dir/config.json` (or a config.json path) as a dict, and where it was read."""
    path = Path(model_dir)
    config_path = path if path.is_file() else path / "config.json"
    if not path.exists():
        raise QloraError(f"model directory {path} does not exist: pass --model an existing "
                         "directory in Hugging Face layout (config.json, *.safetensors, "
                         "tokenizer.json)")
    if not config_path.exists():
        raise QloraError(
            f"{config_path} not found: a model directory in Hugging Face layout needs config.json "
            "(pass --model the directory that holds config.json and *.safetensors)"
        )
    try:
        cfg = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise QloraError(f"{config_path} is not valid JSON ({err}); re-download or fix the file") from err
    if not isinstance(cfg, dict):
        raise QloraError(f"{config_path} is not a JSON object; re-download or fix the file")
    return cfg, str(config_path)


def is_native(cfg: dict) -> bool:
    """Whether config.json names a family the reference decoder implements (families/); any other
    causal LM that transformers builds runs on the generic path (models/generic.py)."""
    return cfg.get("model_type") in SUPPORTED_FAMILIES


def read_spec(model_dir: str | Path) -> ArchSpec:
    """Read `model_dir/config.json` (or a config.json path) into an ArchSpec."""
    cfg, source = read_config(model_dir)
    return spec_from_config(cfg, source=source)


def spec_from_config(cfg: dict, source: str = "config.json", name: str = "model") -> ArchSpec:
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_FAMILIES:
        raise QloraError(
            f"{source}: model_type {model_type!r} is not one of the reference decoder's families "
            f"({', '.join(SUPPORTED_FAMILIES)}); other causal LMs run on the generic path "
            "(models/generic.py), which has no ArchSpec"
        )
    family = FAMILIES[model_type].spec_fields(cfg)  # biases, q/k norms, sliding window
    # a family with an MLP of its own (Gemma's GeGLU) names its activation; the others are SwiGLU
    hidden_act = family.get("hidden_act", cfg.get("hidden_act", "silu"))
    if hidden_act != "silu" and "hidden_act" not in family:
        raise QloraError(f"{source}: hidden_act {cfg['hidden_act']!r} is not supported (only silu)")
    num_heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
    # a family with RoPE of its own (phi3's LongRoPE) reads it itself
    rope_theta, rope_scaling = ((family["rope_theta"], family["rope_scaling"])
                                if "rope_theta" in family else _rope(cfg, source))
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    return ArchSpec(
        model_type=model_type,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        # a family whose transformers config ties by default (Gemma) says so when the key is absent
        tie_word_embeddings=bool(family.get("tie_word_embeddings",
                                            cfg.get("tie_word_embeddings", False))),
        qkv_bias=family["qkv_bias"],
        o_bias=family["o_bias"],
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        qk_norm=family["qk_norm"],
        layer_windows=layer_windows(family["sliding_window"], family["layer_types"],
                                    cfg["num_hidden_layers"], source),
        hidden_act=hidden_act,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids,
        pad_token_id=cfg.get("pad_token_id"),
        moe=family.get("moe"),
        raw=cfg,
        name=name,
    )


LAYER_TYPES = ("full_attention", "sliding_attention")


def layer_windows(window: int | None, layer_types: list[str] | None, num_layers: int,
                  source: str) -> tuple[int | None, ...]:
    """Each layer's attention window, as transformers applies it: a "sliding_attention" layer sees
    the last `window` tokens, a "full_attention" layer all of them; `layer_types` None gives every
    layer `window` (Llama's None, Mistral's without layer_types). `window`: the family's window
    in effect (None where config.json turns it off)."""
    if layer_types is None:
        return (window,) * num_layers
    if len(layer_types) != num_layers:
        raise QloraError(f"{source}: layer_types lists {len(layer_types)} layers, but "
                         f"num_hidden_layers is {num_layers}; give one entry per layer")
    unknown = sorted(set(layer_types) - set(LAYER_TYPES))
    if unknown:
        raise QloraError(f"{source}: layer_types {', '.join(map(repr, unknown))} not supported; "
                         f"supported: {', '.join(LAYER_TYPES)}")
    if window is None and "sliding_attention" in layer_types:
        # transformers refuses this too, when it builds the sliding layers' mask
        raise QloraError(f"{source}: layer_types names sliding_attention layers, but no sliding "
                         "window is in effect (sliding_window null, or use_sliding_window false)")
    return tuple(window if kind == "sliding_attention" else None for kind in layer_types)


def _rope(cfg: dict, source: str) -> tuple[float, dict | None]:
    """transformers 5 writes `rope_parameters`; older checkpoints `rope_theta` + `rope_scaling`."""
    params = dict(cfg.get("rope_parameters") or {})
    if "full_attention" in params:  # one set per layer kind (Gemma 3): the full layers' here,
        params = dict(params["full_attention"])  # the sliding layers' in families/gemma_config.py
    if not params:
        params = dict(cfg.get("rope_scaling") or {})
        params["rope_theta"] = cfg.get("rope_theta", 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise QloraError(
            f"{source}: rope type {rope_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    theta = float(params.get("rope_theta", 10000.0))
    if rope_type == "default":
        return theta, None
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "type")}
    scaling["rope_type"] = rope_type
    return theta, scaling


def rope_inverse_frequencies(spec: ArchSpec) -> tuple["torch.Tensor", float]:
    """inv_freq [head_dim/2] (fp32) and the attention scaling applied to cos/sin."""
    import torch

    dim = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = spec.rope_scaling
    if scaling is None or scaling["rope_type"] == "dynamic":
        # dynamic NTK only changes anything beyond the trained context; we keep the base frequencies
        return inv_freq, 1.0
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"], 1.0
    if scaling["rope_type"] == "yarn":
        return yarn_frequencies(inv_freq, scaling, spec)
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_context = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled), 1.0


def yarn_frequencies(inv_freq: torch.Tensor, scaling: dict, spec: ArchSpec
                     ) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al., 2023; Qwen2.5 and Qwen3's long-context configs), as transformers
    computes it: the rotary dimensions that turn more than beta_fast times over the original
    context keep their frequency, those that turn fewer than beta_slow times are slowed by
    `factor`, with a linear ramp between; cos and sin are scaled by the attention factor
    (0.1·ln(factor) + 1, or the ratio of two such magnitudes with mscale / mscale_all_dim, or
    the config's own)."""
    import torch

    dim, base = spec.head_dim, spec.rope_theta
    old_context = scaling.get("original_max_position_embeddings") or spec.max_position_embeddings
    factor = scaling.get("factor") or spec.max_position_embeddings / old_context

    def magnitude(scale: float, weight: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * weight * math.log(scale) + 1.0

    attention = scaling.get("attention_factor")
    if attention is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention = (magnitude(factor, mscale) / magnitude(factor, mscale_all_dim)
                     if mscale and mscale_all_dim else magnitude(factor))

    def dimension_turning(turns: float) -> float:  # over the original context
        return dim * math.log(old_context / (turns * 2 * math.pi)) / (2 * math.log(base))

    low = dimension_turning(scaling.get("beta_fast") or 32)
    high = dimension_turning(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    # 0 where a dimension keeps its frequency, 1 where it is slowed by `factor`
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    return inv_freq / factor * ramp + inv_freq * (1 - ramp), float(attention)


def last_layers(keep: bool | int | None, layers: int, option: str = "keep_attention") -> int:
    """How many of a model's `layers` an option counting the last N layers covers
    (keep_attention, keep_activations): true all, false or None none, a number N the last N
    (refused past `layers`)."""
    if keep is True:
        return layers
    if not keep:
        return 0
    if keep > layers:
        raise QloraError(f"option `{option}`: {keep} layers, but the model has {layers}; "
                         f"give at most {layers}, or true for every layer")
    return int(keep)
