"""Tiny random models of each supported family, written in Hugging Face layout.

The demo and the tests build these on the spot (no hub here) and then load them through the
same path a user's real model directory takes. The tokenizer is character level: every printable
ASCII character is one token, so any text round-trips and sequences stay short.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

# ChatML, as Qwen uses it; its `generation` markers tell transformers what the assistant says
from qlora.data.templates import CHATML_TEMPLATE
from qlora.models.families import FAMILIES as FAMILY_MODULES

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<unk>"]
CHARACTERS = list(string.printable[:95]) + ["\n", "\t"]  # digits, letters, punctuation, space

FAMILIES = tuple(FAMILY_MODULES)


def tokenizer_vocab() -> dict[str, int]:
    tokens = SPECIAL_TOKENS + CHARACTERS
    return {tok: i for i, tok in enumerate(tokens)}


def build_tokenizer(out_dir: str | Path, chat_template: str | None = CHATML_TEMPLATE) -> None:
    """Write tokenizer.json + tokenizer_config.json (+ special_tokens_map.json) to out_dir."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = tokenizer_vocab()
    # BPE with no merges splits every word into single characters; no pre-tokenizer means
    # spaces and newlines are characters like any other.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(str(out_dir))


def tiny_config(family: str, vocab_size: int = 128, **overrides):
    """A transformers config of `family` with tiny random-model sizes."""
    from transformers import AutoConfig

    if family not in FAMILIES:
        raise ValueError(f"tiny models exist for {', '.join(FAMILIES)}, not {family!r}")
    vocab = tokenizer_vocab()
    sizes = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        pad_token_id=vocab["<pad>"],
    )
    sizes.update(FAMILY_MODULES[family].TINY_SIZES)
    sizes.update(overrides)
    return AutoConfig.for_model(family, **sizes)


def build_tiny_model(
    out_dir: str | Path,
    family: str = "llama",
    seed: int = 0,
    dtype: str = "float32",
    chat_template: str | None = CHATML_TEMPLATE,
    max_shard_size: str | None = None,
    **overrides,
) -> Path:
    """Save a random `family` model with the tiny tokenizer to out_dir; return out_dir."""
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    # Random init of transformers gives std 0.02 everywhere; norms at 1 (Gemma's at 0, as they
    # scale by 1 + w). Perturb every norm (Gemma's four per layer and q/k norms end in
    # "norm.weight" too) so that a model that forgets one, or its offset, is caught by the
    # logit comparisons.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
            if name.endswith(".bias"):
                p.normal_(0, 0.02)
            if name.endswith("mlp.gate.weight"):  # a router: clear choices, no near-ties
                p.normal_(0, 1.0)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its "Writing model shards" bar, for one tiny file
    try:
        model.save_pretrained(str(out), **kwargs)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    build_tokenizer(out, chat_template=chat_template)
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
           "pad_token_id": config.pad_token_id}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return out


def build_tiny_generic(out_dir: str | Path, model_type: str, seed: int = 0,
                       **config_values) -> Path:
    """Save a random transformers `model_type` model (one with no native module: the generic
    path's) of `config_values` with the tiny tokenizer to out_dir; every 1-D parameter moved off
    its initial 1 or 0, so that a norm or bias left out shows. Return out_dir."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    vocab = tokenizer_vocab()
    config = AutoConfig.for_model(model_type, vocab_size=128, bos_token_id=vocab["<s>"],
                                  eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"],
                                  **config_values)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(out_dir))
    build_tokenizer(out_dir)
    return Path(out_dir)
