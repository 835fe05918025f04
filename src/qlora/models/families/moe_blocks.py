"""Mixture-of-experts blocks (Mixtral, Qwen3-MoE): the reference, in plain torch, as
transformers' modeling_mixtral.py and modeling_qwen3_moe.py compute them.

- Router (`mlp.gate`, weight [experts, hidden]): logits in the hidden dtype, softmax in fp32, the
  top_k largest, renormalised to sum to 1 where the family says (MoeSpec.renormalize); Qwen3-MoE
  casts them to the hidden dtype, Mixtral keeps them fp32 until the weighted output is rounded.
- ExpertLinear: one projection of every expert, [experts, out, in] (transformers'
  `experts.gate_up_proj` [E, 2I, H], gate rows first, and `experts.down_proj` [E, H, I]); 16-bit
  as a Parameter, or 4-bit as a quant.QuantizedStack whose members are each expert's gate, up
  (two members an expert) or down weight, each quantized on its own as bitsandbytes quantizes a
  Linear4bit of it.
- Experts: for each expert that any token chose, its tokens through down(silu(gate) · up),
  times their router weight, added into the output: a loop over experts, the readable reference
  that the grouped computation (speed/moe.py: tokens sorted by expert, one launch per
  projection over all experts) must equal.
- SparseMoeBlock (`mlp`): router then experts; it keeps the router logits of the model's last
  forward (not of a checkpoint's rerun) for the load-balancing loss (`load_balancing_loss`,
  transformers' formula).
- MoeDecoderLayer: the reference layer with the sparse block, or in the layers MoeSpec calls dense
  (Qwen3-MoE's mlp_only_layers, decoder_sparse_step) the reference MLP.
- MoeLM: with labels, the summed cross-entropy plus, where config.json's output_router_logits
  asks for it (`aux_loss`), router_aux_loss_coef · aux · (the micro-batch's label tokens): the
  loop divides the sum by the window's label tokens, so one micro-batch's loss is transformers'
  mean cross-entropy + coef · aux, and several micro-batches weigh their aux by their tokens.
  The aux loss counts the real tokens only: `real_lengths` (each row's real tokens, the rest of
  the row padding: data/packing.make_batch's, then a CUDA graph's after it) weighs the rows as
  transformers' attention_mask does, so padding routes nothing into it and a graph's padded
  step has the eager step's aux loss. With `per_token` (a preference method's log-probs) each
  token's cross-entropy alone.

Why here and not in mixtral.py / qwen3_moe.py: those are imported wherever a spec is read, and
these blocks build on models/decoder.py (an import cycle); models/load.py's OWN_DECODERS builds
a MoeLM for both model types.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qlora.models.decoder import IGNORE_INDEX, Backbone, DecoderLayer, DecoderLM, shifted_targets
from qlora.models.spec import ArchSpec


class Router(nn.Module):
    """(logits [N, E] in x's dtype, top_k weights [N, k], top_k expert indices [N, k])."""

    def __init__(self, spec: ArchSpec):
        super().__init__()
        self.moe = spec.moe
        self.weight = nn.Parameter(torch.empty(spec.moe.num_experts, spec.hidden_size))

    def forward(self, x: torch.Tensor):
        logits = F.linear(x, self.weight.to(x.dtype))
        probs = torch.softmax(logits.float(), dim=-1)
        weights, index = torch.topk(probs, self.moe.top_k, dim=-1)
        if self.moe.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.moe.weights_in_hidden_dtype:
            weights = weights.to(logits.dtype)
        return logits, weights, index


class ExpertLinear(nn.Module):
    """One projection of every expert, no bias: `weight` [experts, out, in] (16-bit), or
    `quantized`, a quant.QuantizedStack of `members` 4-bit weights an expert (gate_up_proj: gate
    then up), which the loader puts in its place."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, members: int = 1):
        super().__init__()
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.members = members  # weights an expert is stored as, 4-bit (its rows split evenly)
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))
        self.quantized = None

    def set_quantized(self, stack) -> None:
        """Hold `stack` (quant.QuantizedStack) instead of the 16-bit weight."""
        del self.weight
        self.weight = None
        self.quantized = stack

    def expert_weight(self, expert: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert `expert`'s dense weight [out, in]."""
        if self.quantized is None:
            return self.weight[expert].to(dtype)
        first = expert * self.members
        return torch.cat([self.quantized.dequantize_member(first + m)
                          for m in range(self.members)]).to(dtype)

    def dense_weights(self, dtype: torch.dtype) -> torch.Tensor:
        """Every expert's dense weight [experts, out, in] (the reference: one at a time)."""
        if self.quantized is None:
            return self.weight.to(dtype)
        return torch.stack([self.expert_weight(e, dtype) for e in range(self.num_experts)])

    def forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """Expert `expert`'s projection of its tokens x [n, in]."""
        return F.linear(x, self.expert_weight(expert, x.dtype))


class Experts(nn.Module):
    """SwiGLU experts: down(silu(gate(x)) · up(x)) for each token's chosen experts, weighted."""

    def __init__(self, spec: ArchSpec):
        super().__init__()
        e, h, i = spec.moe.num_experts, spec.hidden_size, spec.moe.expert_intermediate_size
        self.num_experts = e
        self.gate_up_proj = ExpertLinear(e, h, 2 * i, members=2)
        self.down_proj = ExpertLinear(e, i, h)

    def forward(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, H], index and weights [N, k] → [N, H]. Expert by expert, in expert order, each
        expert's weighted output rounded to x's dtype and added (transformers' order)."""
        out = torch.zeros_like(x)
        for expert in torch.unique(index).tolist():
            token, slot = torch.where(index == expert)
            y = self.expert(x[token], expert) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    def expert(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        gate, up = self.gate_up_proj(x, expert).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up, expert)


class SparseMoeBlock(nn.Module):
    """`mlp` of a sparse layer: `gate` (the router) and `experts`."""

    def __init__(self, spec: ArchSpec):
        super().__init__()
        self.moe = spec.moe
        self.gate = Router(spec)
        self.experts = Experts(spec)
        self.router_logits: torch.Tensor | None = None  # the last model forward's [N, E]
        self.recording = False  # set by MoeLM.forward while it runs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if self.training and self.moe.jitter_noise > 0:  # Mixtral's router jitter: both read it
            noise = self.moe.jitter_noise
            x = x * torch.empty_like(x).uniform_(1.0 - noise, 1.0 + noise)
        flat = x.reshape(-1, shape[-1])
        logits, weights, index = self.gate(flat)
        if self.recording:
            # only the model's forward, never a checkpoint's rerun in backward: the rerun's logits
            # hold the rerun's graph, and with it every tensor the rerun saved for the layer's
            # backward, until the next forward (each layer's, all of them by the end of backward)
            self.router_logits = logits
        return self.experts(flat, index, weights).view(shape)


def expert_counts(index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int32 [num_experts]: how many of `index`'s entries (expert ids, int64) name each expert.
    A scatter-add, not torch.bincount, whose CUDA kernel first reads the largest index on the
    host: a sync per sparse block."""
    counts = torch.zeros(num_experts, dtype=torch.int32, device=index.device)
    return counts.scatter_add_(0, index, torch.ones_like(index, dtype=torch.int32))


def real_token_weights(real_lengths: torch.Tensor, rows: int, device: torch.device
                       ) -> torch.Tensor:
    """fp32 [rows]: 1 for the real tokens of the flattened batch, 0 for the padding, where row b
    of the batch's len(real_lengths) rows holds real_lengths[b] real tokens, then its padding.
    Made on `device` from the counts alone: no host read (a CUDA graph holds it)."""
    length = rows // real_lengths.shape[0]
    columns = torch.arange(length, device=device)
    real = columns < real_lengths.to(device, non_blocking=True)[:, None]
    return real.reshape(-1).float()


def load_balancing_loss(router_logits: list[torch.Tensor], num_experts: int, top_k: int,
                        real: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' load_balancing_loss_func: E · Σ_e (top_k assignments to e / rows) ·
    (router probability of e summed / rows), the rows of every sparse layer together. `real`
    (fp32 [rows], real_token_weights): each row's weight, 0 for padding, as transformers weighs
    rows by its attention_mask; None: every row counts (transformers without a mask). Nothing is
    read on the host."""
    device = router_logits[0].device
    if real is None:
        real = torch.ones(router_logits[0].shape[0], dtype=torch.float32, device=device)
    assigned = torch.zeros(num_experts, dtype=torch.float32, device=device)
    probability = torch.zeros(num_experts, dtype=torch.float32, device=device)
    # each row's k choices counted with the row's weight (a scatter-add, as expert_counts;
    # whole-number weights, 0, 1 or a shared prompt's 2: whole sums, exact in any order of the
    # adds); made once for every layer
    weights = real[:, None].expand(-1, top_k).reshape(-1)
    for logits in router_logits:
        probs = torch.softmax(logits, dim=-1)  # in the logits' dtype, as transformers
        chosen = torch.topk(probs, top_k, dim=-1).indices
        assigned = assigned.scatter_add(0, chosen.reshape(-1), weights)
        probability = probability + (probs.float() * real[:, None]).sum(dim=0)
    rows = real.sum() * len(router_logits)
    return num_experts * torch.sum((assigned / rows) * (probability / rows))


class MoeDecoderLayer(DecoderLayer):
    """The reference layer with a sparse block (or, where MoeSpec says dense, the MLP)."""

    def __init__(self, spec: ArchSpec, layer_index: int):
        sparse = spec.moe.sparse_layers[layer_index]
        super().__init__(spec, layer_index, mlp=SparseMoeBlock(spec) if sparse else None)


class MoeBackbone(Backbone):
    layer_class = MoeDecoderLayer


class MoeLM(DecoderLM):
    """The reference causal LM over sparse blocks; with labels, the load-balancing loss added
    where `aux_loss` is on (config.json's output_router_logits; train's `router_aux_loss`)."""

    backbone_class = MoeBackbone
    # train/graphs.py: the reference's loop over experts reads which were chosen on the host
    # (speed/moe.py's grouped experts need no such read: FastMoeLM says when it captures)
    cuda_graphs_refused = "the reference loop over experts reads the routing on the host"

    def __init__(self, spec: ArchSpec):
        super().__init__(spec)
        self.aux_loss = spec.moe.aux_loss

    def forward(self, input_ids, position_ids=None, labels=None, cache=None, varlen=None,
                per_token: bool = False, real_lengths: torch.Tensor | None = None):
        """DecoderLM.forward, plus the load-balancing loss over the real tokens (`real_lengths`:
        each row's; None: every token is real)."""
        # a preference method's per-token losses are log-probs: no token's is the router's loss
        adds_aux = labels is not None and not per_token and self.adds_router_loss
        if adds_aux and real_lengths is not None:
            # copied now, not after the layers, where a copy from pageable memory would first
            # wait for the whole forward queued on the GPU
            real_lengths = real_lengths.to(input_ids.device, non_blocking=True)
        blocks = self.sparse_blocks()
        for block in blocks:
            # the last forward's logits go first: they hold its autograd graph, whose gradient
            # accumulators a new forward would reuse, on the stream they were made on (a CUDA
            # graph's capture fails when that is not the capturing stream)
            block.router_logits = None
            block.recording = True
        try:
            total = super().forward(input_ids, position_ids, labels, cache, varlen,
                                    per_token=per_token)
        finally:
            for block in blocks:
                block.recording = False
        if not adds_aux:
            return total
        # the label count stays on the device: reading it would be a host sync every step (and
        # no CUDA graph could hold the step)
        n_labels = (shifted_targets(labels) != IGNORE_INDEX).sum()
        return total + self.spec.moe.aux_loss_coef * n_labels * self.router_aux_loss(real_lengths)

    @property
    def router_loss_coef(self) -> float:
        return self.spec.moe.aux_loss_coef

    @property
    def adds_router_loss(self) -> bool:
        """Whether training adds the load-balancing loss (a preference method adds it itself,
        methods/preference.with_router_loss, from the policy's forward)."""
        return bool(self.aux_loss) and self.router_loss_coef != 0

    def sparse_blocks(self) -> list[SparseMoeBlock]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, SparseMoeBlock)]

    def router_logits(self) -> list[torch.Tensor]:
        """The last forward's router logits of each sparse layer, [rows, experts], in order."""
        return [block.router_logits for block in self.sparse_blocks()]

    def router_aux_loss(self, real_lengths: torch.Tensor | None = None,
                        weights: torch.Tensor | None = None) -> torch.Tensor:
        """transformers' load-balancing loss of the last forward (without its coefficient), over
        the rows' first `real_lengths` tokens (int [rows of the batch]; None: all of them), as
        transformers' with the attention_mask of those lengths; or with each token's weight
        given (`weights`, fp32 [rows, T] on the device: data/preference's router_weights)."""
        logits = self.router_logits()
        real = weights.reshape(-1) if weights is not None else None if real_lengths is None \
            else real_token_weights(real_lengths, logits[0].shape[0], logits[0].device)
        return load_balancing_loss(logits, self.spec.moe.num_experts, self.spec.moe.top_k, real)
