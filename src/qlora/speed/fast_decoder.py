"""The training step's fork of the reference decoder (models/), one subclass per block.

Each class here is its reference class plus the fast path, and nothing else: where its switch is
off, or Triton cannot run on the tensor's device, it is the reference. apply_speed (speed/
__init__.py) swaps a built model's blocks to these classes and sets their switches from a
SpeedPlan; nothing else sets them.

- FastRMSNorm: RMSNorm, and the residual add with it, in one Triton kernel (kernels/fused.py).
- FastAttention: q, k, v as one grouped GEMM over the 4-bit weights (adapters.grouped_forward),
  RoPE in a Triton kernel, and the attention kept for the checkpoint's rerun (kept_attention.py).
- FastMLP: gate and up as one grouped GEMM, SwiGLU in a Triton kernel reading it in place.
- FastDecoderLM: the input embedding gathered from host memory (kernels/embedding.py), layers
  checkpointed through CheckpointedLayer (checkpointing.py), and the loss (summed, or per token for a preference
  method) through kernels/cross_entropy.py (its gradient made in forward; every position
  computed inside a CUDA graph's capture).
- Gemma's forks (FastGemmaRMSNorm, FastGemmaAttention, FastGemmaMLP, FastGemmaDecoderLayer,
  FastGemmaLM): the same fast paths where Gemma's math is the reference's (grouped projections,
  RoPE, kept attention, checkpointing, host embedding), Gemma's own math where it is not (its
  (1 + w) norm kernel, flex_attention for the capped scores, GeGLU, the capped loss);
  models/families/gemma.py says what each gets.
- Phi-3's forks (FastPhi3Attention, FastPhi3MLP, FastPhi3DecoderLayer, FastPhi3LM): its one
  qkv_proj through the fast base, RoPE by the Triton kernel where the rotary is full, attention
  kept for the rerun; SwiGLU by the Triton kernel reading gate_up_proj's output in place.
- Mixtral's and Qwen3-MoE's (FastMoeDecoderLayer, FastMoeLM, and FastExperts in speed/moe.py):
  the layer- and LM-level paths, and the experts as grouped GEMMs over tokens sorted by expert.

A block is forked only by its own class's entry in FORKS: a family's subclass of a reference
block has math of its own, and a fork of the reference's would replace it (speed._forked_class).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from qlora.adapters import grouped_forward
from qlora.kernels import fused
from qlora.kernels.capped_attention import (FlexMask, flex_available, flex_capped_attention,
                                            flex_layer_masks)
from qlora.kernels.cross_entropy import linear_cross_entropy_rows, linear_cross_entropy_sum
from qlora.kernels.dropout import use_triton
from qlora.kernels.embedding import gather_rows
from qlora.kernels.kept_weights import drop_kept_weights
from qlora.kernels.lora import drop_kept_products
from qlora.models.attention import Attention
from qlora.models.decoder import (MLP, DecoderLayer, DecoderLM, compute_device, labelled_rows,
                                  shifted_targets)
from qlora.models.families.gemma import (GemmaAttention, GemmaDecoderLayer, GemmaLM, GemmaMLP,
                                         GemmaRMSNorm, geglu)
from qlora.models.families.moe_blocks import Experts, MoeDecoderLayer, MoeLM
from qlora.models.families.phi3_blocks import Phi3Attention, Phi3DecoderLayer, Phi3LM, Phi3MLP
from qlora.models.norm import RMSNorm
from qlora.models.spec import last_layers
from qlora.models.tiling import run_mlp
from qlora.speed.checkpointing import CheckpointedLayer
from qlora.speed.kept_attention import AttentionKeptForRerun, KeptAttention
from qlora.speed.moe import FastExperts, capture_blocker
from qlora.speed.whole_layer import (add_rms_norm_remade, rms_norm_remade, swiglu_packed_remade,
                                     whole_layer)


class FastRMSNorm(RMSNorm):
    fused = False  # Triton kernel where it runs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and use_triton(x):  # inside a layer left whole, remade in backward
            return rms_norm_remade(x, self.weight, self.eps)
        return super().forward(x)

    def add_and_norm(self, x, residual):
        if (self.fused and use_triton(x) and residual.dtype == x.dtype
                and residual.shape == x.shape):
            return add_rms_norm_remade(x, residual, self.weight, self.eps)
        return super().add_and_norm(x, residual)


class FastAttention(Attention):
    fused = False  # RoPE by a Triton kernel
    grouped = False  # q, k, v share one base GEMM (set where adapters.groupable says they can)
    group_members = ("q_proj", "k_proj", "v_proj")

    def forward(self, x, cos, sin, mask, cache=None, kept: KeptAttention | None = None):
        """`kept`: a checkpointed layer's (CheckpointedLayer): its first run keeps what attention's
        backward needs, and its rerun reuses that instead of computing q, k, v and attention."""
        B, T, _ = x.shape
        q, k, v = self.project(x, rerun=kept is not None and kept.first_run_done)
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        if kept is None:
            y = self.attend(q, k, v, cos, sin, mask, cache)
        else:
            y = AttentionKeptForRerun.apply(q, k, v, kept,
                                            functools.partial(self.attend, cos=cos, sin=sin, mask=mask))
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def project(self, x, rerun: bool):
        """q, k, v [B, T, width] of x. Grouped: column views of one [B, T, q+k+v] output (RoPE
        reads q and k by strides); a rerun then makes only the LoRA products: their backward
        needs the saved inputs they keep, and nothing reads the values, as the kept attention
        stands in for them."""
        if self.grouped:
            return grouped_forward(x, (self.q_proj, self.k_proj, self.v_proj), base=not rerun)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def attend(self, q, k, v, cos, sin, mask, cache=None):
        if self.grouped:
            # v alone is copied: attention saves it, and as a column view of the grouped output
            # it would keep q's and k's columns too
            v = v.contiguous()
        return super().attend(q, k, v, cos, sin, mask, cache)

    def rope(self, x, cos, sin):
        if self.fused and use_triton(x):
            return fused.rope(x, cos, sin)
        return super().rope(x, cos, sin)


class FastMLP(MLP):
    fused = False  # SwiGLU by a Triton kernel
    grouped = False  # gate and up share one base GEMM
    group_members = ("gate_proj", "up_proj")

    def forward(self, x):
        if self.grouped and self.fused and use_triton(x):
            # the kernel reads gate and up in place from the one [.., 2·intermediate] output and
            # returns its gradient whole: no copies of the halves, no join in backward
            return self.down_proj(swiglu_packed_remade(grouped_forward(
                x, (self.gate_proj, self.up_proj), packed=True)))
        if self.grouped:  # column views of one [.., 2·intermediate] output
            gate, up = grouped_forward(x, (self.gate_proj, self.up_proj))
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        if self.fused and use_triton(gate):
            hidden = fused.swiglu(gate, up)
        else:
            hidden = F.silu(gate) * up
        # what autograd does not keep of gate and up can go before down_proj dequantizes its weight
        del gate, up
        return self.down_proj(hidden)


class FastDecoderLayer(DecoderLayer):
    """The reference layer, passing a checkpointed run's KeptAttention to its attention."""

    def forward(self, x, cos, sin, mask, cache=None, kept: KeptAttention | None = None,
                rerun: bool = False):
        """`rerun`: a checkpoint's rerun, which needs of a tiled MLP only its saved input (the
        residual add takes its output and saves nothing): run_mlp computes nothing then."""
        attended = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, kept)
        x, normed = self.post_attention_layernorm.add_and_norm(x, attended)
        return x + run_mlp(self.mlp, normed, skip=rerun)


class FastDecoderLM(DecoderLM):
    # False once no layer draws from the global RNG (LoRA dropout off or seeded, see
    # kernels/dropout.py): checkpointing then needs no RNG state, so a CUDA graph can hold it
    layers_use_rng = True
    # with checkpointing: attention kept from a layer's forward to its backward
    # (AttentionKeptForRerun), True in every layer or N in the last N
    keep_attention: bool | int = False
    # with checkpointing: the last N layers (True: all) not checkpointed, every activation kept
    # for backward and no rerun (selective checkpointing, where memory is to spare)
    keep_activations: bool | int = False
    # the output logits' soft-cap (Gemma's final_logit_softcapping, set by GemmaLM): the fused
    # cross-entropy applies it
    final_softcap: float | None = None

    def embed(self, input_ids):
        return gather_rows(self.model.embed_tokens.weight, input_ids)  # the table may be on host

    def run_layers(self, input_ids, cos, sin, masks, cache):
        x = self.embed(input_ids)  # held by this loop alone (DecoderLM.run_layers says why)
        if not self.checkpointing():
            for layer, mask in zip(self.model.layers, masks, strict=True):
                x = layer(x, cos, sin, mask, cache)
            return x
        drop_kept_products()  # a previous forward's, if its backward never ran
        drop_kept_weights()  # the same for the dense weights a rerun kept
        layers = len(self.model.layers)
        first_kept = layers - last_layers(self.keep_attention, layers)
        first_whole = layers - last_layers(self.keep_activations, layers, "keep_activations")
        for i, (layer, mask) in enumerate(zip(self.model.layers, masks, strict=True)):
            if i >= first_whole:  # the last layers: their backward comes first, before any rerun
                with whole_layer():
                    x = layer(x, cos, sin, mask, cache)
                continue
            # the last layers keep it: their backward comes first and frees it before the
            # other layers' reruns make their q/k/v weights
            with self.keeping_layer_input(x, i):
                x = checkpoint(CheckpointedLayer(layer, i >= first_kept), x, cos, sin, mask,
                               use_reentrant=False, preserve_rng_state=self.layers_use_rng)
        return x

    def loss_sum(self, hidden, labels):
        """The reference's sum; with lm_head frozen (LoRA) each chunk's gradient of the hidden
        states is made in forward (kernels/cross_entropy.py) and backward recomputes nothing."""
        if (isinstance(labels, torch.Tensor) and labels.device.type == "cuda"
                and torch.cuda.is_current_stream_capturing()):
            return self._loss_sum_all_positions(hidden, shifted_targets(labels).reshape(-1))
        if self.lm_head.weight.requires_grad:
            return super().loss_sum(hidden, labels)
        h, t = labelled_rows(hidden, labels)
        return linear_cross_entropy_sum(h, self.lm_head.weight, t, self.loss_chunk_tokens,
                                        self.final_softcap)

    def token_losses(self, hidden, labels):
        """The reference's per-token losses, through the same fused cross-entropy when lm_head is
        frozen (each token's gradient made in forward, weighed in backward)."""
        if self.lm_head.weight.requires_grad:
            return super().token_losses(hidden, labels)
        h, t = labelled_rows(hidden, labels)
        return linear_cross_entropy_rows(h, self.lm_head.weight, t, self.loss_chunk_tokens,
                                         self.final_softcap)

    def _loss_sum_all_positions(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The same sum with shapes fixed by the input alone (inside a CUDA graph capture, where
        the label positions cannot be read): every position is computed, unlabelled ones add 0."""
        h = hidden.reshape(-1, hidden.shape[-1])
        if not self.lm_head.weight.requires_grad:
            return linear_cross_entropy_sum(h, self.lm_head.weight, targets, self.loss_chunk_tokens,
                                            self.final_softcap)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, targets.numel(), self.loss_chunk_tokens):
            end = start + self.loss_chunk_tokens
            total = total + checkpoint(self.chunk_loss, h[start:end], targets[start:end],
                                       use_reentrant=False, preserve_rng_state=False)
        return total


class FastGemmaAttention(FastAttention, GemmaAttention):
    """FastAttention's path (grouped q/k/v, Triton RoPE, kept attention) around Gemma's scores:
    FastAttention's attend and rope lead to this sdpa. Gemma 2's capped scores go through
    flex_attention where the layer's mask is a FlexMask (FastGemmaLM.layer_masks), the reference's
    dense scores elsewhere; those are never kept for the rerun (a [heads, T, T] graph a layer)."""

    def forward(self, x, cos, sin, mask, cache=None, kept: KeptAttention | None = None):
        if self.softcap is not None and not isinstance(mask, FlexMask):
            kept = None  # both runs compute attention, as without keep_attention
        return super().forward(x, cos, sin, mask, cache, kept)

    def sdpa(self, q, k, v, mask):
        if isinstance(mask, FlexMask):
            return flex_capped_attention(q, k, v, mask, self.scale, self.softcap)
        return super().sdpa(q, k, v, mask)


class FastGemmaRMSNorm(GemmaRMSNorm):
    """Gemma's (1 + w) RMSNorm in one Triton kernel (kernels/fused.gemma_rms_norm: fp32 inside,
    rounded once, as the reference), its q/k norms (Gemma 3) included."""
    fused = False  # Triton kernel where it runs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and use_triton(x):
            return fused.gemma_rms_norm(x, self.weight, self.eps)
        return super().forward(x)


class FastGemmaMLP(GemmaMLP):
    """gate and up as one grouped GEMM; GeGLU in torch (the fused kernel computes SwiGLU)."""
    grouped = False
    group_members = ("gate_proj", "up_proj")

    def forward(self, x):
        if not self.grouped:
            return super().forward(x)
        gate, up = grouped_forward(x, (self.gate_proj, self.up_proj))
        hidden = geglu(gate, up)
        del gate, up  # as the reference MLP: gone before down_proj dequantizes its weight
        return self.down_proj(hidden)


class FastGemmaDecoderLayer(GemmaDecoderLayer):
    """Gemma's layer, passing a checkpointed run's KeptAttention to its attention."""

    def forward(self, x, cos, sin, mask, cache=None, kept: KeptAttention | None = None,
                rerun: bool = False):
        """`rerun` is not used: Gemma's post-norm saves the MLP's output, so a rerun computes it."""
        w = self.self_attn.window
        attended = self.self_attn(self.input_layernorm(x), cos[w], sin[w], mask, cache, kept)
        return self.feed_forward(x + self.post_attention_layernorm(attended))


class FastGemmaLM(GemmaLM, FastDecoderLM):
    """Gemma's LM over FastDecoderLM: its run_layers (CheckpointedLayer), its embedding gather
    (GemmaLM.embed scales what FastDecoderLM.embed gathers) and its loss (the fused
    cross-entropy with the final soft-cap inside, or GemmaLM.chunk_loss for a trainable head),
    inside a CUDA graph's capture too; Gemma 2's capped attention through flex_attention."""
    # Gemma 2's capped attention through flex_attention (kernels/capped_attention.py) where it
    # runs: set by apply_speed from fused_kernels
    flex_attention = False

    def layer_masks(self, layout, past: int, device, varlen=None) -> list:
        if (self.flex_attention and self.attn_softcap is not None and past == 0
                and flex_available(torch.device(device))):
            return flex_layer_masks(self.spec.layer_windows, layout, device, varlen)
        return super().layer_masks(layout, past, device, varlen)

    @property
    def cuda_graphs_refused(self) -> str | None:
        return None if self.flex_attention else GemmaLM.cuda_graphs_refused.fget(self)


class FastPhi3Attention(FastAttention, Phi3Attention):
    """Phi-3's attention on FastAttention's path: its one qkv_proj through the 4-bit fast base
    (a group of one, so a checkpoint's rerun can skip its base GEMM when attention is kept),
    RoPE by the Triton kernel where it rotates whole heads (full rotary: Phi-3, Phi-3.5, Phi-4;
    LongRoPE only changes the cos/sin tables it reads), Phi3Attention's partial rotary in torch
    else, and the attention kept for the rerun."""
    group_members = ("qkv_proj",)

    def project(self, x, rerun: bool):
        """q, k, v: column views of qkv_proj's one output (a group of one where grouped)."""
        if self.grouped:
            (qkv,) = grouped_forward(x, (self.qkv_proj,), base=not rerun)
        else:
            qkv = self.qkv_proj(x)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return qkv.split((q_size, kv_size, kv_size), dim=-1)

    def attend(self, q, k, v, cos, sin, mask, cache=None):
        # v is a column view of qkv_proj's output: attention would keep all of it through v
        return Attention.attend(self, q, k, v.contiguous(), cos, sin, mask, cache)

    def rope(self, x, cos, sin):
        if self.fused and use_triton(x) and self.rotary_dim == self.head_dim:
            return fused.rope(x, cos, sin)
        return Phi3Attention.rope(self, x, cos, sin)


class FastPhi3MLP(Phi3MLP):
    """Phi-3's MLP with SwiGLU by the Triton kernel, reading gate_up_proj's one [.., 2·I] output
    in place (gate, then up: the layout FastMLP's packed group makes) and returning its gradient
    whole; silu(gate) is not kept for backward (the kernel recomputes it)."""
    fused = False  # SwiGLU by a Triton kernel

    def forward(self, x):
        if self.fused and use_triton(x):
            return self.down_proj(swiglu_packed_remade(self.gate_up_proj(x)))
        return super().forward(x)


class FastPhi3DecoderLayer(FastDecoderLayer, Phi3DecoderLayer):
    """Phi-3's layer (the reference layer's forward around its own blocks), passing a
    checkpointed run's KeptAttention to its attention as FastDecoderLayer does."""


class FastPhi3LM(Phi3LM, FastDecoderLM):
    """Phi-3's LM over FastDecoderLM: checkpointing through CheckpointedLayer, the embedding
    gathered from host memory, the fused cross-entropy (its logits are the reference's)."""


class FastMoeDecoderLayer(MoeDecoderLayer):
    """A mixture of experts' layer, passing a checkpointed run's KeptAttention to its attention
    (FastDecoderLayer's forward: the blocks differ only in their MLP)."""

    forward = FastDecoderLayer.forward


class FastMoeLM(MoeLM, FastDecoderLM):
    """MoeLM (its aux loss) over FastDecoderLM's paths: checkpointing through CheckpointedLayer,
    the host embedding, the fused cross-entropy; captured in a CUDA graph where the grouped
    experts read nothing on the host (speed/moe.capture_blocker)."""

    @property
    def cuda_graphs_refused(self) -> str | None:
        if self.spec.moe.jitter_noise > 0:  # else graphs.py blames the LoRA dropout
            return ("Mixtral's router jitter (router_jitter_noise) draws from the global RNG, "
                    "whose state a checkpointed layer reads")
        dtype, device = self.lm_head.weight.dtype, compute_device(self)  # the hidden states'
        for block in self.sparse_blocks():
            reason = capture_blocker(block.experts, dtype, device)
            if reason is not None:
                return reason
        return None


# each reference block and its fork: apply_speed swaps exactly these types
FORKS = {RMSNorm: FastRMSNorm, Attention: FastAttention, MLP: FastMLP,
         DecoderLayer: FastDecoderLayer, DecoderLM: FastDecoderLM,
         GemmaAttention: FastGemmaAttention, GemmaMLP: FastGemmaMLP,
         GemmaRMSNorm: FastGemmaRMSNorm,
         GemmaDecoderLayer: FastGemmaDecoderLayer, GemmaLM: FastGemmaLM,
         Phi3Attention: FastPhi3Attention, Phi3MLP: FastPhi3MLP,
         Phi3DecoderLayer: FastPhi3DecoderLayer,
         Phi3LM: FastPhi3LM,
         Experts: FastExperts, MoeDecoderLayer: FastMoeDecoderLayer, MoeLM: FastMoeLM}
