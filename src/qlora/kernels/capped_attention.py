"""Gemma 2's soft-capped attention without its [heads, T, T] scores: torch's flex_attention.

The reference is models/families/gemma.capped_attention: scores = q·kᵀ · scale, capped
(cap · tanh(s / cap)), masked, softmax, times v, all in torch, so the scores exist whole and
autograd keeps them three times (0.5 GiB a layer for Gemma-2-9B at 2048 tokens). flash attention
has no soft-cap; flex_attention takes one as its `score_mod` and computes the same attention
tile by tile, the scores in fp32 registers only, and keeps for backward what flash does: q, k, v,
the output and a log-sum-exp per query and head (O(T)). Its mask is a block mask: causal, the
layer's sliding window, and the row's documents (position_ids restarting at 0), as
models/attention.attention_mask builds it densely.

On CUDA flex_attention runs compiled (torch.compile of flex_attention alone: Triton kernels for
forward and backward); elsewhere its eager form, which computes the dense scores and, in torch
2.13, has no backward on the CPU: the CPU tests compare forwards only.

Where the two differ: the reference rounds the scores to q's dtype before the cap (transformers'
eager order); flex caps the fp32 scores. In bf16 that is one bf16 rounding of a score less.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from qlora.models.attention import cuda_attention_available, window_in_effect


@dataclass(frozen=True)
class FlexMask:
    """One layer's mask as flex_attention takes it (a layer_masks entry, shared by the layers of
    one window): the BlockMask over its row's causal order, window and documents, made for rows
    of `length` tokens (flex_length of the real rows': flex_capped_attention pads up to it)."""
    block_mask: object  # torch.nn.attention.flex_attention.BlockMask
    length: int


def flex_length(tokens: int) -> int:
    """The row length flex runs at: a power of two, at least 128 (its block size). Compiled flex
    is specialized to one row length (see _compiled_flex), so rows of any length share a few
    compilations. The padding is after every real token: causal, no real query sees it, and its
    blocks are skipped by the block mask; only the padded queries' own blocks are extra work."""
    return max(128, 1 << (tokens - 1).bit_length())


def flex_available(device: torch.device) -> bool:
    """Whether the compiled flex_attention can train here: CUDA, and a torch that has it."""
    return cuda_attention_available(device, "flex_attention")  # torch >= 2.5


@functools.cache
def softcap_score_mod(cap: float):
    """flex's score_mod for cap · tanh(score / cap) (one function object per cap: compiled code
    is reused for it)."""
    def capped(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / cap) * cap
    return capped


def document_mask_mod(window: torch.Tensor, docs: torch.Tensor):
    """flex's mask_mod: key at or before the query, fewer than `window` tokens before it (a 0-d
    integer tensor; the row's length for no window), in the query's document (`docs` [B, T]: a
    document number per token, all 0 for one document per row).

    One code object closing over tensors only, for every layer and batch: compiled flex guards on
    a closure's Python values (a window as an int, a docs-or-none branch) and recompiles for each
    combination. Tensors are guarded by their shapes only, so a model compiles flex once per row
    shape, whatever its layers' windows and its batches' documents."""
    def allowed(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window) & (docs[b, q_idx] == docs[b, kv_idx])
    return allowed


def _block_mask(window: int | None, docs: torch.Tensor) -> FlexMask:
    from torch.nn.attention.flex_attention import create_block_mask

    batch, length = docs.shape
    # a fill, not a copy from the host: this runs inside a CUDA graph's capture too
    limit = torch.full((), length if window is None else window, device=docs.device)
    # compiled on CUDA: the eager form evaluates the mask at every (query, key) pair in torch
    return FlexMask(create_block_mask(document_mask_mod(limit, docs), batch, None, length, length,
                                      device=docs.device, _compile=docs.device.type == "cuda"),
                    length)


@functools.lru_cache(maxsize=32)
def _causal_mask(batch: int, length: int, window: int | None, device: torch.device) -> FlexMask:
    """Rows of one document each: the mask depends on the shape alone, so it is made once."""
    return _block_mask(window, torch.zeros(batch, length, dtype=torch.int64, device=device))


def flex_layer_masks(layer_windows, position_ids: torch.Tensor, device: torch.device,
                     varlen=None) -> list:
    """Each layer's FlexMask for rows laid out by `position_ids` [B, T] (no KV cache): one per
    distinct window in effect, shared by its layers (as attention.layer_masks shares its masks).
    `varlen`: the documents given as offsets on the device instead (a CUDA graph's Varlen
    buffers, attention.Varlen): read there, with no wait for the GPU."""
    B, T = position_ids.shape
    windows = [window_in_effect(w, T) for w in layer_windows]
    if varlen is not None and varlen.keys is not None:
        # unreachable from training: packs_with_varlen is False where flex masks run, so
        # preference pairs are padded there; a direct caller gets told
        raise ValueError("flex_attention's block masks take documents of their own tokens, not a "
                         "shared prompt's gathered keys: give this model padded preference "
                         "batches (preference_batch(..., packed=False))")
    if varlen is not None:
        docs = document_numbers(varlen.cu_seqlens, B, T)
    else:
        packed = T > 1 and bool((position_ids[:, 1:] == 0).any())
        docs = (position_ids.to(device) == 0).cumsum(-1) if packed else None
    length = flex_length(T)
    if docs is not None:  # the padding joins the last document: it comes after every real query
        docs = docs.to(torch.int64)
        docs = torch.cat([docs, docs[:, -1:].expand(B, length - T)], dim=1)
    masks = {}
    for window in dict.fromkeys(windows):
        if docs is None:
            masks[window] = _causal_mask(B, length, window, torch.device(device))
        else:  # the documents change with every batch
            masks[window] = _block_mask(window, docs)
    return [masks[w] for w in windows]


def document_numbers(cu_seqlens: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """[batch, length]: each token's document, from the flattened rows' document offsets
    (flash varlen's cu_seqlens; empty documents, offsets repeated, take no token)."""
    tokens = torch.arange(batch * length, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens, tokens, right=True).view(batch, length)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # flex_attention alone is compiled (its fused kernels exist only through torch.compile), once
    # per row shape: with dynamic shapes (torch's default from a second shape on) its graph breaks
    # and the rest fails inside flex's autograd ("all unwrapped values must be FakeTensor", seen
    # on an H100, torch 2.11, two models in one process). Rows are padded to a few lengths
    # (flex_length), but a model's training and evaluation shapes together could pass dynamo's
    # default of 8 compiles per function, past which flex would run its eager form (the dense
    # scores): the limit is raised for the process.
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, limit, max(getattr(config, limit), 64))
    return torch.compile(flex_attention, dynamic=False)


def flex_capped_attention(q, k, v, mask: FlexMask, scale: float, cap: float) -> torch.Tensor:
    """capped_attention(q, k, v, mask, scale, cap) through flex_attention: q [B,H,T,D], k/v
    [B,Hkv,T,D] (kv heads shared, not repeated), `mask` a FlexMask of these rows."""
    from torch.nn.attention.flex_attention import flex_attention

    attend = _compiled_flex() if q.device.type == "cuda" else flex_attention
    T = q.shape[2]
    if mask.length > T:  # zeros after the real tokens (flex_length), cut off again below
        q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, mask.length - T)) for t in (q, k, v))
    out = attend(q, k, v, score_mod=softcap_score_mod(float(cap)), block_mask=mask.block_mask,
                 scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    return out[:, :, :T]
