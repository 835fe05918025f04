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

from qlora.models.attention import window_in_effect


@dataclass(frozen=True)
class FlexMask:
    """One layer's mask as flex_attention takes it (a layer_masks entry, shared by the layers of
    one window): the BlockMask over its row's causal order, window and documents."""
    block_mask: object  # torch.nn.attention.flex_attention.BlockMask


def flex_available(device: torch.device) -> bool:
    """Whether the compiled flex_attention can train here: CUDA, and a torch that has it."""
    if device.type != "cuda":
        return False
    try:
        from torch.nn.attention import flex_attention  # noqa: F401  (torch >= 2.5)
    except ImportError:
        return False
    return True


@functools.cache
def softcap_score_mod(cap: float):
    """flex's score_mod for cap · tanh(score / cap) (one function object per cap: compiled code
    is reused for it)."""
    def capped(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / cap) * cap
    return capped


def document_mask_mod(window: int | None, docs: torch.Tensor | None):
    """flex's mask_mod: key at or before the query, within `window` tokens of it (None: any
    distance), in the query's document (`docs` [B, T]: a document number per token; None: one
    document per row)."""
    def allowed(b, h, q_idx, kv_idx):
        ok = kv_idx <= q_idx
        if window is not None:
            ok = ok & (q_idx - kv_idx < window)
        if docs is not None:
            ok = ok & (docs[b, q_idx] == docs[b, kv_idx])
        return ok
    return allowed


def _block_mask(mask_mod, batch: int | None, length: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    # compiled on CUDA: the eager form evaluates the mask at every (query, key) pair in torch
    return create_block_mask(mask_mod, batch, None, length, length, device=device,
                             _compile=device.type == "cuda")


@functools.lru_cache(maxsize=32)
def _causal_mask(length: int, window: int | None, device: torch.device) -> FlexMask:
    """Rows of one document each: the mask depends on the shape alone, so it is made once."""
    return FlexMask(_block_mask(document_mask_mod(window, None), None, length, device))


def flex_layer_masks(layer_windows, position_ids: torch.Tensor, device: torch.device,
                     varlen=None) -> list:
    """Each layer's FlexMask for rows laid out by `position_ids` [B, T] (no KV cache): one per
    distinct window in effect, shared by its layers (as attention.layer_masks shares its masks).
    `varlen`: the documents given as offsets on the device instead (a CUDA graph's Varlen
    buffers, attention.Varlen): read there, with no wait for the GPU."""
    B, T = position_ids.shape
    windows = [window_in_effect(w, T) for w in layer_windows]
    if varlen is not None:
        docs = document_numbers(varlen.cu_seqlens, B, T)
    else:
        packed = T > 1 and bool((position_ids[:, 1:] == 0).any())
        docs = (position_ids.to(device) == 0).cumsum(-1) if packed else None
    masks = {}
    for window in dict.fromkeys(windows):
        if docs is None:
            masks[window] = _causal_mask(T, window, torch.device(device))
        else:  # the documents change with every batch
            masks[window] = FlexMask(_block_mask(document_mask_mod(window, docs), B, T,
                                                 torch.device(device)))
    return [masks[w] for w in windows]


def document_numbers(cu_seqlens: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """[batch, length]: each token's document, from the flattened rows' document offsets
    (flash varlen's cu_seqlens; empty documents, offsets repeated, take no token)."""
    tokens = torch.arange(batch * length, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens, tokens, right=True).view(batch, length)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # flex_attention alone is compiled (its fused kernels exist only through torch.compile); a
    # second row length makes it recompile with dynamic shapes, not once per length
    return torch.compile(flex_attention)


def flex_capped_attention(q, k, v, mask: FlexMask, scale: float, cap: float) -> torch.Tensor:
    """capped_attention(q, k, v, mask, scale, cap) through flex_attention: q [B,H,T,D], k/v
    [B,Hkv,T,D] (kv heads shared, not repeated), `mask` a FlexMask of these rows."""
    from torch.nn.attention.flex_attention import flex_attention

    attend = _compiled_flex() if q.device.type == "cuda" else flex_attention
    return attend(q, k, v, score_mod=softcap_score_mod(float(cap)), block_mask=mask.block_mask,
                  scale=scale, enable_gqa=k.shape[1] != q.shape[1])
