"""Phi-3's blocks (Phi-3, Phi-3.5, Phi-4): where its math or its layers differ from the
reference decoder's (models/decoder.py), as transformers' modeling_phi3.py computes them.

- Phi3Attention: q, k and v are one linear, `qkv_proj` (out: (heads + 2 kv_heads) · head_dim, no
  bias), split in that order; RoPE rotates the first `rotary_dim` of each head (partial rotary)
  and passes the rest through. The rest is the reference attention (cache, GQA, windows).
- Phi3MLP: gate and up are one linear, `gate_up_proj` (out: 2 · intermediate), chunked into gate
  then up: down(up · silu(gate)).
- Phi3Rotary: cos/sin of `rotary_dim` only; LongRoPE divides each frequency by its short or long
  factor, the long ones in a forward whose largest position + 1 exceeds
  original_max_position_embeddings (transformers' rule, over the whole batch, for training rows
  and for each generation step alike), and scales cos/sin by the attention factor. Generation
  also drops its cache as transformers' does, once, where the sequence first exceeds the original
  context (Phi3LM.cache_outdated, read by infer.stream).
- The norms are the reference RMSNorm (Phi3RMSNorm is Llama's math) and the layer is the
  reference's (residual dropout is 0 in every released config and off in eval).

Module and parameter names are transformers' (model.layers.N.self_attn.qkv_proj,
...mlp.gate_up_proj), so checkpoints load by name and adapters saved are PEFT's.

Why here and not in phi3.py: that module is imported wherever a spec is read, and these blocks
build on models/decoder.py, which reads specs (an import cycle). models/load.py's OWN_DECODERS
builds a Phi3LM for model_type phi3.

The speed layer (speed/fast_decoder.py): the norms are the reference RMSNorm, so FastRMSNorm
(the Triton RMSNorm) applies as it is; Phi3LM and Phi3DecoderLayer get forks that add
FastDecoderLM's and FastDecoderLayer's paths (checkpointing through CheckpointedLayer, host
embedding, fused cross-entropy); FastPhi3Attention runs qkv_proj as a group of one on the 4-bit
fast base, RoPE in the Triton kernel where the rotary is full (the kernel rotates whole heads; a
partial rotary_dim stays torch) and keeps attention for the rerun; FastPhi3MLP runs SwiGLU in
the packed Triton kernel over gate_up_proj's output (gate, then up, as the kernel reads it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qlora.models.attention import Attention, apply_rope
from qlora.models.decoder import Backbone, DecoderLayer, DecoderLM
from qlora.models.families import phi3
from qlora.models.spec import ArchSpec


def rope_settings(spec: ArchSpec) -> phi3.Phi3Rope:
    return phi3.rope_settings(spec.raw)


class Phi3Attention(Attention):
    """The reference attention with q, k, v from one fused linear and RoPE on `rotary_dim`."""

    def __init__(self, spec: ArchSpec, layer_index: int):
        nn.Module.__init__(self)  # not Attention's: its q/k/v_proj are not this block's
        h, hd = spec.hidden_size, spec.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, hd
        self.layer_index = layer_index
        self.rotary_dim = rope_settings(spec).rotary_dim
        self.qkv_proj = nn.Linear(h, (spec.num_heads + 2 * spec.num_kv_heads) * hd, bias=False)
        self.o_proj = nn.Linear(spec.num_heads * hd, h, bias=False)

    def forward(self, x, cos, sin, mask, cache=None):
        B, T, _ = x.shape
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split((q_size, kv_size, kv_size), dim=-1)
        y = self.attend(q.view(B, T, self.num_heads, self.head_dim),
                        k.view(B, T, self.num_kv_heads, self.head_dim),
                        v.view(B, T, self.num_kv_heads, self.head_dim), cos, sin, mask, cache)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def rope(self, x, cos, sin) -> torch.Tensor:
        """cos/sin span rotary_dim: the head's first rotary_dim are rotated, the rest kept."""
        if self.rotary_dim == self.head_dim:
            return apply_rope(x, cos, sin)
        rotated, kept = x[..., :self.rotary_dim], x[..., self.rotary_dim:]
        return torch.cat((apply_rope(rotated, cos, sin), kept), dim=-1)


class Phi3MLP(nn.Module):
    """down(up · silu(gate)), gate and up the two halves of one linear's output."""

    def __init__(self, spec: ArchSpec):
        super().__init__()
        h, i = spec.hidden_size, spec.intermediate_size
        self.gate_up_proj = nn.Linear(h, 2 * i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


class Phi3DecoderLayer(DecoderLayer):
    """The reference layer (norms, residuals, forward) around Phi-3's attention and MLP."""

    def __init__(self, spec: ArchSpec, layer_index: int):
        super().__init__(spec, layer_index, Phi3Attention(spec, layer_index), Phi3MLP(spec))


class Phi3Rotary(nn.Module):
    """cos/sin [B, T, rotary_dim] at the given positions, LongRoPE's factors chosen per forward."""

    def __init__(self, spec: ArchSpec):
        super().__init__()
        rope = rope_settings(spec)
        exponents = torch.arange(0, rope.rotary_dim, 2, dtype=torch.int64).float() / rope.rotary_dim
        base = rope.theta ** exponents
        short = 1.0 if rope.short_factor is None else torch.tensor(rope.short_factor)
        self.register_buffer("inv_freq", 1.0 / (short * base), persistent=False)
        self.longrope = rope.long_factor is not None
        if self.longrope:
            long_inv = 1.0 / (torch.tensor(rope.long_factor) * base)
            self.register_buffer("long_inv_freq", long_inv, persistent=False)
        self.original_max_positions = rope.original_max_positions
        self.attention_scaling = rope.attention_factor

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        inv_freq = self.inv_freq
        if self.longrope:
            # chosen on the device (no wait for it): the long factors once any position of the
            # batch reaches the original context, as transformers' longrope update does
            longer = position_ids.max() + 1 > self.original_max_positions
            inv_freq = torch.where(longer, self.long_inv_freq, self.inv_freq)
        freqs = position_ids[:, :, None].float() * inv_freq.float()[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(dtype)
        sin = (emb.sin() * self.attention_scaling).to(dtype)
        return cos, sin


class Phi3Backbone(Backbone):
    layer_class = Phi3DecoderLayer
    rotary_class = Phi3Rotary


class Phi3LM(DecoderLM):
    """The reference causal LM over Phi-3's backbone."""

    backbone_class = Phi3Backbone

    def cache_outdated(self, cached: int, length: int) -> bool:
        """Whether generation must drop its KV cache and run the whole `length` tokens again:
        transformers' Phi-3 does so once, when the sequence first exceeds the original context
        while the cache holds no more than it (LongRoPE's long factors then rotate every key)."""
        original = int(self.spec.raw.get("original_max_position_embeddings", 4096))
        return length >= original + 1 and 0 < cached <= original
