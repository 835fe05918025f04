"""GGUF for models on the generic path whose architecture llama.cpp runs.

A model on the generic path has no family module (models/families/); what its GGUF needs beyond
the native families' writer is one dict here per model_type, read from what llama.cpp's loader
(src/llama-model.cpp and src/models/ARCH.cpp) reads for that architecture:

- arch: the architecture llama.cpp runs it as (a gguf.MODEL_ARCH member's name); the tensor names
  come from gguf's own TensorNameMap for it, the tensor layouts from export/gguf.py (tensor_steps:
  GPT-2's Conv1D weights transposed, GPT-NeoX's fused qkv regrouped, q/k rows permuted where
  llama.cpp's rope rotates adjacent pairs, Gemma's norms stored as 1 + w).
- norm: ("layer" or "rms", the config attribute holding its eps, or the eps itself where
  transformers fixes it: OLMo's parameter-free LayerNorm uses 1e-5 whatever config.json says).
- rope: "full", "partial" (a rotary dimension count below head_dim, GPT-NeoX) or None (GPT-2's
  learned positions).
- keys: config attribute → the GGUFWriter method that writes it, where it is set (Granite's four
  multipliers, OLMo's clip_qkv, GPT-NeoX's parallel residual).
- requires: config attribute → the values llama.cpp's graph for that architecture computes; any
  other is refused, naming it (llama.cpp has no key for it and would compute another model).

Settings are read through transformers' own config class (transformers_config), so GPT-2's n_embd
is its hidden_size and a key config.json leaves out has transformers' default.
"""

from __future__ import annotations

from pathlib import Path

from qlora.errors import QloraError

# transformers' GELUs; llama.cpp computes the tanh one for all three (exact GELU differs by <5e-4)
GELU = ("gelu", "gelu_new", "gelu_pytorch_tanh")

GENERIC_FAMILIES = {
    "gpt2": dict(arch="GPT2", norm=("layer", "layer_norm_epsilon"), rope=None, keys={},
                 requires={"activation_function": GELU, "scale_attn_weights": (True,),
                           "scale_attn_by_inverse_layer_idx": (False,)}),
    "gpt_neox": dict(arch="GPTNEOX", norm=("layer", "layer_norm_eps"), rope="partial",
                     keys={"use_parallel_residual": "add_parallel_residual"},
                     # llama.cpp's gptneox loads the qkv and output biases and an untied head
                     requires={"hidden_act": GELU, "attention_bias": (True,),
                               "tie_word_embeddings": (False,)}),
    "olmo": dict(arch="OLMO", norm=("layer", 1e-5), rope="full",
                 keys={"clip_qkv": "add_clamp_kqv"},
                 requires={"hidden_act": ("silu",), "attention_bias": (False,)}),
    "granite": dict(arch="GRANITE", norm=("rms", "rms_norm_eps"), rope="full",
                    keys={"embedding_multiplier": "add_embedding_scale",
                          "residual_multiplier": "add_residual_scale",
                          "attention_multiplier": "add_attention_scale",
                          "logits_scaling": "add_logit_scale"},
                    requires={"hidden_act": ("silu",), "attention_bias": (False,),
                              "mlp_bias": (False,)}),
    # llama.cpp's gemma reads its head from the embedding and scales queries by 1/sqrt(head_dim)
    "gemma": dict(arch="GEMMA", norm=("rms", "rms_norm_eps"), rope="full", keys={},
                  requires={"hidden_act": GELU, "attention_bias": (False,),
                            "tie_word_embeddings": (True,)}),
}


def generic_family(config: dict) -> dict | None:
    return GENERIC_FAMILIES.get(config.get("model_type"))


def export_config(config: dict, source: Path) -> dict:
    """config.json of a generic family with the keys the GGUF writer reads as a native family's
    (hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim,
    intermediate_size, max_position_embeddings, rope_parameters) and the family's own settings,
    as transformers reads them; config.json's own keys are kept as they are. Refused where
    llama.cpp would compute another model."""
    from qlora.models.generic import transformers_config

    family = GENERIC_FAMILIES[config["model_type"]]
    tc = transformers_config(config, str(source))
    hidden, heads = tc.hidden_size, tc.num_attention_heads
    settings = {key: getattr(tc, key, None) for key in (*family["requires"], *family["keys"])}
    if isinstance(family["norm"][1], str):
        settings[family["norm"][1]] = getattr(tc, family["norm"][1])
    standard = dict(
        hidden_size=hidden, num_hidden_layers=tc.num_hidden_layers, num_attention_heads=heads,
        num_key_value_heads=getattr(tc, "num_key_value_heads", None) or heads,
        head_dim=getattr(tc, "head_dim", None) or hidden // heads,
        intermediate_size=(getattr(tc, "intermediate_size", None)
                           or getattr(tc, "n_inner", None) or 4 * hidden),
        max_position_embeddings=tc.max_position_embeddings, vocab_size=tc.vocab_size,
        rope_parameters=getattr(tc, "rope_parameters", None), **settings)
    out = {**standard, **config}
    check_settings(out, family, source)
    return out


def check_settings(config: dict, family: dict, source: Path) -> None:
    """Refuse a setting llama.cpp's architecture computes otherwise, naming it."""
    name, arch = f"{source}: {config['model_type']}", family["arch"].lower()
    for key, allowed in family["requires"].items():
        if config.get(key) not in allowed:
            raise QloraError(
                f"{name} sets {key} = {config.get(key)!r}, and llama.cpp's {arch} computes only "
                f"{' or '.join(map(repr, allowed))}: its GGUF would compute another model; GGUF "
                "export refuses it (`qlora merge` still writes the merged checkpoint)")
    if family["rope"] is None:
        return
    # transformers 5's config class reads any rope scaling into rope_parameters; transformers 4
    # leaves it in config.json's rope_scaling
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind != "default":
        raise QloraError(f"{name} sets rope scaling ({kind!r}); GGUF export writes rope scaling "
                         "for the native families only; remove it or merge with `qlora merge`")
    if family["rope"] == "full" and partial_rotary(config) != 1.0:
        raise QloraError(f"{name} sets partial_rotary_factor = {partial_rotary(config)}; "
                         f"llama.cpp's {arch} rotates every dimension of a head")


def partial_rotary(config: dict) -> float:
    """The share of each head's dimensions that rotate (GPT-NeoX's rotary_pct, Phi-3's factor)."""
    params = config.get("rope_parameters") or {}
    return float(params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)))


def add_family_hparams(w, config: dict, family: dict) -> None:
    """The norm's eps under llama.cpp's key for its kind, and the family's own keys."""
    kind, eps = family["norm"]
    eps = config[eps] if isinstance(eps, str) else eps
    if kind == "layer":
        w.add_layer_norm_eps(float(eps))
    else:
        w.add_layer_norm_rms_eps(float(eps))
    for key, method in family["keys"].items():
        if config.get(key) is not None:
            value = config[key]
            getattr(w, method)(value if isinstance(value, bool) else float(value))
