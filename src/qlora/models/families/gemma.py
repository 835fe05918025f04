"""Gemma 2 and Gemma 3 (text): the blocks whose math is not the reference decoder's.

What differs from models/decoder.py, as transformers' modeling_gemma2.py / modeling_gemma3.py
compute it (gemma_config.py reads the settings from config.json):
- the input embedding is multiplied by sqrt(hidden_size), rounded to the compute dtype first;
- RMSNorm scales by (1 + weight) (the checkpoints store the offset from 1) and rounds once,
  after the scale, where Llama's rounds before it (GemmaRMSNorm);
- each block normalizes before and after attention and before and after the MLP (four norms);
- the MLP is GeGLU: gelu(gate, tanh approximation) · up (GemmaMLP);
- attention scores are scaled by query_pre_attn_scalar ** -0.5, soft-capped (Gemma 2:
  cap · tanh(scores / cap)) and masked to each layer's window: sliding and full layers alternate
  (GemmaAttention); Gemma 3 normalizes q and k per head and rotates its sliding layers with a
  RoPE base of their own (GemmaRotary);
- the output logits are soft-capped (final_logit_softcapping) before the loss as well.

Each layer's window is spec.layer_windows' (one entry per layer, None: full attention, read from
layer_types as transformers reads it, through gemma_config). GemmaLM gives each layer its mask
(attention.layer_masks: one per distinct window, packed rows and the KV cache included) and the
RoPE tables of its window; on the GPU a packed row is flash varlen attention for Gemma 3 (with its
scale), a bool mask for Gemma 2's capped scores, which run in torch (capped_attention: the
[heads, T, T] scores exist, and attention's backward keeps them).

Module and parameter names are transformers' (model.layers.N.self_attn.q_proj,
...pre_feedforward_layernorm, ...), so checkpoints load by name and adapters saved are PEFT's.

Why here and not in gemma2.py / gemma3.py: those are imported wherever a spec is read, and these
blocks build on models/decoder.py, which reads specs (an import cycle). models/load.py's
OWN_DECODERS builds a GemmaLM for their model types.

The speed layer (speed/fast_decoder.py) gives Gemma its own forks, built on the reference's:
- FastGemmaAttention: q/k/v as one grouped 4-bit GEMM, RoPE by the Triton kernel (the same
  rotation) and attention kept for the checkpoint's rerun (keep_attention), around Gemma's scores;
  Gemma 2's capped scores through flex_attention on CUDA with fused_kernels
  (kernels/capped_attention.py: no [heads, T, T] scores, O(T) kept), never kept dense;
- FastGemmaMLP: gate/up as one grouped GEMM; GeGLU stays torch (the fused kernel is SwiGLU);
- FastGemmaLM: layers checkpointed as FastDecoderLM checkpoints them, the embedding gathered
  from host memory where the plan moves it there, the flex masks; the fused cross-entropy with
  the final soft-cap applied inside it (kernels/cross_entropy.py);
- the 4-bit fast base path of every LoRA layer (kernels/matmul_4bit.py), as for any family.
- FastGemmaRMSNorm: the (1 + w) norm (and Gemma 3's q/k norms) in the RMSNorm kernel's Gemma form
  (kernels/fused.gemma_rms_norm: fp32 throughout, rounded once, as here).
CUDA graphs (train/graphs.py): Gemma 3 through flash varlen attention with its scale and each
layer's window; Gemma 2 only on the fast path, whose flex_attention takes the graph's document
offsets (GemmaLM.cuda_graphs_refused says so for the reference).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from qlora.errors import QloraError
from qlora.models.attention import Attention, Rotary, layer_masks, sdpa
from qlora.models.decoder import IGNORE_INDEX, MLP, DecoderLM
from qlora.models.families import FAMILIES
from qlora.models.families.gemma_config import GemmaSettings
from qlora.models.spec import ArchSpec
from qlora.models.tiling import run_mlp


def gemma_settings(spec: ArchSpec) -> GemmaSettings:
    return FAMILIES[spec.model_type].settings(spec.raw)


def soft_cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap · tanh(x / cap): x bounded to (-cap, cap), nearly unchanged where small."""
    if cap is None:
        return x
    return torch.tanh(x / cap) * cap


class GemmaRMSNorm(nn.Module):
    """x / rms(x) · (1 + weight), in fp32, rounded to x's dtype once at the end."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))  # 0: the identity scale
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


class GemmaMLP(MLP):
    """GeGLU: down(gelu_tanh(gate(x)) · up(x)); the reference MLP's linears, another activation."""

    def forward(self, x):
        hidden = geglu(self.gate_proj(x), self.up_proj(x))
        return self.down_proj(hidden)


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.gelu(gate, approximate="tanh") * up


class GemmaAttention(Attention):
    """The reference attention (projections, q/k norms, RoPE, cache) with Gemma's scores: scaled
    by query_pre_attn_scalar ** -0.5 and, in Gemma 2, soft-capped. `window`: this layer's
    attention window (None: full attention), the key of its mask and RoPE tables."""

    def __init__(self, spec: ArchSpec, layer_index: int, settings: GemmaSettings):
        super().__init__(spec, layer_index)
        if spec.qk_norm:  # Gemma 3: q and k normed per head, as the other norms are
            self.q_norm = GemmaRMSNorm(spec.head_dim, spec.rms_norm_eps)
            self.k_norm = GemmaRMSNorm(spec.head_dim, spec.rms_norm_eps)
        self.window = spec.layer_windows[layer_index]
        self.scale = settings.query_scale
        self.softcap = settings.attn_softcap

    def sdpa(self, q, k, v, mask) -> torch.Tensor:
        if self.softcap is None:
            return sdpa(q, k, v, mask, self.scale)
        return capped_attention(q, k, v, mask, self.scale, self.softcap)


def capped_attention(q, k, v, mask, scale: float, cap: float) -> torch.Tensor:
    """Attention with soft-capped scores, which no fused kernel computes: scores in q's dtype,
    capped, masked, softmax in fp32 rounded back to q's dtype (transformers' eager order).
    q [B,H,T,D], k/v [B,Hkv,S,D]; `mask` "causal", None or a bool [B,1,T,S]."""
    if k.shape[1] != q.shape[1]:
        repeat = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(repeat, dim=1)
        v = v.repeat_interleave(repeat, dim=1)
    scores = soft_cap(torch.matmul(q, k.transpose(2, 3)) * scale, cap)
    if isinstance(mask, str):  # "causal" without a cache: T == S
        T = q.shape[2]
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


class GemmaDecoderLayer(nn.Module):
    """Norms before and after attention and the MLP, each normed output added to the residual."""

    def __init__(self, spec: ArchSpec, layer_index: int, settings: GemmaSettings):
        super().__init__()
        h, eps = spec.hidden_size, spec.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(h, eps)
        self.self_attn = GemmaAttention(spec, layer_index, settings)
        self.post_attention_layernorm = GemmaRMSNorm(h, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(h, eps)
        self.mlp = GemmaMLP(spec)
        self.post_feedforward_layernorm = GemmaRMSNorm(h, eps)

    def forward(self, x, cos, sin, mask, cache=None):
        """cos, sin: dicts by attention window (GemmaRotary makes one entry per window of the
        model); the layer takes its attention's. `mask`: this layer's, as in the reference. The
        decoder's run_layers passes them on as it passes the reference's, checkpointed or not."""
        w = self.self_attn.window
        attended = self.self_attn(self.input_layernorm(x), cos[w], sin[w], mask, cache)
        return self.feed_forward(x + self.post_attention_layernorm(attended))

    def feed_forward(self, x):
        # the post-norm saves the MLP's output: a rerun must compute it (no skip)
        return x + self.post_feedforward_layernorm(run_mlp(self.mlp, self.pre_feedforward_layernorm(x)))


class GemmaRotary(nn.Module):
    """RoPE tables by attention window: Gemma 3's sliding layers rotate with their own base
    (plain RoPE), its full layers with rope_theta and its scaling; Gemma 2's layers all alike."""

    def __init__(self, spec: ArchSpec):
        super().__init__()
        settings = gemma_settings(spec)
        self.windows = tuple(dict.fromkeys(spec.layer_windows))
        self.full = Rotary(spec)
        self.local = None
        if settings.local_rope_theta is not None:
            self.local = Rotary(replace(spec, rope_theta=settings.local_rope_theta,
                                        rope_scaling=None))

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        full = self.full(position_ids, dtype)
        local = full if self.local is None else self.local(position_ids, dtype)
        tables = {w: full if w is None else local for w in self.windows}
        return {w: t[0] for w, t in tables.items()}, {w: t[1] for w, t in tables.items()}


class GemmaBackbone(nn.Module):
    def __init__(self, spec: ArchSpec):
        super().__init__()
        settings = gemma_settings(spec)
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(GemmaDecoderLayer(spec, i, settings)
                                    for i in range(spec.num_layers))
        self.norm = GemmaRMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.rotary_emb = GemmaRotary(spec)


class GemmaLM(DecoderLM):
    """The reference causal LM with Gemma's backbone, embedding scale, per-window masks and
    soft-capped logits (in `forward`'s logits and in the loss alike)."""

    backbone_class = GemmaBackbone

    def __init__(self, spec: ArchSpec):
        super().__init__(spec)
        settings = gemma_settings(spec)
        self.attn_softcap = settings.attn_softcap
        self.final_softcap = settings.final_softcap

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return soft_cap(self.lm_head(hidden), self.final_softcap)

    def chunk_loss(self, h: torch.Tensor, t: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        # capped in the compute dtype, as the logits forward returns, then fp32 for the loss
        logits = self.logits(h).float()
        return F.cross_entropy(logits, t, reduction=reduction, ignore_index=IGNORE_INDEX)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = super().embed(input_ids)
        # transformers rounds the scale to the compute dtype first (sqrt(3072) is 55.5 in bf16)
        scale = torch.tensor(self.spec.hidden_size ** 0.5).to(rows.dtype).item()
        return rows * scale

    @property
    def cuda_graphs_refused(self) -> str | None:
        """Why the CUDA graph step (train/graphs.py) cannot run this model, or None: Gemma 2's
        capped scores run in torch over dense masks, and the graph step hands over varlen plans;
        Gemma 3's scores are flash varlen attention's (with its scale)."""
        if self.attn_softcap is None:
            return None
        return ("Gemma 2's soft-capped attention runs over dense masks in torch, not in the graph "
                "step's flash varlen attention (fused_kernels: flex_attention, which it takes)")

    def layer_masks(self, layout, past: int, device, varlen=None) -> list:
        """Capped scores run in torch over a mask: dense masks, never a varlen plan (which the
        CUDA graph step would hand over, refused here)."""
        if varlen is not None and self.cuda_graphs_refused:
            raise QloraError(self.cuda_graphs_refused)
        return layer_masks(self.spec.layer_windows, layout, past, device, varlen,
                           dense=self.attn_softcap is not None)
