"""The reference decoder: one decoder-only transformer for every supported family, in plain torch,
with Hugging Face's module names.

llama, mistral, qwen2 and qwen3 differ only in what ArchSpec records: q/k/v biases (qwen2),
RMSNorm on q and k per head (qwen3), rope scaling (llama 3.x), a tied output head and each
layer's attention window (mistral's in every layer, qwen's where layer_types says). Names follow
transformers (`model.layers.N.self_attn.q_proj`, ...), so checkpoints load by name and adapters
saved from here are PEFT adapters.

This file is the math. The training step's speed (Triton kernels, the 4-bit fast path, grouped
projections, attention kept for the checkpoint's rerun, CUDA graphs) is a fork of these classes
in speed/fast_decoder.py, applied to a built model by qlora.speed.apply_speed; nothing here
knows about it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qlora.errors import QloraError
from qlora.models.attention import (KVCache, Attention, Rotary, Varlen, apply_rope,  # noqa: F401
                                    attention_mask, layer_masks, rotate_half, sdpa,
                                    sdpa_takes_gqa, varlen_attention, varlen_available,
                                    varlen_plan)
from qlora.models.norm import RMSNorm
from qlora.models.spec import ArchSpec
from qlora.models.tiling import run_mlp

IGNORE_INDEX = -100  # the label of a position without loss (transformers' and PEFT's value too)


@dataclass
class LabelPositions:
    """Labels given as the flat positions (row-major over the batch's [rows, T]) that predict them
    and their targets, instead of a [rows, T] label tensor: laid out on the host ahead of a CUDA
    graph (methods/preference.label_slots), where no label position can be read from the GPU.
    A target of IGNORE_INDEX (a padding slot) adds a loss of 0."""
    positions: torch.Tensor  # [N] int64
    targets: torch.Tensor  # [N] int64


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) · up(x))."""

    def __init__(self, spec: ArchSpec):
        super().__init__()
        h, i, bias = spec.hidden_size, spec.intermediate_size, spec.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x):
        gate, up = self.gate_proj(x), self.up_proj(x)
        hidden = F.silu(gate) * up
        # what autograd does not keep of gate and up can go before down_proj dequantizes its weight
        del gate, up
        return self.down_proj(hidden)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ArchSpec, layer_index: int, self_attn: nn.Module | None = None,
                 mlp: nn.Module | None = None):
        """`self_attn`, `mlp`: a family's own blocks (Phi-3's fused projections, a sparse MoE
        block) in the shared norms and residuals; the plain ones where None."""
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec, layer_index) if self_attn is None else self_attn
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec) if mlp is None else mlp

    def forward(self, x, cos, sin, mask, cache=None):
        attended = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        x, normed = self.post_attention_layernorm.add_and_norm(x, attended)
        return x + run_mlp(self.mlp, normed)  # in sequence tiles where set (models/tiling.py)


class Backbone(nn.Module):
    layer_class = DecoderLayer  # a family's layer (Phi-3's, MoE's) and rotary (Phi-3's LongRoPE)
    rotary_class = Rotary

    def __init__(self, spec: ArchSpec):
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(self.layer_class(spec, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.rotary_emb = self.rotary_class(spec)


class DecoderLM(nn.Module):
    """Causal LM: `model` (embeddings, blocks, final norm) and `lm_head`."""

    backbone_class = Backbone  # a family with blocks of its own names its backbone (Gemma's)
    # packed rows keep their documents apart (attention_mask / varlen from the position ids)
    packs_documents = True
    # where a checkpointed layer's input waits for the layer's backward: None, here; set from
    # outside to an object whose saving(x, index, last) is a context around the checkpoint call
    # (speed/offload.py: pinned host memory)
    layer_input_offload = None

    def __init__(self, spec: ArchSpec):
        super().__init__()
        self.spec = spec
        self.model = self.backbone_class(spec)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # each layer rerun in backward instead of keeping its activations (training only)
        self.gradient_checkpointing = False
        self.loss_chunk_tokens = loss_chunk_tokens(spec.vocab_size)

    def tie_weights(self) -> None:
        if self.spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: KVCache | None = None,
        varlen: Varlen | None = None,
        per_token: bool = False,
        real_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V] without labels; with labels, the SUM of token cross-entropies (fp32),
        or with `per_token` each label token's cross-entropy (fp32 [N], the label positions in
        row-major order: what a preference method sums per sequence). `labels` may be a
        LabelPositions (the label positions staged for a CUDA graph).

        `varlen`: the document layout of packed rows, given instead of read from position_ids
        (which must then be on the GPU): a CUDA graph holds it in fixed buffers; a shared
        prompt's plan (attention.GatheredKeys), which no position ids can say, always comes so.

        `real_lengths` (int [B]): each row's real tokens, the rest padding. Nothing here needs it
        (padding is a document of its own without labels: no real token sees it, it adds no
        loss); a mixture of experts' load-balancing loss leaves the padding's routing out
        (moe_blocks.MoeLM)."""
        hidden = self.hidden_states(input_ids, position_ids, cache, varlen)
        if labels is None:
            return self.logits(hidden)
        if per_token:
            return self.token_losses(hidden, labels)
        return self.loss_sum(hidden, labels)

    def new_cache(self, batch: int, limit: int) -> KVCache:
        """A KV cache for `batch` rows of up to `limit` tokens, for generation."""
        return KVCache(self.spec, batch, limit, compute_device(self),
                       self.model.embed_tokens.weight.dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output logits of the final norm's hidden states (a family may cap them)."""
        return self.lm_head(hidden)

    def hidden_states(self, input_ids, position_ids=None, cache=None, varlen=None) -> torch.Tensor:
        cos, sin, masks = self.layer_inputs(input_ids, position_ids, cache, varlen)
        x = self.run_layers(input_ids, cos, sin, masks, cache)
        if cache is not None:
            cache.length += input_ids.shape[1]
        return self.model.norm(x)

    def layer_inputs(self, input_ids, position_ids=None, cache=None, varlen=None):
        """(cos, sin, masks): what every layer takes beside its input, for these ids after the
        cache's tokens (masks: each layer's, in layer order). position_ids may stay on the CPU
        (the training loop's batches do): the document layout is then read there, without
        waiting for the GPU, and moved over once."""
        B, T = input_ids.shape
        device = input_ids.device
        past = cache.length if cache is not None else 0
        if position_ids is None:  # one document per row; the layout is known without the GPU
            layout = torch.arange(past, past + T).expand(B, T)
            position_ids = torch.arange(past, past + T, device=device).expand(B, T)
        else:
            layout = position_ids
            position_ids = position_ids.to(device, non_blocking=True)
        masks = self.layer_masks(layout, past, device, varlen)
        # the embedding's dtype: what embed returns, in every family
        cos, sin = self.model.rotary_emb(position_ids, self.model.embed_tokens.weight.dtype)
        return cos, sin, masks

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def layer_masks(self, layout, past: int, device, varlen=None) -> list:
        """Each layer's attention mask (attention.layer_masks); a family whose attention runs
        over masks only (Gemma 2's capped scores) asks for dense ones."""
        return layer_masks(self.spec.layer_windows, layout, past, device, varlen)

    def checkpointing(self) -> bool:
        """Whether this forward reruns each layer in backward."""
        return self.gradient_checkpointing and self.training and torch.is_grad_enabled()

    def run_layers(self, input_ids, cos, sin, masks, cache):
        """The layers over the embedded ids. `masks`: each layer's, in layer order (layer_masks).
        The embedding is made here so that this loop holds the only reference to each layer's
        input: an offloaded one (the first layer's too) is freed once it is copied out."""
        x = self.embed(input_ids)
        use_checkpoint = self.checkpointing()
        for i, (layer, mask) in enumerate(zip(self.model.layers, masks, strict=True)):
            if use_checkpoint:
                with self.keeping_layer_input(x, i):
                    x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        return x

    def keeping_layer_input(self, x: torch.Tensor, index: int):
        """Around layer `index`'s checkpoint call: where its saved input `x` waits for its
        backward (layer_input_offload's place, else the checkpoint keeps it where it is)."""
        if self.layer_input_offload is None:
            return contextlib.nullcontext()
        return self.layer_input_offload.saving(x, index, last=index == len(self.model.layers) - 1)

    def loss_sum(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sum of cross-entropies of the label tokens, computed only where a label exists.

        Logits are made chunk by chunk (checkpointed: recomputed in backward), so the full
        [tokens, vocab] matrix never exists; positions without a label cost nothing. Labels on
        the CPU (the loop's) are selected there, so the GPU is not waited for.
        """
        h, t = labelled_rows(hidden, labels)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, t.numel(), self.loss_chunk_tokens):
            end = start + self.loss_chunk_tokens
            if torch.is_grad_enabled() and h.requires_grad:
                total = total + checkpoint(self.chunk_loss, h[start:end], t[start:end],
                                           use_reentrant=False)
            else:
                total = total + self.chunk_loss(h[start:end], t[start:end])
        return total

    def token_losses(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The cross-entropy of each label token (fp32 [N]), chunk by chunk as loss_sum: only the
        label positions' logits are made, never the [tokens, vocab] matrix whole."""
        h, t = labelled_rows(hidden, labels)
        chunks = []
        for start in range(0, t.numel(), self.loss_chunk_tokens):
            end = start + self.loss_chunk_tokens
            if torch.is_grad_enabled() and h.requires_grad:
                # no RNG state kept: the chunk draws no random numbers, and a CUDA graph's
                # capture (a preference step's) cannot read that state
                chunks.append(checkpoint(self.chunk_loss, h[start:end], t[start:end], "none",
                                         use_reentrant=False, preserve_rng_state=False))
            else:
                chunks.append(self.chunk_loss(h[start:end], t[start:end], "none"))
        return torch.cat(chunks) if chunks else hidden.new_zeros(0, dtype=torch.float32)

    def chunk_loss(self, h: torch.Tensor, t: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        logits = self.lm_head(h).float()
        return F.cross_entropy(logits, t, reduction=reduction, ignore_index=IGNORE_INDEX)


def labelled_rows(x: torch.Tensor, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of x [..., D] (hidden states or logits, flattened over the batch) at the
    positions that predict a label, and those labels: `labels` [B, T] shifted, or a
    LabelPositions (staged: no selection to make)."""
    flat = x.reshape(-1, x.shape[-1])
    if isinstance(labels, LabelPositions):
        return flat.index_select(0, labels.positions), labels.targets
    targets = shifted_targets(labels)
    keep = torch.nonzero(targets.reshape(-1) != IGNORE_INDEX).flatten()
    t = targets.reshape(-1)[keep].to(x.device, non_blocking=True)
    keep = keep.to(x.device, non_blocking=True)
    return flat.index_select(0, keep), t


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Position i predicts label i+1; the last position predicts nothing."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets


def compute_device(model: nn.Module) -> torch.device:
    """The device a model computes on. Not its first parameter's: that is the input embedding,
    which may sit in host memory (speed.apply_speed's embedding_on_host); the last is the head's."""
    last = None
    for last in model.parameters():
        pass
    if last is None:
        raise QloraError("the model has no parameters: nothing tells which device it runs on")
    return last.device


def loss_chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk of the loss: about 2^26 logits (256 MiB in fp32) at a time, whatever the
    vocabulary (llama-3's 128k: 512 tokens, qwen's 152k: 256). The memory planner uses the same."""
    target = 2**26 // max(vocab_size, 1)
    chunk = 1 << max(target.bit_length() - 1, 0)
    return min(max(chunk, 128), 4096)


