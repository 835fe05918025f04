"""A Hugging Face checkpoint (optionally + adapter) → one GGUF file for llama.cpp, via the gguf package.

What llama.cpp needs and where it comes from:
- architecture: llama and mistral → "llama" (llama.cpp runs Mistral as llama), qwen2 → "qwen2",
  qwen3 → "qwen3"; tensor names from gguf's own TensorNameMap for that architecture.
- q_proj / k_proj of the "llama" architecture are permuted: llama.cpp's rope for llama rotates
  adjacent pairs (2i, 2i+1) of each head, HF's rotates (i, i+d/2). The rows of each head are
  reordered from [first half, second half] to interleaved (what convert_hf_to_gguf.py does too).
  qwen2/qwen3 run with llama.cpp's NEOX rope, which is HF's layout: no permutation.
- hyper-parameters, rope (theta; linear / yarn / llama3 scaling: llama3's per-frequency factors go
  into a `rope_freqs.weight` tensor), RMS eps, the tokenizer (tokens, types, merges, special ids,
  chat template).
- phi3 → "phi3": q/k/v and gate/up stay fused (`attn_qkv`, `ffn_up`), the rotary dimension count
  (partial rotary), the original context (`rope.scaling.original_context_length`, always: llama.cpp
  uses the long LongRoPE factors where its context exceeds it), and with LongRoPE the attention
  factor (`rope.scaling.attn_factor`) and the per-frequency divisors as two F32 tensors,
  `rope_factors_long.weight` and `rope_factors_short.weight` (convert_hf_to_gguf.py's layout).
- gemma2 → "gemma2", gemma3_text → "gemma3": norm weights stored as 1 + w (llama.cpp multiplies
  by the stored weight; transformers by 1 + w, what convert_hf_to_gguf.py adds too), the sliding
  window and the soft-caps as keys. llama.cpp does not read the layer pattern, the query scale
  nor Gemma 3's local RoPE base from the file: it derives them from the architecture and the
  layer count, so a config.json that departs from those is refused (`gemma_settings`).
- the generic path's gpt2, gpt_neox, olmo, granite and gemma: one dict each in gguf_generic.py
  (architecture, norm, rope, extra keys, refused settings); their tensors through the same plan,
  each moved into llama.cpp's layout by its STEPS (tensor_steps: GPT-2's Conv1D weights
  transposed, GPT-NeoX's fused qkv regrouped, olmo/granite q/k permuted, Gemma's norms 1 + w).

Types (QTYPES): f16, bf16, q8_0, q4_0 and the k-quant mixtures q2_k, q3_k_m, q4_k_s, q4_k_m,
q5_k_s, q5_k_m, q6_k. Which tensor gets which GGML type, and the fallbacks for rows that do not fill
whole blocks, are llama.cpp's rules (mixtures.py); BF16, Q8_0, Q4_0, Q5_0, Q5_1 are quantized by
gguf.quants, the k-quants by our own search (kquants.py in numpy on CPU worker processes, or the
same arithmetic in torch on the GPU, kquants_torch.py), optionally steered by an importance matrix
(imatrix.py). 1-D tensors (norms, biases, rope_freqs) stay F32.

One pass, into the staged output file: every tensor's name, shape and type is planned from the
safetensors headers (plan_tensors), the metadata and the tensor table are written first, then each
tensor as it comes out of the quantizer, in the table's order (checked as it is written). An
adapter is folded into each tensor as it is read (merge.Merge.tensor, rounded to the base's own
precision as `qlora merge` stores it: the file is byte for byte the export of the merged
checkpoint, with no checkpoint written). The disk needs room for the output file only; where it
has less, the export is refused before any tensor is read.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import math
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qlora.errors import QloraError
from qlora.export import kquants, mixtures
from qlora.export.gguf_generic import (GENERIC_FAMILIES, add_family_hparams, export_config,
                                       generic_family, partial_rotary)
from qlora.export.mixtures import FILE_TYPES, K_QUANT_FILES
from qlora.files import (check_free_space, check_writable, disk_full_refused, refuse_existing,
                         staged_file)

QTYPES = tuple(FILE_TYPES)


def _gguf():
    import gguf

    return gguf


def arch_of(model_type: str):
    """The gguf.MODEL_ARCH llama.cpp runs a native or generic family as."""
    g = _gguf()
    from qlora.models.families import FAMILIES

    names = {**{name: family.GGUF_ARCH for name, family in FAMILIES.items()},
             **{name: family["arch"] for name, family in GENERIC_FAMILIES.items()}}
    if model_type not in names:
        raise QloraError(f"config.json model_type {model_type!r}: GGUF export supports "
                         f"{', '.join(names)}")
    return getattr(g.MODEL_ARCH, names[model_type])


# --- q/k permutation ----------------------------------------------------------------------------
def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF (i, i+d/2) rotary row order → llama.cpp's interleaved (2i, 2i+1), per head."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of permute_rope (for reading a GGUF back)."""
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def qkv_by_part(w: np.ndarray, n_head: int) -> np.ndarray:
    """A fused qkv's rows from transformers' per-head [q k v] groups (GPT-NeoX) → llama.cpp's
    [every q | every k | every v]."""
    head_dim = w.shape[0] // n_head // 3
    return w.reshape(n_head, 3, head_dim, *w.shape[1:]).swapaxes(0, 1).reshape(w.shape)


def qkv_by_head(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of qkv_by_part."""
    head_dim = w.shape[0] // n_head // 3
    return w.reshape(3, n_head, head_dim, *w.shape[1:]).swapaxes(0, 1).reshape(w.shape)


# --- tensor layouts: what llama.cpp's architectures read otherwise than transformers stores -----
# llama.cpp's NORM rope rotates adjacent pairs: q/k rows permuted (its NEOX rope is HF's layout)
ROPE_ADJACENT_PAIRS = ("llama", "olmo", "granite")
# llama.cpp scales by the stored norm weight, transformers' Gemma by 1 + w
NORM_OF_ONE_PLUS_W = ("gemma", "gemma2", "gemma3")
# a fused qkv llama.cpp splits as [q | k | v] where transformers groups it by head
QKV_GROUPED_BY_HEAD = ("gptneox",)


def _heads(config: dict) -> int:
    return config["num_attention_heads"]


def _kv_heads(config: dict) -> int:
    return config.get("num_key_value_heads") or config["num_attention_heads"]


# step → (checkpoint layout → GGUF layout, its inverse), each on a numpy array and the config;
# every step but plus_one only moves values, so it takes a bf16 tensor's bit patterns as they are
STEPS = {
    "transpose": (lambda x, c: np.ascontiguousarray(x.T), lambda x, c: np.ascontiguousarray(x.T)),
    "qkv_by_part": (lambda x, c: qkv_by_part(x, _heads(c)), lambda x, c: qkv_by_head(x, _heads(c))),
    "rope_q": (lambda x, c: permute_rope(x, _heads(c)), lambda x, c: unpermute_rope(x, _heads(c))),
    "rope_k": (lambda x, c: permute_rope(x, _kv_heads(c)),
               lambda x, c: unpermute_rope(x, _kv_heads(c))),
    "plus_one": (lambda x, c: kquants.as_float32(x) + 1.0, lambda x, c: x - 1.0),
}


def tensor_steps(name: str, arch_name: str, transposed: frozenset[str]) -> tuple[str, ...]:
    """The STEPS, in order, that turn the model's tensor `name` (transformers' module path) into
    what llama.cpp's `arch_name` reads; `transposed`: the modules stored [in, out] (Conv1D)."""
    steps = []
    if name.endswith(".weight") and name.removesuffix(".weight") in transposed:
        steps.append("transpose")
    if arch_name in QKV_GROUPED_BY_HEAD and ".query_key_value." in name:
        steps.append("qkv_by_part")
    if arch_name in ROPE_ADJACENT_PAIRS and ".self_attn.q_proj." in name:
        steps.append("rope_q")  # rows move; the columns (imatrix) do not
    elif arch_name in ROPE_ADJACENT_PAIRS and ".self_attn.k_proj." in name:
        steps.append("rope_k")
    if arch_name in NORM_OF_ONE_PLUS_W and name.endswith("norm.weight"):
        steps.append("plus_one")
    return tuple(steps)


def gguf_shape(shape: tuple[int, ...], steps: tuple[str, ...]) -> tuple[int, ...]:
    return tuple(shape[::-1]) if "transpose" in steps else tuple(shape)


# --- tensor types ---------------------------------------------------------------------------------
def encode(x: np.ndarray, type_name: str, importance: np.ndarray | None = None,
           quantizer=None) -> np.ndarray | kquants.Pending:
    """fp32 array → the array GGUFWriter.add_tensor takes for that type (raw bytes, but for F32),
    as a kquants.Pending whose result() is that array, encoded meanwhile by `quantizer` (a
    kquants.Workers or kquants_torch.OnDevice: see quantizer(); None: now, in this thread): the
    k-quants by our search, the other types by gguf.quants (or its bytes, in torch, on a GPU).
    `importance` (one value per input column; a stack of experts' [experts, rows, cols], a vector
    per expert) steers the k-quants' scale search; the other types have none. x may be a bf16
    tensor's bit patterns (kquants.bf16_bits), widened where it is encoded."""
    if type_name == "F32":
        return kquants.as_float32(x)
    submit = quantizer.submit if quantizer is not None else kquants.submit_type
    return submit(x, type_name, importance)


def quantizer(device: str = "auto", threads: int | None = None):
    """Where the tensors are quantized: torch on the CUDA GPU that `device` names (auto: the one
    torch sees; the same bytes as numpy), else numpy on `threads` worker processes (None: one per
    core). Either is a with-block offering submit(x, type, importance) → kquants.Pending, for
    every type but F32."""
    from qlora.device import pick_device

    where = pick_device(device)
    if where.type == "cuda":
        from qlora.export.kquants_torch import OnDevice

        return OnDevice(where)
    return kquants.Workers(threads)


# --- hyper-parameters ---------------------------------------------------------------------------
def rope_settings(config: dict) -> tuple[float, dict | None]:
    """(rope theta, rope scaling dict or None) from either transformers 4 or 5 config keys."""
    params = config.get("rope_parameters") or {}
    # one set per layer kind (Gemma 3): the full layers' (llama.cpp sets the sliding layers' own)
    params = params.get("full_attention", params)
    theta = config.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    return float(theta), scaling


def llama3_rope_factors(scaling: dict, theta: float, head_dim: int) -> np.ndarray:
    """Per-frequency divisors of llama3 rope scaling (llama.cpp reads them as rope_freqs)."""
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_ctx = scaling.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:  # smooth blend between the two regimes
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def phi3_rope(w, config: dict) -> dict[str, np.ndarray]:
    """Phi-3's RoPE as llama.cpp's phi3 reads it, from what the model means by its config.json
    (models/families/phi3.rope_settings, as transformers reads it): theta, the original context,
    and with LongRoPE the attention factor written as a key and the short and long factors
    returned as the tensors to store (one divisor per rotated frequency)."""
    from qlora.models.families import phi3

    rope = phi3.rope_settings(config)
    g = _gguf()
    w.add_rope_freq_base(rope.theta)
    original = config.get("original_max_position_embeddings",
                          config.get("max_position_embeddings", 4096))
    w.add_rope_scaling_orig_ctx_len(rope.original_max_positions if rope.long_factor else original)
    if rope.long_factor is None:
        return {}
    w.add_rope_scaling_attn_factors(rope.attention_factor)
    names = g.TENSOR_NAMES
    return {names[g.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight": np.array(rope.long_factor, np.float32),
            names[g.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight": np.array(rope.short_factor, np.float32)}


def yarn_rope(w, scaling: dict, config: dict) -> None:
    """YaRN as llama.cpp reads it: the factor and the original context (each with the fallback
    transformers and models/spec.yarn_frequencies take), beta_fast / beta_slow where given;
    llama.cpp derives the attention factor from the factor (0.1·ln(factor) + 1), so settings that
    change it, or an untruncated ramp, are refused rather than written wrong."""
    g = _gguf()
    unwritten = [f"{k}: {scaling[k]}" for k in ("attention_factor", "mscale", "mscale_all_dim")
                 if scaling.get(k) is not None] + (
        ["truncate: false"] if scaling.get("truncate", True) is False else [])
    if unwritten:
        raise QloraError(f"config.json rope scaling: yarn's {', '.join(unwritten)} has no GGUF "
                         "key llama.cpp reads the same way; GGUF export writes yarn's factor, "
                         "original context and betas only")
    context = config.get("max_position_embeddings", 4096)
    original = scaling.get("original_max_position_embeddings") or context
    w.add_rope_scaling_type(g.RopeScalingType.YARN)
    w.add_rope_scaling_factor(float(scaling.get("factor") or context / original))
    w.add_rope_scaling_orig_ctx_len(int(original))
    if scaling.get("beta_fast"):
        w.add_rope_scaling_yarn_beta_fast(float(scaling["beta_fast"]))
    if scaling.get("beta_slow"):
        w.add_rope_scaling_yarn_beta_slow(float(scaling["beta_slow"]))


def add_hparams(w, config: dict, arch_name: str) -> dict[str, np.ndarray]:
    """Write the model hyper-parameters; return the rope tensors to store (llama3's
    `rope_freqs`, LongRoPE's factors), by GGUF name. A generic family's `config` is
    gguf_generic.export_config's."""
    g = _gguf()
    family = generic_family(config)
    n_head = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    w.add_context_length(config.get("max_position_embeddings", 4096))
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(config.get("num_key_value_heads") or n_head)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    if arch_name == "phi3" and config.get("sliding_window"):
        w.add_sliding_window(config["sliding_window"])
    if family is None:
        w.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    else:
        add_family_hparams(w, config, family)
    w.add_vocab_size(config["vocab_size"])
    if family is not None and family["rope"] is None:
        return {}  # learned positions (GPT-2): no rotary keys
    # a partial rotary (phi3's partial_rotary_factor, GPT-NeoX's rotary_pct) rotates only the
    # first part of each head
    w.add_rope_dimension_count(int(head_dim * partial_rotary(config)))
    if arch_name == "phi3":
        return phi3_rope(w, config)
    theta, scaling = rope_settings(config)
    w.add_rope_freq_base(theta)
    if not scaling:
        return {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        w.add_rope_scaling_type(g.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(scaling["factor"])
    elif kind == "yarn":
        yarn_rope(w, scaling, config)
    elif kind == "llama3":
        return {g.TENSOR_NAMES[g.MODEL_TENSOR.ROPE_FREQS] + ".weight":
                llama3_rope_factors(scaling, theta, head_dim)}
    else:
        raise QloraError(f"config.json rope scaling type {kind!r} is not supported by GGUF export "
                         f"(supported: linear, yarn, llama3; phi3's longrope)")
    return {}


# --- Gemma ---------------------------------------------------------------------------------------
# What llama.cpp's loader (llama-model.cpp) sets for Gemma instead of reading it from the file:
# one full attention layer in every N, and the query scale 1/sqrt(head_dim), or
# 1/sqrt(hidden / heads) for the 27B models, which it knows by their layer count.
LLAMA_CPP_GEMMA = {"gemma2": dict(full_every=2, layers_27b=46),
                   "gemma3": dict(full_every=6, layers_27b=62)}
LLAMA_CPP_GEMMA3_LOCAL_ROPE = 10000.0


def gemma_settings(config: dict, arch_name: str):
    """Gemma's settings (models/families/gemma_config.py), refused where llama.cpp would run the
    model otherwise than transformers does."""
    from qlora.models.families import FAMILIES

    settings = FAMILIES[config["model_type"]].settings(config)
    rules = LLAMA_CPP_GEMMA[arch_name]
    n_layer, hidden, heads = (config["num_hidden_layers"], config["hidden_size"],
                              config["num_attention_heads"])
    head_dim = config.get("head_dim") or hidden // heads
    scalar = hidden / heads if n_layer == rules["layers_27b"] else head_dim
    problems = []
    full = [w is None for w in settings.layer_windows]
    if full != [(i + 1) % rules["full_every"] == 0 for i in range(n_layer)]:
        problems.append(f"its layer pattern (full attention in layers "
                        f"{[i for i, f in enumerate(full) if f]}) is not one full layer in every "
                        f"{rules['full_every']}")
    if not math.isclose(settings.query_scale, scalar ** -0.5, rel_tol=1e-9):
        problems.append(f"query_pre_attn_scalar is {settings.query_scale ** -2:g}, llama.cpp "
                        f"uses {scalar:g} for a {n_layer}-layer {arch_name}")
    if arch_name == "gemma2" and None in (settings.attn_softcap, settings.final_softcap):
        problems.append("llama.cpp soft-caps Gemma 2's scores and logits always; config.json "
                        "turns a cap off")
    if arch_name == "gemma2" and not config.get("tie_word_embeddings", True):
        problems.append("llama.cpp's Gemma 2 reads its output head from the input embedding; "
                        "this one is untied")
    if arch_name == "gemma3" and settings.final_softcap is not None:
        problems.append("llama.cpp's Gemma 3 does not soft-cap its logits; config.json sets "
                        "final_logit_softcapping")
    if arch_name == "gemma3" and settings.local_rope_theta != LLAMA_CPP_GEMMA3_LOCAL_ROPE:
        problems.append(f"the sliding layers' RoPE base is {settings.local_rope_theta:g}, "
                        f"llama.cpp uses {LLAMA_CPP_GEMMA3_LOCAL_ROPE:g}")
    if problems:
        raise QloraError(f"GGUF export of this {config['model_type']} model refused: llama.cpp "
                         f"would run it otherwise than transformers: {'; '.join(problems)}")
    return settings


def add_gemma_hparams(w, settings, arch_name: str) -> None:
    windows = [win for win in settings.layer_windows if win is not None]
    if windows:
        w.add_sliding_window(windows[0])
    if arch_name == "gemma2":
        w.add_attn_logit_softcapping(settings.attn_softcap)
        w.add_final_logit_softcapping(settings.final_softcap)


# the architectures whose files carry the sliding window (llama.cpp applies it): phi3, Gemma
WINDOW_ARCHS = ("phi3", "gemma2", "gemma3")


def note_unwritten_window(config: dict, arch_name: str, log) -> None:
    """llama.cpp's llama (which runs Mistral and Mixtral) and qwen2/qwen3 have no sliding window:
    where a window shorter than the context is in effect (Qwen's only with use_sliding_window),
    tokens further apart than it attend to each other there and not in transformers. Said, not
    refused: within the window (Mistral 7B v0.1's 4096 tokens) the two compute the same, and
    llama.cpp's own converter writes these models so."""
    from qlora.models.families import FAMILIES

    if arch_name in WINDOW_ARCHS or config["model_type"] not in FAMILIES:
        return  # the generic families written have no window
    fields = FAMILIES[config["model_type"]].spec_fields(config)
    window, types = fields.get("sliding_window"), fields.get("layer_types")
    if window and window < config.get("max_position_embeddings", 0) and (
            types is None or "sliding_attention" in types):
        log(f"note: llama.cpp runs this {config['model_type']} model as {arch_name}, without its "
            f"sliding window of {window} tokens: past {window} tokens of context, its attention "
            "reaches further back than transformers' and qlora's")


# --- tokenizer ----------------------------------------------------------------------------------
def add_tokenizer(w, model_dir: Path, config: dict) -> None:
    """tokenizer.json → tokenizer.ggml.* keys. BPE with byte_fallback (Llama 2, Mistral) is
    llama.cpp's "llama" (SentencePiece) model; other BPE (Llama 3, Qwen, byte-level) is "gpt2"."""
    g = _gguf()
    path = model_dir / "tokenizer.json"
    if not path.exists():
        raise QloraError(f"{model_dir}: no tokenizer.json (GGUF export needs the fast tokenizer file)")
    tj = json.loads(path.read_text(encoding="utf-8"))
    model = tj["model"]
    if model.get("type") != "BPE":
        raise QloraError(f"{path}: tokenizer model {model.get('type')!r}; GGUF export supports BPE")
    spm = bool(model.get("byte_fallback"))
    # llama.cpp's "gpt2" model reads every normal token and merge as GPT-2 byte-level text (a space
    # is "Ġ"). A BPE vocabulary over raw characters (no ByteLevel step, e.g. our tiny char-level
    # tokenizer) is rewritten into that form, or llama.cpp drops spaces and newlines when it
    # tokenizes and prints "[UNK_BYTE_0x20]" when it detokenizes.
    recode = (lambda t: t) if spm or is_byte_level(tj) else byte_level_text
    entries = {i: (recode(tok), g.TokenType.NORMAL) for tok, i in model["vocab"].items()}
    for a in tj.get("added_tokens", []):
        entries[a["id"]] = (a["content"], g.TokenType.CONTROL if a.get("special") else g.TokenType.USER_DEFINED)
    n = max(config["vocab_size"], max(entries) + 1)
    if n > config["vocab_size"]:
        raise QloraError(f"{path}: {max(entries) + 1} tokens but config.json vocab_size is "
                         f"{config['vocab_size']}; the embedding would not cover them")
    tokens, types = [], []
    for i in range(n):  # ids the tokenizer never produces (padded embeddings) become UNUSED
        tok, typ = entries.get(i, (f"[PAD{i}]", g.TokenType.UNUSED))
        if spm and typ == g.TokenType.NORMAL and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", tok):
            typ = g.TokenType.BYTE
        tokens.append(tok)
        types.append(typ)
    w.add_tokenizer_model("llama" if spm else "gpt2")
    if spm and config.get("model_type") in ("gemma", "gemma2", "gemma3_text"):
        w.add_add_space_prefix(False)  # Gemma's SentencePiece adds no space before the text
    w.add_tokenizer_pre(pre_tokenizer_name(tj, config, spm))
    w.add_token_list(tokens)
    w.add_token_types(types)
    if spm:
        # SentencePiece in llama.cpp merges by score; tokenizer.json keeps no scores, and the
        # vocab order of these models is merge order, so a higher id gets a lower score.
        w.add_token_scores([-float(i) for i in range(n)])
    special = g.SpecialVocab(model_dir, load_merges=not spm, n_vocab=n)
    if not spm and not is_byte_level(tj):
        special.merges = [" ".join(recode(part) for part in (m if isinstance(m, list) else m.split(" ", 1)))
                          for m in model.get("merges") or []]
    special.add_to_gguf(w, quiet=True)
    eot = template_end_of_turn(model_dir)
    ids = special.special_token_ids
    if eot is not None and eot != ids.get("eos") and "eot" not in ids:
        w.add_eot_token_id(eot)
    if not spm and not special.merges:
        # llama.cpp refuses a gpt2 vocab without the merges key, and gguf cannot write an empty
        # array: write one merge that never fires (BPE starts from single characters and no merge
        # produces this multi-character left side).
        w.add_token_merges(["[no-merges] [no-merges]"])


def template_end_of_turn(model_dir: Path) -> int | None:
    """The token the chat template ends an assistant turn with, when it has one (ChatML's
    <|im_end|>, Llama 3's <|eot_id|>). Written as tokenizer.ggml.eot_token_id where it is not EOS,
    so that every llama.cpp version stops there (recent ones also guess it from its text)."""
    from qlora.chat import end_of_turn_id
    from qlora.models.load import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    template = getattr(tokenizer, "chat_template", None)
    return end_of_turn_id(tokenizer, template) if isinstance(template, str) else None


def is_byte_level(tj: dict) -> bool:
    """Whether tokenizer.json maps bytes to GPT-2's printable characters (ByteLevel pre-tokenizer
    or decoder, possibly inside a Sequence)."""
    return '"ByteLevel"' in json.dumps([tj.get("pre_tokenizer"), tj.get("decoder")])


@functools.cache
def _gpt2_byte_chars() -> list[str]:
    """GPT-2's byte → character table: printable Latin-1 bytes stand for themselves, the other 68
    bytes (controls, space, 0x7f-0xa0, 0xad) take the characters from U+0100 on, in byte order."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def byte_level_text(token: str) -> str:
    """A token over raw characters → the same token as GPT-2 byte-level text."""
    table = _gpt2_byte_chars()
    return "".join(table[b] for b in token.encode("utf-8"))


def pre_tokenizer_name(tj: dict, config: dict, spm: bool) -> str:
    """llama.cpp's name for the pre-tokenizer regex. convert_hf_to_gguf.py identifies it by
    hashing a tokenization; we go by family and the tokenizer's shape (see docs)."""
    if spm or tj.get("pre_tokenizer") is None:
        return "default"
    if config.get("model_type") in ("qwen2", "qwen3"):
        return "qwen2"
    if config.get("model_type") == "gpt2" or is_gpt2_split(tj["pre_tokenizer"]):
        # GPT-2's own regex: GPT-2's tokenizer, and any whose one pre-tokenizer is a ByteLevel
        # splitting by it (GPT-NeoX-20B's, which Pythia and OLMo use; llama.cpp's converter
        # names that one "olmo" or "mpt", regexes equal to "gpt-2"'s)
        return "gpt-2"
    if tj["model"].get("ignore_merges"):  # Llama 3's tokenizer
        return "llama-bpe"
    return "default"


def is_gpt2_split(pre_tokenizer: dict) -> bool:
    """Whether a tokenizer.json pre-tokenizer is a lone ByteLevel that splits by GPT-2's regex."""
    return pre_tokenizer.get("type") == "ByteLevel" and pre_tokenizer.get("use_regex", True)


# --- the export ---------------------------------------------------------------------------------
def export_gguf(model_dir: str | Path, out_file: str | Path, qtype: str = "f16",
                adapter_dir: str | Path | None = None, merge_base: str = "original",
                ignore_base_name: bool = False, log=None,
                imatrix: dict[str, np.ndarray] | None = None, threads: int | None = None,
                device: str = "auto") -> Path:
    """Write model_dir (+ adapter folded in, tensor by tensor) as a GGUF file of type qtype;
    return out_file. The disk needs room for that file only (refused before any slow work if not).

    `log` (default: stderr) hears where the k-quants are searched, the tensors stored in
    another type than their role asks for, and a sliding window llama.cpp will not apply.
    `imatrix`: Hugging Face weight name → mean squared activation of each input column
    (export/imatrix.py); the k-quant tensors weigh their rounding errors by it.
    `device`: where the k-quants are searched (quantizer(): auto takes the GPU where torch sees
    one); `threads`: on the CPU, processes quantizing them (None: one per core; 1: in this process)."""
    if imatrix is not None and check_qtype(qtype) not in K_QUANT_FILES:
        raise QloraError(f"an importance matrix steers the k-quants only; --type {qtype} does not "
                         f"use one: drop --imatrix-data or choose one of {', '.join(K_QUANT_FILES)}")
    with open_gguf(model_dir, out_file, qtype, adapter_dir, merge_base, ignore_base_name, log,
                   threads, device) as gguf_file:
        gguf_file.write_tensors(imatrix)
    return Path(out_file)


@contextmanager
def open_gguf(model_dir: str | Path, out_file: str | Path, qtype: str = "f16",
              adapter_dir: str | Path | None = None, merge_base: str = "original",
              ignore_base_name: bool = False, log=None, threads: int | None = None,
              device: str = "auto", headers=None) -> Iterator[GGUFTensors]:
    """Everything of an export up to its tensors, each refusal before any slow work: the inputs
    checked, every tensor's name, shape and type planned from the safetensors headers, the
    metadata and the tensor table written into the staged file beside out_file, and the folder's
    free space checked against the rest of it. The block writes the tensors
    (GGUFTensors.write_tensors, maybe after other slow work: an importance matrix); the file
    becomes out_file when the block completes, and is deleted if it fails. `headers`: model_dir's
    safetensors headers (models.weights.read_headers), where the caller has read them."""
    from qlora.models.weights import headers_of

    model_dir, out = Path(model_dir), Path(out_file)
    qtype = check_qtype(qtype)
    config = check_export_inputs(model_dir, out, qtype, threads)
    name, merge = model_dir.resolve().name, None
    if adapter_dir is not None:
        from qlora.merge import merged_dtype, prepare_merge

        merge = prepare_merge(model_dir, Path(adapter_dir), merged_dtype(config), merge_base,
                              ignore_base_name, headers)
        headers = merge.headers  # read there, after the adapter's own refusals, where not given
        name = f"{name} + {Path(adapter_dir).resolve().name}"  # what was merged
    headers = headers_of(model_dir, headers)
    tensors = planned_file(model_dir, config, headers, merge, qtype, name, log or _to_stderr,
                           threads, device)
    w = tensors.writer
    # the metadata is written before its size is known: a disk with less free refuses there
    with staged_file(out) as tmp, disk_full_refused(out.parent, "--out"):
        try:
            w.write_header_to_file(tmp)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            check_room(w, out)
            yield tensors
            if any(w.tensors):
                raise RuntimeError(f"{out}: the export ended with tensors of its table unwritten")
        finally:
            w.close()
        if out.exists():
            raise QloraError(f"{out} appeared while exporting; not overwriting it")


def _to_stderr(text: str) -> None:
    print(text, file=sys.stderr)


def check_export_inputs(model_dir: Path, out: Path, qtype: str, threads: int | None) -> dict:
    """The refusals of an export's arguments, before any file but config.json is read; that
    config (a generic family's as gguf_generic.export_config reads it)."""
    from qlora.models.spec import read_config

    if threads is not None and threads < 1:
        raise QloraError(f"--threads {threads}: give at least 1 (1 quantizes in this process)")
    refuse_existing(out, "--out")
    check_writable(out, "--out")
    if not model_dir.is_dir():
        raise QloraError(f"--model {model_dir}: no such directory")
    config = read_config(model_dir)[0]
    refuse_generic(model_dir, config)
    check_moe_export(config, model_dir / "config.json")
    if generic_family(config) is not None:
        return export_config(config, model_dir / "config.json")
    return config


def planned_file(model_dir: Path, config: dict, headers, merge, qtype: str, name: str, log,
                 threads: int | None, device: str) -> GGUFTensors:
    """The file's tensors planned (plan_tensors) and its metadata and tensor table set in a
    GGUFWriter, no file opened yet."""
    g = _gguf()
    arch = arch_of(config.get("model_type", "?"))
    arch_name = g.MODEL_ARCH_NAMES[arch]
    gemma = gemma_settings(config, arch_name) if arch_name in LLAMA_CPP_GEMMA else None
    note_unwritten_window(config, arch_name, log)
    plan = plan_tensors(headers.shapes(), config, arch, qtype, model_dir,
                        checkpoint_layout(config, headers, merge, model_dir))
    w = g.GGUFWriter(None, arch_name)  # the file is opened once everything is known
    rope_factors = add_metadata(w, model_dir, config, arch_name, gemma, qtype, name)
    for factor_name, factors in rope_factors.items():  # F32, as llama.cpp reads them
        w.add_tensor_info(factor_name, factors.shape, factors.dtype, factors.nbytes)
    for planned in plan:
        # the values' shape: gguf converts a byte shape only for a uint8 dtype
        w.add_tensor_info(planned.name, planned.shape, np.dtype(np.float32), planned.nbytes,
                          raw_dtype=planned.stored_type)
    return GGUFTensors(w, plan, rope_factors, headers, merge, config, qtype, log, threads, device)


def checkpoint_layout(config: dict, headers, merge, model_dir: Path):
    """How the checkpoint's files name and store the model's tensors (merge.BaseLayout: a generic
    model's file names → its module paths, its Conv1D modules), as its merge reads them."""
    from qlora.merge import base_layout

    if merge is not None:
        return merge.layout
    return base_layout(config, headers.shapes(), str(model_dir / "config.json"))


def add_metadata(w, model_dir: Path, config: dict, arch_name: str, gemma, qtype: str,
                 name: str) -> dict[str, np.ndarray]:
    """The file's key-value metadata (name, hyperparameters, tokenizer, file type) into `w`;
    returns the RoPE factor tensors the hyperparameters call for."""
    g = _gguf()
    w.add_name(name)
    rope_factors = add_hparams(w, config, arch_name)
    if gemma is not None:
        add_gemma_hparams(w, gemma, arch_name)
    if config.get("model_type") in MIXTURE_OF_EXPERTS:
        add_moe_hparams(w, config, arch_name)
    add_tokenizer(w, model_dir, config)
    w.add_file_type(g.LlamaFileType[FILE_TYPES[qtype][1]])
    w.add_quantization_version(g.GGML_QUANT_VERSION)
    return rope_factors


def check_room(w, out: Path) -> None:
    """Refuse (QloraError) when the output's folder cannot hold the tensors still to write: the
    exact bytes of the file, from its tensor table, less the metadata already written."""
    written = w.fout[0].tell()
    align = w.data_alignment
    total = w.ggml_pad(written, align) + sum(w.ggml_pad(ti.nbytes, align) for ti in w.tensors[0].values())
    check_free_space(out.parent, total - written, total, "--out")


@dataclass
class GGUFTensors:
    """The tensors of a GGUF file whose metadata and tensor table are written (open_gguf)."""

    writer: object  # gguf.GGUFWriter, its table written
    plan: list[Planned]
    rope_factors: dict[str, np.ndarray]  # written first, as F32
    headers: object  # models.weights.CheckpointHeaders: the base's tensors and their shards
    merge: object | None  # qlora.merge.Merge: the adapter folded into each tensor read
    config: dict
    qtype: str
    log: Callable[[str], None]
    threads: int | None
    device: str

    def write_tensors(self, imatrix: dict[str, np.ndarray] | None = None) -> None:
        """Each tensor read (its adapter folded in), encoded and written in the table's order,
        while the next ones are read; only those in flight are held (kquants.in_order)."""
        w = self.writer
        for factors in self.rope_factors.values():
            w.write_tensor_data(factors)
        read = ShardReader(self.headers, self.plan, self.merge)
        with contextlib.closing(read), quantizer(self.device, self.threads) as quantize_on:
            self.log(f"quantizing: {quantize_on}")
            encoded = _encoded(self.plan, read, self.config, imatrix or {}, quantize_on)
            for planned, data in kquants.in_order(encoded):
                check_agrees(w, planned, data)
                w.write_tensor_data(data)
        for line in fallback_notes(self.plan, self.qtype):
            self.log(line)


class ShardReader:
    """A tensor's name in the base's files → its values (a torch tensor in the checkpoint's
    dtype), with the adapter folded in (`merge`: a qlora.merge.Merge, which takes the same file
    name; None: the base's own); `headers` (models.weights.CheckpointHeaders) say which shard
    holds it. Each shard is mapped at its first tensor `plan` reads and unmapped after its last:
    the pages read stay mapped for one shard at a time (two where a stack of experts spans
    them), as when the shards were read one after the other."""

    def __init__(self, headers, plan: list[Planned], merge):
        self.merge, self.opened = merge, {}
        self.shard_of = {key: h.file for key, h in headers.tensors.items()}
        self.reads_left = collections.Counter(self.shard_of[hf_name] for p in plan for hf_name in p.sources)

    def __call__(self, hf_name: str) -> np.ndarray:
        from qlora.models.weights import open_shard

        f = self.shard_of[hf_name]
        if f not in self.opened:
            self.opened[f] = open_shard(f).__enter__()
        sf = self.opened[f]
        if self.merge is None:
            x = sf.get_tensor(hf_name)
        else:
            x = self.merge.tensor(hf_name, lambda: sf.get_tensor(hf_name))
        self.reads_left[f] -= 1
        if self.reads_left[f] == 0:
            self.opened.pop(f).__exit__(None, None, None)
        return x

    def close(self) -> None:
        while self.opened:
            self.opened.popitem()[1].__exit__(None, None, None)


# mixtures of experts: llama.cpp runs Mixtral as llama, Qwen3-MoE as qwen3moe, each layer's experts
# as three stacked tensors ffn_{gate,up,down}_exps [E, out, in] and the router as ffn_gate_inp;
# every file type, with llama.cpp's rules for experts (mixtures.py)
MIXTURE_OF_EXPERTS = ("mixtral", "qwen3_moe")
EXPERT_ROLES = {("gate_up_proj", 0): "ffn_gate_exps", ("gate_up_proj", 1): "ffn_up_exps",
                ("down_proj", 0): "ffn_down_exps"}


def check_moe_export(config: dict, source) -> None:
    """Refuse what the exporter does not write for a mixture of experts, before any work."""
    if config.get("model_type") not in MIXTURE_OF_EXPERTS:
        return
    if config["model_type"] == "qwen3_moe" and not config.get("norm_topk_prob", False):
        raise QloraError(f"{source}: norm_topk_prob is false, but llama.cpp's qwen3moe always "
                         "renormalises the top-k router weights; its GGUF would compute another model")
    if config["model_type"] == "qwen3_moe" and (config.get("mlp_only_layers")
                                                 or config.get("decoder_sparse_step", 1) != 1):
        raise QloraError(f"{source}: mlp_only_layers / decoder_sparse_step give this model dense "
                         "layers, which llama.cpp's qwen3moe does not have (every layer sparse)")


def add_moe_hparams(w, config: dict, arch_name: str) -> None:
    from qlora.models.families.moe_config import num_experts

    w.add_expert_count(num_experts(config, 0))
    w.add_expert_used_count(config["num_experts_per_tok"])
    if arch_name == "qwen3moe":
        w.add_expert_feed_forward_length(config["moe_intermediate_size"])


def refuse_generic(model_dir: Path, config: dict) -> None:
    """GGUF's tensor names and hyper-parameters are written per family: a native one's
    (families/ GGUF_ARCH) or a generic one's (gguf_generic.GENERIC_FAMILIES); any other model on
    the generic path is refused by its architecture's name."""
    from qlora.models.spec import is_native

    if is_native(config) or generic_family(config) is not None:
        return
    architecture = ", ".join(config.get("architectures") or []) or "no architectures listed"
    raise QloraError(
        f"{model_dir / 'config.json'}: model_type {config.get('model_type')!r} ({architecture}) "
        f"runs on qlora's generic path, and GGUF export writes the native families and, of the "
        f"generic path, {', '.join(GENERIC_FAMILIES)} only; merge the adapter into a 16-bit "
        "checkpoint (`qlora merge`) and convert that with llama.cpp's convert_hf_to_gguf.py, "
        "which knows many more architectures")


ROUTER_NAME = re.compile(r"\.ffn_gate_inp\.weight$")


class ExpertStacks:
    """A mixture of experts' per-expert tensors (the Hub's layout) planned as llama.cpp's stacked
    ones: a layer's projection is planned once its last expert's header comes (shards may split
    a layer), and read expert by expert when its turn to be written comes."""

    def __init__(self, config: dict):
        from qlora.models.families.moe_config import num_experts

        self.count = num_experts(config, 0)
        # GGUF name -> expert -> (Hugging Face name, shape)
        self.pending: dict[str, dict[int, tuple[str, tuple[int, ...]]]] = {}

    def takes(self, hf_name: str) -> bool:
        from qlora.models.families.moe_config import STACKED_EXPERTS

        if STACKED_EXPERTS.match(hf_name):
            raise QloraError(f"tensor {hf_name}: experts stored stacked; GGUF export reads the "
                             "Hub's one tensor per expert (save the model with transformers' "
                             "save_pretrained, which writes that layout)")
        return expert_slot(hf_name) is not None

    def add(self, hf_name: str,
            shape: tuple[int, ...]) -> tuple[str, tuple[int, ...], tuple[str, ...]] | None:
        """(GGUF name, stacked shape, its experts' Hugging Face names) once the last expert of a
        projection is added; None before."""
        name, expert = expert_slot(hf_name)
        group = self.pending.setdefault(name, {})
        group[expert] = (hf_name, tuple(shape))
        if len(group) < self.count:
            return None
        del self.pending[name]
        shapes = {s for _, s in group.values()}
        if len(shapes) > 1:
            raise QloraError(f"{hf_name}: the experts stacked into {name} differ in shape "
                             f"({sorted(shapes)}); the checkpoint is damaged")
        return name, (self.count, *shape), tuple(group[e][0] for e in range(self.count))

    def check_complete(self, source) -> None:
        if self.pending:
            name, group = next(iter(self.pending.items()))
            raise QloraError(f"{source}: {name} has {len(group)} of {self.count} experts; a shard "
                             "may be missing")


def expert_slot(hf_name: str) -> tuple[str, int] | None:
    """(the stacked GGUF tensor, the expert's index in it) of a Hub per-expert linear; None for
    any other tensor."""
    from qlora.models.families.moe_config import EXPERT_LINEARS, HUB_EXPERT, module_key

    m = HUB_EXPERT.match(module_key(hf_name))
    if m is None:
        return None
    layer = int(m.group(1).rsplit(".", 1)[1])
    return f"blk.{layer}.{EXPERT_ROLES[EXPERT_LINEARS[m.group(3)]]}.weight", int(m.group(2))


def check_qtype(qtype: str) -> str:
    """The file type, lower-cased; refused (naming the choices) when unknown."""
    qtype = qtype.lower()
    if qtype not in QTYPES:
        raise QloraError(f"--type {qtype!r}: choose one of {', '.join(QTYPES)}")
    return qtype


# --- the plan: every tensor from the safetensors headers, before any data is read ---------------
@dataclass(frozen=True)
class Planned:
    """One tensor of the file: its GGUF name, its shape as numpy holds it (GGUF lists it
    reversed), its type, and the Hugging Face tensors it is made of (one; a stack: one per
    expert, in expert order)."""

    name: str
    shape: tuple[int, ...]
    choice: mixtures.Choice
    sources: tuple[str, ...]
    stacked: bool = False
    steps: tuple[str, ...] = ()  # STEPS from the checkpoint's layout to llama.cpp's, in order

    @property
    def stored_type(self):
        return _gguf().GGMLQuantizationType[self.choice.stored]

    @property
    def nbytes(self) -> int:
        return math.prod(_gguf().quant_shape_to_byte_shape(self.shape, self.stored_type))


def plan_tensors(shapes: dict[str, tuple[int, ...]], config: dict, arch, qtype: str,
                 source: Path, layout=None) -> list[Planned]:
    """The file's tensors in the order they are written (the shards', each in its key order; a
    stack where its last expert comes), from `shapes` (Hugging Face name → shape, in that order:
    models.weights.CheckpointHeaders.shapes). `layout` (merge.BaseLayout; None: a native
    family's, every file name the model's) names each file tensor as the model does."""
    from qlora.merge import BaseLayout

    g = _gguf()
    layout = layout or BaseLayout()
    arch_name = g.MODEL_ARCH_NAMES[arch]
    n_layer, n_head = config["num_hidden_layers"], config["num_attention_heads"]
    experts = ExpertStacks(config) if config.get("model_type") in MIXTURE_OF_EXPERTS else None
    tmap = g.get_tensor_name_map(arch, n_layer)
    names = {hf_name: model_name(hf_name, layout) for hf_name in shapes}
    model = mixtures.Model(n_layer=n_layer, n_head=n_head,
                           n_kv_head=config.get("num_key_value_heads") or n_head,
                           has_output="lm_head.weight" in names.values(),
                           n_expert=experts.count if experts is not None else 0, arch=arch_name)
    plan = []
    for hf_name, shape in shapes.items():
        if names[hf_name] is None:
            continue  # recomputed by llama.cpp (rotary tables), or unread by transformers too
        if experts is not None and experts.takes(hf_name):
            stacked = experts.add(hf_name, shape)
            if stacked is not None:  # a layer's projection, every expert planned
                name, shape, sources = stacked
                plan.append(Planned(name, shape, mixtures.tensor_type(name, shape, qtype, model),
                                    sources, stacked=True))
            continue
        name = tmap.get_name(names[hf_name], try_suffixes=(".weight", ".bias"))
        if name is None:
            raise QloraError(f"{source}: tensor {hf_name} has no GGUF name for {arch_name}")
        steps = tensor_steps(names[hf_name], arch_name, layout.transposed)
        shape = gguf_shape(shape, steps)
        choice = mixtures.tensor_type(name, shape, qtype, model)
        if experts is not None and ROUTER_NAME.search(name):
            # the router stays F32, as llama.cpp's converter and quantizer keep it
            choice = mixtures.Choice("F32", "F32")
        plan.append(Planned(name, shape, choice, (hf_name,), steps=steps))
    if experts is not None:
        experts.check_complete(source)
    return plan


def model_name(hf_name: str, layout) -> str | None:
    """The model's name of a checkpoint tensor (`layout`: merge.BaseLayout); None for one that
    is not written: a stored rotary table (llama.cpp computes its own), a tensor transformers
    leaves unread."""
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    return layout.name(hf_name)


def fallback_notes(plan: list[Planned], qtype: str) -> list[str]:
    """One line per kind of tensor stored in another type than its role asks for."""
    counts: dict[tuple[str, str, str, int], int] = {}  # (role, wanted, stored, row) -> count
    for p in plan:
        if p.choice.stored != p.choice.wanted:
            key = (mixtures.role_of(p.name)[0] + ".weight", p.choice.wanted, p.choice.stored, p.shape[-1])
            counts[key] = counts.get(key, 0) + 1
    return [f"note: --type {qtype}: {count} {role} tensor{'s' if count > 1 else ''} stored as "
            f"{stored} instead of {wanted}: row length {width} is not a multiple of "
            f"{mixtures.BLOCK[wanted]}" for (role, wanted, stored, width), count in counts.items()]


def check_agrees(w, planned: Planned, data: np.ndarray) -> None:
    """`planned` is the next entry of the table written, and `data` the tensor that entry
    announced (else a bug: raised, and the staged file is deleted)."""
    g = _gguf()
    shape = (g.quant_shape_from_byte_shape(data.shape, planned.stored_type)
             if data.dtype == np.uint8 else data.shape)
    upcoming = next(iter(w.tensors[0]), None)
    if upcoming != planned.name or tuple(shape) != planned.shape or data.nbytes != planned.nbytes:
        raise RuntimeError(f"{planned.name}: encoded as {tuple(shape)}, {data.nbytes} bytes; its "
                           f"planned entry says {planned.shape}, {planned.nbytes} bytes "
                           f"({planned.choice.stored}), and the table's next entry is {upcoming}")


# --- the data pass --------------------------------------------------------------------------------
def _encoded(plan: list[Planned], read, config: dict, imatrix, quantize_on):
    """(Planned, encoded data or kquants.Pending, values) per planned tensor, in plan order;
    `read`: Hugging Face name → its torch tensor (ShardReader)."""
    for planned in plan:
        if planned.stacked:
            x = np.stack([read(hf_name).float().numpy() for hf_name in planned.sources])
            importance = stacked_importance(imatrix, planned)
        else:
            hf_name = planned.sources[0]
            x = _host_values(read(hf_name), planned.choice.stored, quantize_on)
            for step in planned.steps:
                x = STEPS[step][0](x, config)
            importance = imatrix.get(hf_name)
        yield planned, encode(x, planned.choice.stored, importance, quantize_on), x.size


def stacked_importance(imatrix: dict[str, np.ndarray], planned: Planned) -> np.ndarray | None:
    """[experts, in]: each expert's own importance for a k-quant stack (an expert no token
    reached has none: its columns weigh alike, ones); None where no expert has one."""
    if planned.choice.stored not in kquants.KINDS:
        return None
    vectors = [imatrix.get(hf_name) for hf_name in planned.sources]
    if all(v is None for v in vectors):
        return None
    width = planned.shape[-1]
    return np.stack([np.ones(width, np.float32) if v is None else v for v in vectors])


def _host_values(t, stored: str, quantize_on) -> np.ndarray:
    """A checkpoint tensor as the quantizer takes it: float32, or, for a bf16 tensor going to the
    CPU workers in a quantized type, its bit patterns (kquants.bf16_bits): the exporting process
    then writes 2 bytes a value into the workers' file instead of widening and writing 4, and the
    workers widen it in parallel (exact: the same bytes). The widening and 4-byte write were
    projected to take this one process about as long as 16 workers take to encode (docs/BENCHMARKS.md,
    "Export on the CPU alone")."""
    import torch

    if (t.dtype == torch.bfloat16 and stored != "F32" and t.dim() == 2
            and isinstance(quantize_on, kquants.Workers)):
        return kquants.bf16_bits(t)
    return t.float().numpy()


def describe(gguf_file: str | Path) -> str:
    """One line about a GGUF file: architecture, tensor count, types used (for the CLI)."""
    g = _gguf()
    r = g.GGUFReader(str(gguf_file))
    arch = r.fields["general.architecture"]
    arch_name = bytes(arch.parts[arch.data[0]]).decode()
    counts: dict[str, int] = {}
    for t in r.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    size = Path(gguf_file).stat().st_size
    return f"{arch_name}, {len(r.tensors)} tensors ({counts}), {size / 1e6:.1f} MB"
