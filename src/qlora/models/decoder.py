"""One decoder-only transformer for every supported family, with Hugging Face's module names.

llama, mistral, qwen2 and qwen3 differ only in what ArchSpec records: q/k/v biases (qwen2),
RMSNorm on q and k per head (qwen3), rope scaling (llama 3.x), a tied output head and a sliding
attention window (mistral). Names follow transformers (`model.layers.N.self_attn.q_proj`, ...),
so checkpoints load by name and adapters saved from here are PEFT adapters.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qlora.adapters import grouped_forward
from qlora.config import attention_layers_kept
from qlora.errors import QloraError
from qlora.kernels import fused
from qlora.kernels.dequant import rerun_keeps_weights
from qlora.kernels.lora import drop_kept_products, products_for_rerun
from qlora.kernels.cross_entropy import IGNORE_INDEX, linear_cross_entropy_sum
from qlora.kernels.dropout import use_triton
from qlora.kernels.embedding import gather_rows, move_to_host
from qlora.models.spec import ArchSpec, rope_inverse_frequencies

# IGNORE_INDEX (-100, the label of a position without loss) is kernels/cross_entropy.py's,
# re-exported here for the data and training code


class RMSNorm(nn.Module):
    fused = False  # set by DecoderLM.fused_kernels: kernels/fused.py's Triton kernel instead

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and use_triton(x):
            return fused.rms_norm(x, self.weight, self.eps)
        # normalise in fp32, scale in the input dtype: what the checkpoints were trained with
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + residual, this norm of it): one kernel each way where fused."""
        if (self.fused and use_triton(x) and residual.dtype == x.dtype
                and residual.shape == x.shape):
            return fused.add_rms_norm(x, residual, self.weight, self.eps)
        total = x + residual
        return total, self(total)


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
    fused = False  # set by DecoderLM.fused_kernels: RoPE by kernels/fused.py's Triton kernel
    # kernels.use_fast_path(model, group=True) sets fast_group where these can share one base GEMM
    group_members = ("q_proj", "k_proj", "v_proj")
    fast_group = False

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

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None,
                kept: KeptAttention | None = None):
        """`kept`: a checkpointed layer's (CheckpointedLayer): its first run keeps what attention's
        backward needs, and its rerun reuses that instead of computing q, k, v and attention."""
        B, T, _ = x.shape
        rerun = kept is not None and kept.first_run_done
        if self.fast_group:
            # column views of one [B, T, q+k+v] output; RoPE reads q and k by strides. A rerun
            # makes only the LoRA products: their backward needs the saved inputs they keep,
            # and nothing reads the values, as the kept attention stands in for them
            q, k, v = grouped_forward(x, (self.q_proj, self.k_proj, self.v_proj), base=not rerun)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        if kept is None:
            y = self.attend(q, k, v, cos, sin, mask, cache)
        else:
            y = AttentionKeptForRerun.apply(q, k, v, kept,
                                            functools.partial(self.attend, cos=cos, sin=sin, mask=mask))
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def attend(self, q, k, v, cos, sin, mask, cache: KVCache | None = None) -> torch.Tensor:
        """q [B, T, heads, hd], k/v [B, T, kv_heads, hd] as the projections made them: norms,
        RoPE, cache, attention. Returns [B, heads, T, hd]."""
        if self.fast_group:
            # v alone is copied: attention saves it, and as a column view of the grouped output
            # it would keep q's and k's columns too
            v = v.contiguous()
        v = v.transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        rope = fused.rope if self.fused and use_triton(q) else apply_rope
        q = rope(q.transpose(1, 2), cos, sin)
        k = rope(k.transpose(1, 2), cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)
        return sdpa(q, k, v, mask)


class KeptAttention:
    """What a checkpointed layer's first run keeps of its attention for the layer's backward:
    the autograd graph from q, k, v (as the projections made them) to attention's output, with
    the tensors attention's backward reads (RoPE'd q and k, v, the output, its log-sum-exp)."""

    def __init__(self):
        self.inputs: tuple[torch.Tensor, ...] = ()
        self.output: torch.Tensor | None = None
        self.first_run_done = False

    def clear(self) -> None:
        self.inputs, self.output = (), None


class AttentionKeptForRerun(torch.autograd.Function):
    """attend(q, k, v), whose graph is kept from the layer's first run to its backward.

    Why: a checkpoint's rerun recomputes a layer's forward just before its backward. For the
    attention half that was the q, k, v GEMMs (with a dequantize of their weights), RoPE and
    attention's forward: 7-8 ms of a 188 ms Llama-3-8B step on an H100 (docs/BENCHMARKS.md, sixth
    session). Kept instead, the rerun makes
    only what the other parts' backward reads (the normed input, the LoRA products), and this
    function's backward runs the kept graph. It costs what attention's backward keeps (for
    Llama-3-8B at 2048 tokens, 40 MiB a layer), from the forward to the layer's backward.

    The first run builds the graph under saved-tensor hooks of its own (innermost, so the
    checkpoint's, which would drop the tensors, do not see them) on detached aliases of q, k and
    v; whatever memory of theirs the graph does not save is released at once. The rerun
    returns the kept output and computes nothing; the backward that runs is the first run's
    (non-reentrant checkpointing runs the first run's graph, with the rerun's saved tensors).
    """

    @staticmethod
    def forward(ctx, q, k, v, kept: KeptAttention, attend):
        if kept.first_run_done:  # the rerun: only its saved tensors matter, and this saves none
            if kept.output is None:
                raise QloraError("a second backward through a layer with keep_attention (its "
                                 "attention was kept for one backward): set keep_attention: false "
                                 "to backward twice (retain_graph)")
            return kept.output.detach()
        inputs = tuple(t.detach().requires_grad_() for t in (q, k, v))
        saved = set()

        def pack(t):
            saved.add(t.untyped_storage().data_ptr())
            return t

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            output = attend(*inputs)
        for storage in {t.untyped_storage().data_ptr(): t.untyped_storage() for t in inputs}.values():
            if storage.data_ptr() not in saved:  # read by nothing after this forward
                storage.resize_(0)
        kept.inputs, kept.output, kept.first_run_done = inputs, output, True
        ctx.kept = kept
        return output.detach()

    @staticmethod
    def backward(ctx, grad):
        kept = ctx.kept
        grads = torch.autograd.grad(kept.output, kept.inputs, grad)
        kept.clear()
        return (*grads, None, None)


def sdpa(q, k, v, mask):
    """Attention over q [B,H,T,D], k/v [B,Hkv,S,D].

    `mask` is "causal", None (attend to all), a bool tensor [B,1,T,S], or a Varlen plan for
    packed rows on the GPU (flash attention over each document, no padding, no mask).
    """
    if isinstance(mask, Varlen):
        return varlen_attention(q, k, v, mask)
    gqa = {}
    if k.shape[1] != q.shape[1]:  # grouped-query attention: share each kv head across a group
        if _sdpa_takes_gqa():
            gqa = {"enable_gqa": True}  # no copies of k and v
        else:
            repeat = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
    if isinstance(mask, str):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)


@functools.cache
def _sdpa_takes_gqa() -> bool:
    """torch >= 2.5 shares kv heads inside scaled_dot_product_attention."""
    import inspect

    try:
        return "enable_gqa" in inspect.signature(F.scaled_dot_product_attention).parameters
    except (TypeError, ValueError):  # a builtin without a signature: ask the docstring
        return "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


class Varlen:
    """Document offsets of packed rows, flattened over the batch: flash attention's cu_seqlens."""

    def __init__(self, cu_seqlens: torch.Tensor, max_len: int):
        self.cu_seqlens, self.max_len = cu_seqlens, max_len


def varlen_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        from torch.nn.attention import varlen  # noqa: F401  (torch >= 2.9)
    except ImportError:
        return False
    return True


def varlen_plan(position_ids: torch.Tensor, device: torch.device) -> Varlen:
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    ends = torch.cat([starts, starts.new_tensor([flat.numel()])])
    max_len = int((ends[1:] - ends[:-1]).max())
    return Varlen(ends.to(torch.int32).to(device, non_blocking=True), max_len)


@functools.cache
def _varlen_causal_kwargs() -> dict:
    """torch 2.9-2.11 ask for is_causal=True; later releases for a (-1, 0) window."""
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    return {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}


@functools.cache
def _varlen_takes_gqa() -> bool:
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    return "enable_gqa" in inspect.signature(varlen_attn).parameters


def varlen_attention(q, k, v, plan: Varlen) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    B, H, T, D = q.shape
    kwargs = dict(_varlen_causal_kwargs())
    if k.shape[1] != H:
        if _varlen_takes_gqa():
            kwargs["enable_gqa"] = True
        else:
            repeat = H // k.shape[1]
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
    flat = [t.transpose(1, 2).reshape(B * T, t.shape[1], D) for t in (q, k, v)]
    out = varlen_attn(*flat, plan.cu_seqlens, plan.cu_seqlens, plan.max_len, plan.max_len,
                      **kwargs)
    return out.reshape(B, T, H, D).transpose(1, 2)


class MLP(nn.Module):
    fused = False  # set by DecoderLM.fused_kernels: SwiGLU by kernels/fused.py's Triton kernel
    group_members = ("gate_proj", "up_proj")  # see Attention
    fast_group = False

    def __init__(self, spec: ArchSpec):
        super().__init__()
        h, i, bias = spec.hidden_size, spec.intermediate_size, spec.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x):
        if self.fast_group and self.fused and use_triton(x):
            # the kernel reads gate and up in place from the one [.., 2·intermediate] output and
            # returns its gradient whole: no copies of the halves, no join in backward
            hidden = fused.swiglu_packed(grouped_forward(x, (self.gate_proj, self.up_proj),
                                                         packed=True))
            return self.down_proj(hidden)
        if self.fast_group:  # column views of one [.., 2·intermediate] output
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


class DecoderLayer(nn.Module):
    def __init__(self, spec: ArchSpec, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec, layer_index)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec)

    def forward(self, x, cos, sin, mask, cache=None, kept: KeptAttention | None = None):
        attended = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, kept)
        x, normed = self.post_attention_layernorm.add_and_norm(x, attended)
        return x + self.mlp(normed)


class CheckpointedLayer:
    """A layer as a checkpoint runs it. Its first run keeps the LoRA products H of each of its
    LoRA groups (kernels/lora.products_for_rerun, [tokens, r] per projection). Its second run,
    the rerun just before the layer's backward, reuses them instead of drawing the dropout masks
    again, and keeps the dense 4-bit weights it makes for that backward
    (kernels/dequant.rerun_keeps_weights: one dequantize less per weight, those weights held
    from the rerun to their backward). With `keep_attention`, the first run also keeps its
    attention (KeptAttention) and the rerun skips it."""

    def __init__(self, layer: nn.Module, keep_attention: bool = False):
        self.layer, self.runs = layer, 0
        self.kept = KeptAttention() if keep_attention else None

    def __call__(self, *args):
        self.runs += 1
        if self.runs == 1:
            with products_for_rerun("keep"):
                return self.layer(*args, kept=self.kept)
        with rerun_keeps_weights(), products_for_rerun("reuse"):
            return self.layer(*args, kept=self.kept)


class Backbone(nn.Module):
    def __init__(self, spec: ArchSpec):
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.rotary_emb = Rotary(spec)


class DecoderLM(nn.Module):
    """Causal LM: `model` (embeddings, blocks, final norm) and `lm_head`."""

    def __init__(self, spec: ArchSpec):
        super().__init__()
        self.spec = spec
        self.model = Backbone(spec)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False
        # False once no layer draws from the global RNG (LoRA dropout off or seeded, see
        # kernels/dropout.py): checkpointing then needs no RNG state, so a CUDA graph can hold it
        self.layers_use_rng = True
        self.loss_chunk_tokens = loss_chunk_tokens(spec.vocab_size)
        self.fused_kernels = False
        # with checkpointing: attention kept from a layer's forward to its backward
        # (AttentionKeptForRerun), True in every layer or N in the last N: faster, for memory
        # that memory.py's planner counts
        self.keep_attention: bool | int = False

    @property
    def fused_kernels(self) -> bool:
        """RMSNorm, SwiGLU and RoPE through kernels/fused.py's Triton kernels where Triton runs
        (CUDA, or the CPU under TRITON_INTERPRET=1); off, and elsewhere, the plain torch code of
        this file. Off for a bare model; `qlora train` turns it on (RunConfig.fused_kernels)."""
        return self._fused_kernels

    @fused_kernels.setter
    def fused_kernels(self, on: bool) -> None:
        # each norm, attention and MLP reads its own flag, so they need no link back to the model
        self._fused_kernels = bool(on)
        for module in self.modules():
            if isinstance(module, (RMSNorm, Attention, MLP)):
                module.fused = self._fused_kernels

    def move_embedding_to_host(self) -> int:
        """The input embedding's table into pinned host memory, where the GPU gathers each step's
        rows (kernels/embedding.py), if it is on a GPU where Triton runs, frozen and not the
        head's weight too. Returns the GPU bytes freed (0: left where it was)."""
        table = self.model.embed_tokens.weight
        if (self.spec.tie_word_embeddings or table.requires_grad or table.device.type != "cuda"
                or not use_triton(table)):
            return 0
        return move_to_host(self.model.embed_tokens)

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
    ) -> torch.Tensor:
        """Logits [B, T, V] without labels; with labels, the SUM of token cross-entropies (fp32).

        `varlen`: the document layout of packed rows, given instead of read from position_ids
        (which must then be on the GPU): a CUDA graph holds it in fixed buffers."""
        hidden = self.hidden_states(input_ids, position_ids, cache, varlen)
        if labels is None:
            return self.lm_head(hidden)
        return self.loss_sum(hidden, labels)

    def hidden_states(self, input_ids, position_ids=None, cache=None, varlen=None) -> torch.Tensor:
        """position_ids may stay on the CPU (the training loop's batches do): the document
        layout is then read there, without waiting for the GPU, and moved over once."""
        B, T = input_ids.shape
        device = input_ids.device
        past = cache.length if cache is not None else 0
        if position_ids is None:  # one document per row; the layout is known without the GPU
            layout = torch.arange(past, past + T).expand(B, T)
            position_ids = torch.arange(past, past + T, device=device).expand(B, T)
        else:
            layout = position_ids
            position_ids = position_ids.to(device, non_blocking=True)
        mask = varlen if varlen is not None else attention_mask(
            layout, past, self.spec.sliding_window, device)
        x = gather_rows(self.model.embed_tokens.weight, input_ids)  # the table may be in host memory
        cos, sin = self.model.rotary_emb(position_ids, x.dtype)
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if use_checkpoint:
            drop_kept_products()  # a previous forward's, if its backward never ran
        layers = len(self.model.layers)
        first_kept = layers - attention_layers_kept(self.keep_attention, layers)
        for i, layer in enumerate(self.model.layers):
            if use_checkpoint:
                # the last layers keep it: their backward comes first and frees it before the
                # other layers' reruns make their q/k/v weights
                x = checkpoint(CheckpointedLayer(layer, i >= first_kept), x, cos, sin, mask,
                               use_reentrant=False,
                               preserve_rng_state=self.layers_use_rng)
            else:
                x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length += T
        return self.model.norm(x)

    def loss_sum(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sum of cross-entropies of the label tokens, computed only where a label exists.

        Logits are made chunk by chunk, so the full [tokens, vocab] matrix never exists; positions
        without a label cost nothing. With lm_head frozen (LoRA) each chunk's gradient of the
        hidden states is made in forward (kernels/cross_entropy.py) and backward recomputes
        nothing; a trainable lm_head keeps the checkpointed chunks, recomputed in backward.
        Labels on the CPU (the loop's) are selected there, so the GPU is not waited for.
        """
        targets = torch.full_like(labels, IGNORE_INDEX)
        targets[:, :-1] = labels[:, 1:]
        if labels.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return self._loss_sum_all_positions(hidden, targets.reshape(-1))
        keep = torch.nonzero(targets.reshape(-1) != IGNORE_INDEX).flatten()
        t = targets.reshape(-1)[keep].to(hidden.device, non_blocking=True)
        keep = keep.to(hidden.device, non_blocking=True)
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)
        if not self.lm_head.weight.requires_grad:
            return linear_cross_entropy_sum(h, self.lm_head.weight, t, self.loss_chunk_tokens)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, t.numel(), self.loss_chunk_tokens):
            end = start + self.loss_chunk_tokens
            if torch.is_grad_enabled() and h.requires_grad:
                total = total + checkpoint(self._chunk_loss, h[start:end], t[start:end],
                                           use_reentrant=False)
            else:
                total = total + self._chunk_loss(h[start:end], t[start:end])
        return total

    def _loss_sum_all_positions(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The same sum with shapes fixed by the input alone (inside a CUDA graph capture, where
        the label positions cannot be read): every position is computed, unlabelled ones add 0."""
        h = hidden.reshape(-1, hidden.shape[-1])
        if not self.lm_head.weight.requires_grad:
            return linear_cross_entropy_sum(h, self.lm_head.weight, targets, self.loss_chunk_tokens)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, targets.numel(), self.loss_chunk_tokens):
            end = start + self.loss_chunk_tokens
            total = total + checkpoint(self._chunk_loss, h[start:end], targets[start:end],
                                       use_reentrant=False, preserve_rng_state=False)
        return total

    def _chunk_loss(self, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(h).float()
        return F.cross_entropy(logits, t, reduction="sum", ignore_index=IGNORE_INDEX)


def compute_device(model: nn.Module) -> torch.device:
    """The device a model computes on. Not its first parameter's: that is the input embedding,
    which may sit in host memory (DecoderLM.move_embedding_to_host); the last is the head's."""
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


def attention_mask(position_ids: torch.Tensor, past: int, sliding_window: int | None,
                   device: torch.device | None = None):
    """"causal" for one document per row, else a bool mask [B, 1, T, past+T] or a Varlen plan,
    on `device` (default: that of position_ids, where the layout is read).

    Packed rows hold several documents; a document starts where position_ids restarts at 0,
    and each token may only attend to earlier tokens of its own document.
    """
    device = position_ids.device if device is None else torch.device(device)
    B, T = position_ids.shape
    packed = T > 1 and bool((position_ids[:, 1:] == 0).any())
    windowed = sliding_window is not None and past + T > sliding_window
    if past == 0 and not packed and not windowed:
        return "causal"
    if T == 1 and not windowed:
        return None
    if packed and not windowed and past == 0 and varlen_available(device):
        return varlen_plan(position_ids, device)
    position_ids = position_ids.to(device)
    q_pos = torch.arange(past, past + T, device=device)
    k_pos = torch.arange(past + T, device=device)
    mask = (k_pos[None, :] <= q_pos[:, None]).expand(B, T, past + T)
    if packed:
        if past:
            raise ValueError("a KV cache cannot be combined with packed rows")
        doc = (position_ids == 0).cumsum(-1)
        mask = mask & (doc[:, :, None] == doc[:, None, :])
    if windowed:
        mask = mask & (q_pos[:, None] - k_pos[None, :] < sliding_window)
    return mask[:, None]
