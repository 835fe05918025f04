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

Types (QTYPES): f16, bf16, q8_0, q4_0 and the k-quant mixtures q2_k, q3_k_m, q4_k_s, q4_k_m,
q5_k_s, q5_k_m, q6_k. Which tensor gets which GGML type, and the fallbacks for rows that do not fill
whole blocks, are llama.cpp's rules (mixtures.py); BF16, Q8_0, Q4_0, Q5_0, Q5_1 are quantized by
gguf.quants, the k-quants by our own search (kquants.py in numpy on CPU worker processes, or the
same arithmetic in torch on the GPU, kquants_torch.py), optionally steered by an importance matrix
(imatrix.py). 1-D tensors (norms, biases, rope_freqs) stay F32.
"""

from __future__ import annotations

import functools
import json
import math
import re
import tempfile
from pathlib import Path

import numpy as np

from qlora.errors import QloraError
from qlora.export import kquants, mixtures
from qlora.export.mixtures import FILE_TYPES, K_QUANT_FILES
from qlora.files import check_writable, staged_file

QTYPES = tuple(FILE_TYPES)


def _gguf():
    import gguf

    return gguf


def arch_of(model_type: str):
    g = _gguf()
    from qlora.models.families import FAMILIES

    archs = {name: getattr(g.MODEL_ARCH, family.GGUF_ARCH) for name, family in FAMILIES.items()}
    if model_type not in archs:
        raise QloraError(f"config.json model_type {model_type!r}: GGUF export supports "
                         f"{', '.join(archs)}")
    return archs[model_type]


# --- q/k permutation ----------------------------------------------------------------------------
def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF (i, i+d/2) rotary row order → llama.cpp's interleaved (2i, 2i+1), per head."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of permute_rope (for reading a GGUF back)."""
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


# --- tensor types ---------------------------------------------------------------------------------
def encode(x: np.ndarray, type_name: str, importance: np.ndarray | None = None,
           quantizer=None) -> np.ndarray | kquants.Pending:
    """fp32 array → the array GGUFWriter.add_tensor takes for that type (raw bytes, but for F32),
    as a kquants.Pending whose result() is that array, encoded meanwhile by `quantizer` (a
    kquants.Workers or kquants_torch.OnDevice: see quantizer(); None: now, in this thread): the
    k-quants by our search, the other types by gguf.quants (or its bytes, in torch, on a GPU).
    `importance` (one value per input column) steers the k-quants' scale search; the other types
    have none. x may be a bf16 tensor's bit patterns (kquants.bf16_bits), widened where it is
    encoded."""
    if type_name == "F32":
        return kquants.as_float32(x)
    if quantizer is not None:
        return quantizer.submit(x, type_name, importance)
    return kquants.submit_type(x, type_name, importance)


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


def add_hparams(w, config: dict, arch_name: str) -> dict[str, np.ndarray]:
    """Write the model hyper-parameters; return the rope tensors to store (llama3's
    `rope_freqs`, LongRoPE's factors), by GGUF name."""
    g = _gguf()
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
    # a partial rotary (phi3's partial_rotary_factor) rotates only the first part of each head
    partial = (config.get("rope_parameters") or {}).get(
        "partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    w.add_rope_dimension_count(int(head_dim * partial))
    if arch_name == "phi3" and config.get("sliding_window"):
        w.add_sliding_window(config["sliding_window"])
    w.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    w.add_vocab_size(config["vocab_size"])
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
        w.add_rope_scaling_type(g.RopeScalingType.YARN)
        w.add_rope_scaling_factor(scaling["factor"])
        w.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
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

    if arch_name in WINDOW_ARCHS:
        return
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
    if spm and config.get("model_type") in ("gemma2", "gemma3_text"):
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
    if tj["model"].get("ignore_merges"):  # Llama 3's tokenizer
        return "llama-bpe"
    return "default"


# --- the export ---------------------------------------------------------------------------------
def export_gguf(model_dir: str | Path, out_file: str | Path, qtype: str = "f16",
                adapter_dir: str | Path | None = None, merge_base: str = "original",
                ignore_base_name: bool = False, log=None,
                imatrix: dict[str, np.ndarray] | None = None, threads: int | None = None,
                device: str = "auto") -> Path:
    """Write model_dir (+ adapter folded in first) as a GGUF file of type qtype; return out_file.

    `log` (default: stderr) hears where the k-quants are searched, the tensors stored in
    another type than their role asks for, and a sliding window llama.cpp will not apply.
    `imatrix`: Hugging Face weight name → mean squared activation of each input column
    (export/imatrix.py); the k-quant tensors weigh their rounding errors by it.
    `device`: where the k-quants are searched (quantizer(): auto takes the GPU where torch sees
    one); `threads`: on the CPU, processes quantizing them (None: one per core; 1: in this process)."""
    model_dir, out = Path(model_dir), Path(out_file)
    qtype = check_qtype(qtype)
    if threads is not None and threads < 1:
        raise QloraError(f"--threads {threads}: give at least 1 (1 quantizes in this process)")
    if imatrix is not None and qtype not in K_QUANT_FILES:
        raise QloraError(f"an importance matrix steers the k-quants only; --type {qtype} does not "
                         f"use one: drop --imatrix-data or choose one of {', '.join(K_QUANT_FILES)}")
    if out.exists():
        raise QloraError(f"{out} exists; give a new output path (nothing is overwritten)")
    check_writable(out, "--out")
    if not model_dir.is_dir():
        raise QloraError(f"--model {model_dir}: no such directory")
    refuse_generic(model_dir)
    from qlora.merge import read_config as _read_config

    check_moe_export(_read_config(model_dir), qtype, model_dir / "config.json")
    if log is None:
        import sys

        def log(text: str) -> None:
            print(text, file=sys.stderr)
    if adapter_dir is None:
        return _export(model_dir, out, qtype, log, imatrix or {}, model_dir.resolve().name, threads, device)
    from qlora.merge import check_adapter_base, merge_adapter, read_config

    check_adapter_base(model_dir, adapter_dir, ignore_base_name)

    src = read_config(model_dir)
    arch_name = _gguf().MODEL_ARCH_NAMES[arch_of(src.get("model_type", "?"))]
    if arch_name in LLAMA_CPP_GEMMA:
        gemma_settings(src, arch_name)  # refused before the merge, not after it
    # keep the base's own precision for the intermediate merge (no extra rounding before quantizing)
    dtype = src.get("dtype") or src.get("torch_dtype") or "bfloat16"
    dtype = dtype if dtype in ("float32", "float16", "bfloat16") else "bfloat16"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", suffix=".merge", dir=out.parent) as tmp:
        merged = merge_adapter(model_dir, adapter_dir, Path(tmp) / "merged", dtype=dtype,
                               base=merge_base, ignore_base_name=ignore_base_name)
        # named after what was merged, not after the temporary folder it was merged into
        name = f"{model_dir.resolve().name} + {Path(adapter_dir).resolve().name}"
        return _export(merged, out, qtype, log, imatrix or {}, name, threads, device)


# mixtures of experts: llama.cpp runs Mixtral as llama, Qwen3-MoE as qwen3moe, each layer's experts
# as three stacked tensors ffn_{gate,up,down}_exps [E, out, in] and the router as ffn_gate_inp
MIXTURE_OF_EXPERTS = ("mixtral", "qwen3_moe")
# the file types written for them: those whose every weight takes the file's one type (llama.cpp's
# k-quant and q4_0 mixtures give experts and attention of an 8-expert model types of their own,
# which mixtures.py does not reproduce)
MOE_QTYPES = ("f16", "bf16", "q8_0")
EXPERT_ROLES = {("gate_up_proj", 0): "ffn_gate_exps", ("gate_up_proj", 1): "ffn_up_exps",
                ("down_proj", 0): "ffn_down_exps"}


def check_moe_export(config: dict, qtype: str, source) -> None:
    """Refuse what the exporter does not write for a mixture of experts, before any work."""
    if config.get("model_type") not in MIXTURE_OF_EXPERTS:
        return
    if qtype not in MOE_QTYPES:
        raise QloraError(f"--type {qtype}: a mixture of experts ({config['model_type']}) is written "
                         f"as {', '.join(MOE_QTYPES)} only (llama.cpp's mixtures for experts are not "
                         "reproduced); export f16 and quantize it with llama.cpp's llama-quantize")
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


def refuse_generic(model_dir: Path) -> None:
    """GGUF's tensor names and hyper-parameters are written per family (families/ GGUF_ARCH); a
    model on the generic path has none, and is refused by its architecture's name; a mixture of
    experts is refused too (its stacked expert tensors are not written yet)."""
    from qlora.merge import read_config
    from qlora.models.families import FAMILIES
    from qlora.models.spec import is_native

    config = read_config(model_dir)
    if is_native(config):
        return
    architecture = ", ".join(config.get("architectures") or []) or "no architectures listed"
    raise QloraError(
        f"{model_dir / 'config.json'}: model_type {config.get('model_type')!r} ({architecture}) "
        f"runs on qlora's generic path, and GGUF export writes the native families only "
        f"({', '.join(FAMILIES)}); merge the adapter into a 16-bit checkpoint (`qlora merge`) and "
        "convert that with llama.cpp's convert_hf_to_gguf.py, which knows many more architectures")


ROUTER_NAME = re.compile(r"\.ffn_gate_inp\.weight$")


class ExpertStacks:
    """A mixture of experts' per-expert tensors (the Hub's layout) gathered into llama.cpp's
    stacked ones as they are read: a layer's projection is written once its last expert comes,
    so one projection of one layer is in memory at a time (shards may split a layer)."""

    def __init__(self, config: dict):
        from qlora.models.families.moe_config import num_experts

        self.count = num_experts(config, 0)
        self.pending: dict[str, dict[int, np.ndarray]] = {}  # GGUF name -> expert -> weight
        self.written = 0

    def takes(self, hf_name: str) -> bool:
        from qlora.models.families.moe_config import STACKED_EXPERTS

        if STACKED_EXPERTS.match(hf_name):
            raise QloraError(f"tensor {hf_name}: experts stored stacked; GGUF export reads the "
                             "Hub's one tensor per expert (save the model with transformers' "
                             "save_pretrained, which writes that layout)")
        return expert_slot(hf_name) is not None

    def add(self, hf_name: str, x: np.ndarray) -> tuple[str, np.ndarray] | None:
        name, expert = expert_slot(hf_name)
        group = self.pending.setdefault(name, {})
        group[expert] = x
        if len(group) < self.count:
            return None
        del self.pending[name]
        self.written += 1
        return name, np.stack([group[e] for e in range(self.count)])

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


def _export(model_dir: Path, out: Path, qtype: str, log, imatrix: dict[str, np.ndarray],
            name: str, threads: int | None, device: str = "auto") -> Path:
    from safetensors import safe_open

    from qlora.merge import read_config
    from qlora.models.load import weight_files

    g = _gguf()
    config = read_config(model_dir)
    arch = arch_of(config.get("model_type", "?"))
    arch_name = g.MODEL_ARCH_NAMES[arch]
    n_layer = config["num_hidden_layers"]
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    files = weight_files(model_dir)
    tmap = g.get_tensor_name_map(arch, n_layer)
    has_output = False
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            has_output |= "lm_head.weight" in sf.keys()
    model = mixtures.Model(n_layer=n_layer, n_head=n_head, n_kv_head=n_kv, has_output=has_output)

    gemma = gemma_settings(config, arch_name) if arch_name in LLAMA_CPP_GEMMA else None
    note_unwritten_window(config, arch_name, log)

    with staged_file(out) as tmp:
        w = g.GGUFWriter(str(tmp), arch_name, use_temp_file=True)
        w.add_name(name)
        rope_factors = add_hparams(w, config, arch_name)
        if gemma is not None:
            add_gemma_hparams(w, gemma, arch_name)
        moe = config.get("model_type") in MIXTURE_OF_EXPERTS
        if moe:
            check_moe_export(config, qtype, model_dir / "config.json")
            add_moe_hparams(w, config, arch_name)
        experts = ExpertStacks(config) if moe else None
        add_tokenizer(w, model_dir, config)
        w.add_file_type(g.LlamaFileType[FILE_TYPES[qtype][1]])
        w.add_quantization_version(g.GGML_QUANT_VERSION)

        fallbacks: dict[tuple[str, str, str, int], int] = {}  # (role, wanted, stored, row) -> count
        for name, factors in rope_factors.items():  # F32, as llama.cpp reads them
            w.add_tensor(name, factors)
        with quantizer(device, threads) as quantize_on:
            log(f"quantizing: {quantize_on}")
            # quantized while the next tensors are read; written in file order
            encoded = _encoded(files, tmap, arch_name, n_head, n_kv, gemma, qtype, model, fallbacks,
                               imatrix, quantize_on, experts)
            for (name, stored), data in kquants.in_order(encoded):
                w.add_tensor(name, data, raw_dtype=g.GGMLQuantizationType[stored])
        if experts is not None:
            experts.check_complete(model_dir)
        for (role, wanted, stored, width), count in fallbacks.items():
            log(f"note: --type {qtype}: {count} {role} tensor{'s' if count > 1 else ''} stored as "
                f"{stored} instead of {wanted}: row length {width} is not a multiple of "
                f"{mixtures.BLOCK[wanted]}")
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        if out.exists():
            raise QloraError(f"{out} appeared while exporting; not overwriting it")
    return out


def _encoded(files, tmap, arch_name, n_head, n_kv, gemma, qtype, model, fallbacks, imatrix, quantize_on,
             experts=None):
    """((GGUF name, stored type), encoded data or kquants.Pending, values) per tensor, in file order;
    a mixture of experts' per-expert tensors (`experts`: ExpertStacks) as one stack a projection,
    once its layer's last expert is read."""
    from safetensors import safe_open

    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for hf_name in sf.keys():
                if hf_name.endswith("rotary_emb.inv_freq"):
                    continue  # recomputed by llama.cpp
                if experts is not None and experts.takes(hf_name):
                    stacked = experts.add(hf_name, sf.get_tensor(hf_name).float().numpy())
                    if stacked is not None:  # a layer's projection, every expert read
                        name, x = stacked
                        choice = mixtures.tensor_type(name, x.shape, qtype, model)
                        yield (name, choice.stored), encode(x, choice.stored, None, quantize_on), x.size
                    continue
                name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise QloraError(f"{f.name}: tensor {hf_name} has no GGUF name for {arch_name}")
                t = sf.get_tensor(hf_name)
                choice = mixtures.tensor_type(name, tuple(t.shape), qtype, model)
                if experts is not None and ROUTER_NAME.search(name):
                    # the router stays F32, as llama.cpp's converter and quantizer keep it
                    choice = mixtures.Choice("F32", "F32")
                x = _host_values(t, choice.stored, quantize_on)
                if gemma is not None and hf_name.endswith("norm.weight"):
                    x = kquants.as_float32(x) + 1.0  # llama.cpp scales by the stored weight: 1 + w
                if arch_name == "llama" and ".self_attn.q_proj." in hf_name:
                    x = permute_rope(x, n_head)  # rows move; the columns (imatrix) do not
                elif arch_name == "llama" and ".self_attn.k_proj." in hf_name:
                    x = permute_rope(x, n_kv)
                if choice.stored != choice.wanted:
                    key = (mixtures.role_of(name)[0] + ".weight", choice.wanted, choice.stored, x.shape[-1])
                    fallbacks[key] = fallbacks.get(key, 0) + 1
                data = encode(x, choice.stored, imatrix.get(hf_name), quantize_on)
                yield (name, choice.stored), data, x.size


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
