"""Attention of the reference decoder: rotary embeddings, the KV cache, the attention module
and the attention kernels it calls (SDPA; flash attention over packed documents on the GPU).

Plain torch. The fast path's attention (speed/fast_decoder.py) is a subclass of `Attention`
that groups q/k/v into one GEMM, runs RoPE in a Triton kernel and can keep its graph for the
checkpoint's rerun; the math here is what it must equal.
"""

from __future__ import annotations

import functools
import importlib

import torch
import torch.nn.functional as F
from torch import nn

from qlora.models.norm import RMSNorm
from qlora.models.spec import ArchSpec, rope_inverse_frequencies


class Rotary(nn.Module):
    """cos/sin tables for rotary position embeddings at given position ids."""

    def __init__(self, spec: ArchSpec):
        super().__init__()
        inv_freq, self.attention_scaling = rope_inverse_frequencies(spec)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        freqs = position_ids[:, :, None].float() * self.inv_freq.float()[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(dtype)
        sin = (emb.sin() * self.attention_scaling).to(dtype)
        return cos, sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, hd]; cos/sin [B, T, hd]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Keys and values of the tokens seen so far, preallocated to `max_len` per layer."""

    def __init__(self, spec: ArchSpec, batch: int, max_len: int, device, dtype):
        shape = (batch, spec.num_kv_heads, max_len, spec.head_dim)
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(spec.num_layers)]
        self.values = [torch.empty(shape, device=device, dtype=dtype) for _ in range(spec.num_layers)]
        self.length = 0  # tokens stored, the same for every layer once a forward pass completes
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {end} needed")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class Attention(nn.Module):
    """q/k/v/o projections with Hugging Face's names, RoPE, optional q/k RMSNorm, GQA."""

    def __init__(self, spec: ArchSpec, layer_index: int):
        super().__init__()

        h, hd = spec.hidden_size, spec.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, hd
        self.layer_index = layer_index
        self.q_proj = nn.Linear(h, spec.num_heads * hd, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(h, spec.num_kv_heads * hd, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(h, spec.num_kv_heads * hd, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(spec.num_heads * hd, h, bias=spec.o_bias)
        if spec.qk_norm:
            self.q_norm = RMSNorm(hd, spec.rms_norm_eps)
            self.k_norm = RMSNorm(hd, spec.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        y = self.attend(q, k, v, cos, sin, mask, cache)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def attend(self, q, k, v, cos, sin, mask, cache: KVCache | None = None) -> torch.Tensor:
        """q [B, T, heads, hd], k/v [B, T, kv_heads, hd] as the projections made them: norms,
        RoPE, cache, attention. Returns [B, heads, T, hd]."""
        v = v.transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q = self.rope(q.transpose(1, 2), cos, sin)
        k = self.rope(k.transpose(1, 2), cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)
        return self.sdpa(q, k, v, mask)

    def rope(self, x, cos, sin) -> torch.Tensor:
        return apply_rope(x, cos, sin)

    def sdpa(self, q, k, v, mask) -> torch.Tensor:
        # the module-level sdpa; a family whose scores differ (Gemma's) overrides this method
        return sdpa(q, k, v, mask)


def sdpa(q, k, v, mask, scale: float | None = None):
    """Attention over q [B,H,T,D], k/v [B,Hkv,S,D].

    `mask` is "causal", None (attend to all), a bool tensor [B,1,T,S], or a Varlen plan for
    packed rows on the GPU (flash attention over each document, no padding, no mask).
    `scale` multiplies the scores: None is D ** -0.5 (Gemma's is its own).
    """
    if isinstance(mask, Varlen):
        return varlen_attention(q, k, v, mask, scale)
    gqa = {}
    if k.shape[1] != q.shape[1]:  # grouped-query attention: share each kv head across a group
        if sdpa_takes_gqa():
            gqa = {"enable_gqa": True}  # no copies of k and v
        else:
            repeat = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
    if isinstance(mask, str):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, **gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **gqa)


@functools.cache
def sdpa_takes_gqa() -> bool:
    """torch >= 2.5 shares kv heads inside scaled_dot_product_attention."""
    import inspect

    try:
        return "enable_gqa" in inspect.signature(F.scaled_dot_product_attention).parameters
    except (TypeError, ValueError):  # a builtin without a signature: ask the docstring
        return "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


class GatheredKeys:
    """Documents whose keys are not their own queries' tokens: each document's keys are the
    tokens `index[cu_seqlens[d]:cu_seqlens[d+1]]` of the flattened batch, in order, and its
    queries are the last of them (flash attention aligns a causal mask to the bottom right).

    A preference pair packed with its prompt once (data/preference.shared_prompt_batch): the
    prompt + chosen completion is a document of its own keys, and the rejected completion a
    document whose keys are the prompt's tokens, then its own. `max_len`: the longest key list."""

    def __init__(self, index: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int):
        self.index, self.cu_seqlens, self.max_len = index, cu_seqlens, max_len


class Varlen:
    """Document offsets of packed rows, flattened over the batch: flash attention's cu_seqlens;
    `window`: a layer's sliding window (None: each token sees its whole document so far);
    `keys`: where documents take their keys from elsewhere than their own tokens (GatheredKeys;
    None: each document attends to its own tokens)."""

    def __init__(self, cu_seqlens: torch.Tensor, max_len: int, window: int | None = None,
                 keys: GatheredKeys | None = None):
        self.cu_seqlens, self.max_len, self.window, self.keys = cu_seqlens, max_len, window, keys

    def with_window(self, window: int | None) -> "Varlen":
        """The same documents for a layer of another window (the offsets are shared)."""
        return Varlen(self.cu_seqlens, self.max_len, window, self.keys)

    def to(self, device) -> "Varlen":
        """This plan with its tensors on `device` (made on the host with the batch)."""
        keys = self.keys and GatheredKeys(self.keys.index.to(device, non_blocking=True),
                                          self.keys.cu_seqlens.to(device, non_blocking=True),
                                          self.keys.max_len)
        return Varlen(self.cu_seqlens.to(device, non_blocking=True), self.max_len, self.window,
                      keys)

    def key_layout(self) -> tuple[torch.Tensor | None, torch.Tensor, int]:
        """(the gather index or None, the keys' offsets, the longest key list)."""
        if self.keys is None:
            return None, self.cu_seqlens, self.max_len
        return self.keys.index, self.keys.cu_seqlens, self.keys.max_len


def cuda_attention_available(device: torch.device, module: str) -> bool:
    """Whether `device` is a CUDA GPU and this torch has torch.nn.attention.`module`."""
    if device.type != "cuda":
        return False
    try:
        importlib.import_module(f"torch.nn.attention.{module}")
    except ImportError:
        return False
    return True


def varlen_available(device: torch.device) -> bool:
    return cuda_attention_available(device, "varlen")  # torch >= 2.9


def varlen_plan(position_ids: torch.Tensor, device: torch.device,
                window: int | None = None) -> Varlen:
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    ends = torch.cat([starts, starts.new_tensor([flat.numel()])])
    max_len = int((ends[1:] - ends[:-1]).max())
    return Varlen(ends.to(torch.int32).to(device, non_blocking=True), max_len, window)


@functools.cache
def varlen_takes_window() -> bool:
    """The first releases of torch's varlen attention are causal or not (is_causal); later ones
    (2.11+cu130 on the GPU machine) take a (left, right) window instead, a sliding one included."""
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    return "window_size" in inspect.signature(varlen_attn).parameters


def _varlen_causal_kwargs(window: int | None) -> dict:
    if not varlen_takes_window():
        if window is not None:
            raise ValueError("this torch's varlen attention has no sliding window")
        return {"is_causal": True}
    # flash's window (left, right) spans keys i-left..i+right; ours the last `window` tokens
    return {"window_size": (-1 if window is None else window - 1, 0)}


@functools.cache
def _varlen_takes_gqa() -> bool:
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    return "enable_gqa" in inspect.signature(varlen_attn).parameters


def varlen_attention(q, k, v, plan: Varlen, scale: float | None = None) -> torch.Tensor:
    B, H, T, D = q.shape
    q, k, v = (t.transpose(1, 2).reshape(B * T, t.shape[1], D) for t in (q, k, v))
    index, cu_keys, max_keys = plan.key_layout()
    if index is not None:  # a shared prompt's keys, copied to each document that reads them
        k, v = k.index_select(0, index), v.index_select(0, index)
    if not varlen_available(q.device):  # the plain torch math the kernel must equal (the CPU's)
        out = varlen_reference(q, k, v, plan.cu_seqlens, cu_keys, plan.window, scale)
    else:
        out = _flash_varlen(q, k, v, plan, cu_keys, max_keys, scale)
    return out.reshape(B, T, H, D).transpose(1, 2)


def _flash_varlen(q, k, v, plan: Varlen, cu_keys, max_keys: int, scale: float | None):
    from torch.nn.attention.varlen import varlen_attn

    kwargs = _varlen_causal_kwargs(plan.window)
    if scale is not None:
        kwargs["scale"] = scale
    # Grouped kv heads go to the kernel as they are: flash's varlen kernel shares each kv head
    # across its group of query heads itself, and torch's varlen_attn hands k and v to it
    # unchanged (from 2.13 it asks for enable_gqa first; 2.11 has no such argument). Copied to
    # every head instead, k and v were what attention saved and keep_attention kept, (heads / kv
    # heads)x their bytes: 1.09 GiB more at Qwen2.5-1.5B over 8,192 packed tokens (H100, torch 2.11).
    if k.shape[1] != q.shape[1] and _varlen_takes_gqa():
        kwargs["enable_gqa"] = True
    return varlen_attn(q, k, v, plan.cu_seqlens, cu_keys, plan.max_len, max_keys, **kwargs)


def varlen_reference(q, k, v, cu_queries, cu_keys, window: int | None = None,
                     scale: float | None = None) -> torch.Tensor:
    """varlen_attn's result in plain torch, a document at a time: q [Tq, H, D], k/v [Tk, Hkv, D]
    flattened; document d's queries cu_queries[d]:cu_queries[d+1] attend causally to its keys
    cu_keys[d]:cu_keys[d+1], the last query aligned with the last key (flash's bottom-right
    alignment), within `window` tokens where one is given."""
    out = torch.zeros_like(q)
    starts_q, starts_k = cu_queries.tolist(), cu_keys.tolist()
    for d in range(len(starts_q) - 1):
        q0, q1, k0, k1 = starts_q[d], starts_q[d + 1], starts_k[d], starts_k[d + 1]
        if q1 == q0:
            continue
        q_pos = torch.arange(q1 - q0, device=q.device) + (k1 - k0) - (q1 - q0)
        k_pos = torch.arange(k1 - k0, device=q.device)
        mask = k_pos[None, :] <= q_pos[:, None]
        if window is not None:
            mask = mask & (q_pos[:, None] - k_pos[None, :] < window)
        one = sdpa(q[q0:q1].transpose(0, 1)[None], k[k0:k1].transpose(0, 1)[None],
                   v[k0:k1].transpose(0, 1)[None], mask[None, None], scale)
        out[q0:q1] = one[0].transpose(0, 1)
    return out


def window_in_effect(window: int | None, length: int) -> int | None:
    """`window`, or None where it hides nothing: no token has more than `length` tokens to see."""
    return window if window is not None and length > window else None


def layer_masks(layer_windows, position_ids: torch.Tensor, past: int,
                device: torch.device | None = None, varlen: Varlen | None = None,
                dense: bool = False) -> list:
    """Each layer's mask (attention_mask's), built once per distinct window in effect and shared
    by the layers of that window; packed rows' document offsets are read once for all windows.
    `varlen`: the offsets given instead (a CUDA graph's buffers). Where the varlen kernel cannot
    take a window, that window's layers get attention_mask's dense mask (gathered_keys_mask's,
    where the plan gathers keys). `dense`: bool masks
    only, never a Varlen plan (attention computed in torch over a mask: Gemma 2's capped scores)."""
    length = past + position_ids.shape[1] if varlen is None else max(varlen.max_len,
                                                                      varlen.key_layout()[2])
    windows = [window_in_effect(w, length) for w in layer_windows]
    masks: dict = {}
    for window in dict.fromkeys(windows):
        offsets = next((m for m in masks.values() if isinstance(m, Varlen)), varlen)
        if offsets is not None and (window is None or varlen_takes_window()):
            masks[window] = offsets.with_window(window)
        elif varlen is not None and varlen.keys is not None:  # no positions can say its keys
            masks[window] = gathered_keys_mask(varlen, *position_ids.shape, window)
        else:
            masks[window] = attention_mask(position_ids, past, window, device, dense)
    return [masks[w] for w in windows]


def gathered_keys_mask(plan: Varlen, rows: int, length: int, window: int | None
                       ) -> torch.Tensor:
    """The bool mask [rows, 1, length, length] over the rows' own tokens that shows each query
    what `plan`'s gathered keys show it (varlen_reference's bottom-right causal rule, within
    `window`): for a varlen kernel that takes no window. Every gathered key is a token of the
    rows, at its own position, so the mask gives the same attention. Made where the plan is,
    without reading it on the host."""
    index, cu_keys, cu_queries = plan.keys.index, plan.keys.cu_seqlens, plan.cu_seqlens
    queries = torch.arange(rows * length, device=index.device, dtype=cu_queries.dtype)
    slots = torch.arange(index.numel(), device=index.device, dtype=cu_keys.dtype)
    # each one's document (an empty one, offsets repeated, holds none) and its place counted
    # back from the document's end, where flash aligns queries and keys
    q_doc = torch.searchsorted(cu_queries, queries, right=True) - 1
    k_doc = torch.searchsorted(cu_keys, slots, right=True) - 1
    q_back = (queries - cu_queries[q_doc + 1])[:, None]
    k_back = (slots - cu_keys[k_doc + 1])[None, :]
    sees = (q_doc[:, None] == k_doc[None, :]) & (k_back <= q_back)
    if window is not None:
        sees &= q_back - k_back < window
    # onto the keys' own tokens, counting: a staged row's padding document repeats one filler
    # token as a key hundreds of times (train/graphs.stage_gathered_keys), which a uint8 count
    # wrapped to 0 at 256, hiding every key from a padding query
    flat = torch.zeros(rows * length, rows * length, dtype=torch.int32, device=index.device)
    flat.index_add_(1, index, sees.to(torch.int32))
    blocks = flat.bool().view(rows, length, rows, length).diagonal(dim1=0, dim2=2)
    return blocks.permute(2, 0, 1)[:, None]


def attention_mask(position_ids: torch.Tensor, past: int, sliding_window: int | None,
                   device: torch.device | None = None, dense: bool = False):
    """"causal" for one document per row, else a bool mask [B, 1, T, past+T] or a Varlen plan,
    on `device` (default: that of position_ids, where the layout is read). `sliding_window`:
    one layer's window (spec.layer_windows), None for full attention.

    Packed rows hold several documents; a document starts where position_ids restarts at 0,
    and each token may only attend to earlier tokens of its own document.
    """
    device = position_ids.device if device is None else torch.device(device)
    B, T = position_ids.shape
    packed = T > 1 and bool((position_ids[:, 1:] == 0).any())
    window = window_in_effect(sliding_window, past + T)
    if past == 0 and not packed and window is None:
        return "causal"
    if T == 1 and window is None:
        return None
    if packed and past == 0 and not dense and varlen_available(device) and (
            window is None or varlen_takes_window()):
        return varlen_plan(position_ids, device, window)
    q_pos = torch.arange(past, past + T, device=device)
    k_pos = torch.arange(past + T, device=device)
    mask = (k_pos[None, :] <= q_pos[:, None]).expand(B, T, past + T)
    if packed:
        if past:
            raise ValueError("a KV cache cannot be combined with packed rows")
        # read here only: a CUDA graph's causal rows (a CPU layout) copy nothing in its capture
        doc = (position_ids.to(device) == 0).cumsum(-1)
        mask = mask & (doc[:, :, None] == doc[:, None, :])
    if window is not None:
        mask = mask & (q_pos[:, None] - k_pos[None, :] < window)
    return mask[:, None]
