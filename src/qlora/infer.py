"""Text generation with a KV cache: greedy or sampled, for a base model with or without adapter.
(On the generic path the cache is transformers' own, made by its model on the first step.)

The logits processors follow the order and definitions of transformers' `generate`
(repetition penalty, temperature, top-k, top-p), so greedy decoding gives its tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from qlora.device import compute_dtype, pick_device
from qlora.errors import QloraError
from qlora.models.decoder import DecoderLM, compute_device
from qlora.models.generic import GenericLM


@dataclass
class GenerationOptions:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise QloraError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise QloraError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise QloraError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise QloraError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def process_logits(logits: torch.Tensor, seen: torch.Tensor, opts: GenerationOptions) -> torch.Tensor:
    """logits [V] (fp32) of the next token, after penalty, temperature, top-k and top-p."""
    if opts.repetition_penalty != 1.0 and seen.numel():
        picked = logits[seen]
        logits = logits.scatter(0, seen, torch.where(
            picked < 0, picked * opts.repetition_penalty, picked / opts.repetition_penalty))
    if opts.temperature == 0:
        return logits
    logits = logits / opts.temperature
    if opts.top_k > 0:
        kth = torch.topk(logits, min(opts.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if opts.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - opts.top_p
        drop[-1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def stream(
    model: DecoderLM | GenericLM, input_ids: list[int], opts: GenerationOptions
) -> Iterator[int]:
    """Yield new token ids one at a time until EOS or max_new_tokens."""
    if not input_ids:
        raise QloraError("the prompt is empty: give at least one token")
    limit = len(input_ids) + opts.max_new_tokens
    device = compute_device(model)
    cache = model.new_cache(1, limit)  # a KVCache, or transformers' own on the generic path
    generator = None
    if opts.temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(opts.seed if opts.seed is not None else torch.seed())
    seen = torch.tensor(input_ids, device=device)
    tokens = seen[None]
    eos = set(opts.eos_token_ids)
    outdated = getattr(model, "cache_outdated", None)  # a family whose RoPE may change (phi3)
    for _ in range(opts.max_new_tokens):
        if outdated is not None and outdated(cache.length, len(seen)):
            cache, tokens = model.new_cache(1, limit), seen[None]  # the whole sequence again
        logits = model(tokens, cache=cache)[0, -1].float()
        logits = process_logits(logits, seen, opts)
        if opts.temperature == 0:
            next_id = int(torch.argmax(logits))
        else:
            next_id = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
        yield next_id
        if next_id in eos:
            return
        tokens = torch.tensor([[next_id]], device=device)
        seen = torch.cat([seen, tokens[0]])


def generate(
    model: DecoderLM | GenericLM, input_ids: list[int], opts: GenerationOptions,
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """The new tokens (EOS included when reached) for one prompt."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for token in stream(model, input_ids, opts):
            out.append(token)
            if on_token is not None:
                on_token(token)
    finally:
        model.train(was_training)
    return out


# --- loading a model to generate with (shared by `qlora generate`, `chat` and `eval`) ---------
def load_for_inference(model_dir, adapter_dir=None, quant: str = "nf4", device: str = "auto",
                       double_quant: bool = True, ignore_base_name: bool = False):
    """(model, tokenizer) ready to generate: base quantized as `quant` says, adapter attached,
    eval mode, everything on one device. An adapter whose adapter_config.json names another base
    is refused before anything loads, unless `ignore_base_name` (--ignore-base-name)."""
    from pathlib import Path

    from qlora.adapters import check_adapter_base, load_adapter, read_adapter_json
    from qlora.models import load_model, load_tokenizer
    from qlora.quant import QuantConfig

    if not Path(model_dir).is_dir():
        raise QloraError(f"model directory {model_dir} does not exist (--model takes a directory in "
                         "Hugging Face layout: config.json, *.safetensors, tokenizer.json)")
    if adapter_dir is not None:
        read_adapter_json(adapter_dir)  # a bad adapter directory named before the model loads
        check_adapter_base(model_dir, adapter_dir, ignore_base_name)
    dev = pick_device(device)
    qc = QuantConfig(method=quant, double_quant=double_quant, compute_dtype=compute_dtype(dev))
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, qc, device=dev)
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)  # attached on the model's device
        model.requires_grad_(False)
    return model.eval(), tokenizer
