"""A micro-batch's forward and backward as one CUDA graph: one launch instead of thousands.

A QLoRA step of a small model is bound by the host: thousands of small kernels per step, each
launched from Python, with the GPU idle between them. For a fixed batch shape the whole forward
and backward is recorded once and then replayed: the batch is copied into the graph's input
buffers, gradients accumulate into the flattened gradient buffers (train/optim.flatten_group),
the loss sum comes out in a fixed output tensor. The optimizer step stays outside (its learning
rate changes every step).

Packed rows go through flash attention's variable-length kernel with the documents' offsets in
a fixed buffer (unused slots repeat the last offset: empty documents). Rows that each hold one
document take SDPA's causal kernel instead: measured on an H100 at Llama-3-8B's heads, 28 ms per
step against varlen's 41 (torch 2.11's varlen has no GQA: k and v are repeated for it), and padding
after a causal document changes nothing before it. Rows are padded to a multiple of `pad_to` tokens
(a padding document without labels; a shared-prompt row that must have one and is a multiple
already gets ALIGNED_PADDING tokens) and the document count to a power of two, so a run makes
few graphs; they share one memory pool.

A preference method (DPO, ORPO, SimPO, KTO) puts its batch loss in the graph instead of the
model's loss sum (`GraphedSteps(preference=)`): its label positions, their sequences and the
label tokens per sequence are staged on the host with the rows (`stage_preference`, through
methods/preference.label_slots), so the capture reads no label from the GPU; DPO's and KTO's
reference forwards (adapters off, no grad) are recorded in the same graph. A KTO batch is staged
as two sets of rows, its examples' and their KL sequences' (`StagedBatch.kl`), each with its own
buffers: the policy's forward with grad over the first, without over the second, as eagerly;
its labels (desirable or not) in a slot of their own.

Layers with a sliding window take the same offsets with their window where torch's varlen takes
one (`window_size`); in rows of one document, a dense bool mask made on the GPU from the row
length alone, which the capture holds.

Gemma 3 takes the same offsets (its own scale, a window per layer); Gemma 2's soft-capped scores
go through flex_attention on the fast path (kernels/capped_attention.py), whose block masks are
made inside the capture from the same offsets, and its final soft-cap inside the fused
cross-entropy, over every position as for any family.

A mixture of experts is captured with its routing: the grouped experts take their groups' ends
from a device tensor (speed/moe.py), and the load-balancing loss counts the real tokens only:
each row's real length (data/packing.make_batch's `real_lengths`, all of the row where none is
given) is staged with the rows (`real_lengths`, a buffer of its own) and graph padding comes
after it, so the padding's routing is left out (moe_blocks.real_token_weights, on the device)
and a padded step's aux loss is the eager unpadded step's.

Conditions (`unsupported_reason` says which one fails): CUDA, torch's varlen attention (taking a
window where a layer's is shorter than the rows), a family whose attention it computes (Gemma 2
only on the fast path with fused kernels: GemmaLM.cuda_graphs_refused), a mixture of experts
whose experts read the host (FastMoeLM.cuda_graphs_refused), LoRA dropout seeded (adapters.seed_dropout: checkpointed
layers then need no RNG state, which cannot be read during a capture), flattened gradients.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qlora.data.preference import half
from qlora.methods.preference import batch_loss, label_slots, staged_batch_loss
from qlora.models.attention import GatheredKeys, varlen_takes_window
from qlora.models.decoder import IGNORE_INDEX, Varlen, compute_device, varlen_available


# Rows longer than this run eagerly: a step is seconds of GPU work there, so replaying it saves
# ~2% (Llama-3-8B at 32,768 tokens on an H100, 2026-12-06: 5.06 s a step graphed, 5.14 s eager)
# while the capture (the step run three times, compiling its kernels) took 94 s, and at 65,536
# tokens outlasted a 200 s benchmark worker.
GRAPH_ROWS_UP_TO = 16384


def unsupported_reason(model, device: torch.device, max_len: int) -> str | None:
    """Why the step is not captured, or None when it is."""
    if device.type != "cuda":
        return "not on a CUDA device"
    if max_len > GRAPH_ROWS_UP_TO:
        return (f"rows of {max_len} tokens (over {GRAPH_ROWS_UP_TO}): each step is long enough "
                "that launching its kernels costs nothing measurable, and a capture costs minutes")
    if not varlen_available(device):
        return "this torch has no varlen attention (torch >= 2.9 needed)"
    refused = getattr(model, "cuda_graphs_refused", None)  # a family's own reason (Gemma 2's)
    if refused:
        return refused
    window = model.spec.narrowest_window()
    if window is not None and window < max_len and not varlen_takes_window():
        # packed rows would need a dense mask, read from the positions: no capture holds that
        return (f"the sliding attention window ({window}) is shorter than the rows, and this "
                "torch's varlen attention takes no window_size")
    if getattr(model, "layers_use_rng", True):  # speed.apply_speed's seeded dropout clears it
        return "the LoRA dropout is not seeded"
    return None


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _document_slots(offsets: list[int]) -> int:
    """The document slots of a graph's offsets: the documents' count rounded up to a power of
    two, at least 4 (few graph shapes)."""
    return max(_pow2_at_least(len(offsets) - 1), 4)


def _offset_buffer(offsets: list[int], docs: int) -> torch.Tensor:
    """`offsets` (int32) in `docs` + 1 slots, the unused ones repeating the last: empty
    documents."""
    cu = torch.full((docs + 1,), offsets[-1], dtype=torch.int32)
    cu[:len(offsets)] = torch.tensor(offsets, dtype=torch.int32)
    return cu


def document_offsets(position_ids: torch.Tensor) -> list[int]:
    """Where each document starts in the flattened batch (its positions restart at 0), then the end."""
    flat = position_ids.reshape(-1)
    return torch.nonzero(flat == 0).flatten().tolist() + [flat.numel()]


def pad_batch(input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor,
              length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows padded to `length`: the padding is one more document per row, without labels.
    (The seeded dropout masks follow the padded layout: rows after the first draw other masks
    than they would unpadded, as valid a draw as any.)"""
    B, T = input_ids.shape
    ids = torch.zeros((B, length), dtype=torch.long)
    pos = torch.arange(length).repeat(B, 1) - T  # padding positions 0, 1, ... after T
    lab = torch.full((B, length), IGNORE_INDEX, dtype=torch.long)
    ids[:, :T], pos[:, :T], lab[:, :T] = input_ids, position_ids, labels
    return ids, pos, lab


@dataclass
class StagedBatch:
    """A micro-batch made ready for its graph on the host alone: padded, its document offsets laid
    out as the graph's `cu_seqlens` buffer, in page-locked memory when `pinned` (the copies into the
    graph's buffers are then asynchronous). No GPU work, so the loop stages the next step's
    micro-batches while the GPU still runs this step's. A preference batch adds its label slots
    (methods/preference.label_slots) and keeps the batch itself for the eager fallback; a KTO
    batch's KL sequences are rows of their own, staged alike (`kl`)."""
    # (rows, padded length, document slots; 0: one document a row), then a preference batch's
    # (slot name, size) pairs, then the KL rows' key: every shape the graph fixes
    key: tuple
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    cu_seqlens: torch.Tensor
    # [rows]: each row's real tokens (the padding after them: make_batch's, then the graph's)
    real_lengths: torch.Tensor
    unpadded: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # for the eager fallback
    slots: dict[str, torch.Tensor] = field(default_factory=dict)
    source: dict | None = None  # the preference batch as collated, for the eager fallback
    kl: StagedBatch | None = None  # KTO: its KL sequences' rows
    # a shared prompt's gathered keys (stage_gathered_keys): the index and the keys' offsets
    gathered_keys: dict[str, torch.Tensor] = field(default_factory=dict)

    def row_buffers(self) -> dict[str, torch.Tensor]:
        """These rows' tensors, by the names of their graph buffers."""
        return {"input_ids": self.input_ids, "position_ids": self.position_ids,
                "labels": self.labels, "cu_seqlens": self.cu_seqlens,
                "real_lengths": self.real_lengths, **self.gathered_keys, **self.slots}

    def buffers(self) -> dict[str, torch.Tensor]:
        """What is copied into the graph's buffers of the same names (the KL rows' as kl.*)."""
        out = self.row_buffers()
        if self.kl is not None:
            out.update({f"kl.{name}": t for name, t in self.kl.row_buffers().items()})
        return out

    @property
    def longest_row(self) -> int:
        return max(self.key[1], self.kl.key[1] if self.kl is not None else 0)


def stage_batch(input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor,
                pad_to: int, pinned: bool, real_lengths: torch.Tensor | None = None
                ) -> StagedBatch:
    """The batch as its graph reads it: rows padded to a multiple of `pad_to`; packed rows with
    the document count rounded up to a power of two (at least 4), the unused offsets repeating the
    last one; rows of one document each with no offsets at all (0 slots: causal attention).
    `real_lengths`: each row's real tokens (make_batch's), None for all T of them; the padding
    added here comes after them, so they stay as they are."""
    B, T = input_ids.shape
    if real_lengths is None:
        real_lengths = torch.full((B,), T, dtype=torch.long)
    length = _round_up(T, pad_to)
    ids, pos, lab = pad_batch(input_ids, position_ids, labels, length)
    if torch.equal(position_ids, torch.arange(T).expand(B, T)):
        docs, cu = 0, torch.zeros(1, dtype=torch.int32)
    else:
        offsets = document_offsets(pos)  # the padding starts a document of its own
        docs = _document_slots(offsets)
        cu = _offset_buffer(offsets, docs)
    if pinned:
        ids, pos, lab, cu, real_lengths = (t.pin_memory()
                                           for t in (ids, pos, lab, cu, real_lengths))
    return StagedBatch((B, length, docs), ids, pos, lab, cu, real_lengths,
                       (input_ids, position_ids, labels))


# The padding document of a gathered-keys row whose tokens are a multiple of the graph's pad_to:
# a few tokens (a multiple of 8, as the GEMMs' rows like) instead of a whole pad_to more
ALIGNED_PADDING = 16


def stage_gathered_keys(input_ids: torch.Tensor, position_ids: torch.Tensor,
                        labels: torch.Tensor, plan: Varlen, pad_to: int, pinned: bool
                        ) -> StagedBatch:
    """A packed row whose documents gather their keys (a shared prompt's: models/attention.
    GatheredKeys), staged as stage_batch stages packed rows. Its padding, at least one token, is
    a document whose keys are filler (the first padding token, over and over) then its own
    tokens, so that the key index has a length the graph can fix: the row's padded length plus
    the keys it gathers beyond its tokens (the shared prompts), those rounded up to a power of two
    of at least `pad_to` (few graph shapes for ragged prompts, at most twice the prompts' keys).
    The filler is seen by padding queries alone. The documents' offsets, queries' and keys', are
    rounded up to a power of two (at least 4) as stage_batch's, the unused ones repeating the
    last. A row already a multiple of `pad_to` long gets ALIGNED_PADDING tokens, not `pad_to`:
    a DPO pair of 512 + 512 + 512 tokens staged at 1,792 carried 17% more tokens than it has
    (1.07 GiB of activations more at Llama-3-8B without checkpointing, measured 12.74 GiB
    against the 11.65 planned)."""
    T = input_ids.shape[1]
    length = T + ALIGNED_PADDING if T % pad_to == 0 else _round_up(T, pad_to)
    ids, pos, lab = pad_batch(input_ids, position_ids, labels, length)
    index = plan.keys.index
    real_keys = index.numel()
    key_length = length + _pow2_at_least(max(real_keys - T, pad_to))
    filler = key_length - real_keys - (length - T)
    key_index = torch.cat([index, torch.full((filler,), T, dtype=torch.long),
                           torch.arange(T, length)])
    offsets_q = plan.cu_seqlens.tolist() + [length]
    offsets_k = plan.keys.cu_seqlens.tolist() + [key_length]
    docs = _document_slots(offsets_q)
    cu, cu_keys = _offset_buffer(offsets_q, docs), _offset_buffer(offsets_k, docs)
    real_lengths = torch.tensor([T], dtype=torch.long)
    tensors = (ids, pos, lab, cu, real_lengths, key_index, cu_keys)
    if pinned:
        tensors = tuple(t.pin_memory() for t in tensors)
    staged = StagedBatch((1, length, docs, "keys", key_length), *tensors[:5],
                         (input_ids, position_ids, labels))
    staged.gathered_keys = {"key_index": tensors[5], "cu_keys": tensors[6]}
    return staged


def stage_preference(batch: dict, pad_to: int, pinned: bool, router: bool = False
                     ) -> StagedBatch:
    """A preference batch (data/preference.preference_batch) staged as stage_batch stages its
    rows, with its label slots (methods/preference.label_slots, rounded up to a multiple of
    `pad_to`); the slots' shapes (labels, sequences, a precomputed reference or not) join the
    key. A KTO batch: its examples' half so, their KL sequences' half as `kl` (its key joins
    too), and the examples' labels as the slot `label`. `router`: the model adds a router loss
    (MoeLM.adds_router_loss), whose token weights the policy's rows stage then (never the KL
    sequences', which it does not count)."""
    if "label" not in batch:
        staged = _stage_sequences(batch, pad_to, pinned, {}, router)
    else:
        label = batch["label"].pin_memory() if pinned else batch["label"]
        staged = _stage_sequences(half(batch, second=False), pad_to, pinned, {"label": label},
                                  router)
        staged.kl = _stage_sequences(half(batch, second=True), pad_to, pinned, {}, False)
        staged.key += ("kl", *staged.kl.key)
    staged.source = batch
    return staged


def _stage_sequences(batch: dict, pad_to: int, pinned: bool, extra: dict[str, torch.Tensor],
                     router: bool) -> StagedBatch:
    """Rows of sequences (a pairs batch, or a half of a KTO batch) with their label slots (the
    router weights' only where `router`) and the `extra` ones."""
    plan = batch.get("attention")
    if plan is not None and plan.keys is not None:
        staged = stage_gathered_keys(batch["input_ids"], batch["position_ids"], batch["labels"],
                                     plan, pad_to, pinned)
    else:
        staged = stage_batch(batch["input_ids"], batch["position_ids"], batch["labels"], pad_to,
                             pinned)
    slots = label_slots(batch, staged.key[1], pad_to, router)
    if pinned:
        slots = {name: t.pin_memory() for name, t in slots.items()}
    staged.slots = {**slots, **extra}
    staged.key += tuple((name, t.numel()) for name, t in sorted(staged.slots.items()))
    return staged


class _Rows:
    """One set of staged rows on the device: the graph's input buffers of them and the model
    over them."""

    def __init__(self, batch: StagedBatch, device: torch.device):
        # the graph's inputs: one device buffer per staged tensor, of its shape
        self.buffers = {name: torch.empty_like(t, device=device)
                        for name, t in batch.row_buffers().items()}
        self.input_ids, self.position_ids = self.buffers["input_ids"], self.buffers["position_ids"]
        self.labels, self.real_lengths = self.buffers["labels"], self.buffers["real_lengths"]
        self.slots = {name: self.buffers[name] for name in batch.slots}
        length, docs = batch.key[1], batch.key[2]
        self.packed = docs > 0  # else one document a row: positions 0.. and the causal kernel
        # the documents' offsets in a fixed buffer; off CUDA (no graph there: the tests run the
        # body eagerly on the CPU) the layout is read from position_ids instead, except for
        # gathered keys (a shared prompt), which position_ids cannot say
        self.varlen = None
        if batch.gathered_keys:
            keys = GatheredKeys(self.buffers["key_index"], self.buffers["cu_keys"],
                                batch.key[4])
            self.varlen = Varlen(self.buffers["cu_seqlens"], length, keys=keys)
        elif self.packed and device.type == "cuda":
            self.varlen = Varlen(self.buffers["cu_seqlens"], length)

    def forward(self, model, labels, per_token: bool = False) -> torch.Tensor:
        """The model over these rows: the loss sum, or with `per_token` each label's loss
        (`labels` then a models.decoder.LabelPositions: methods/preference.slot_logps)."""
        extra = {"per_token": True} if per_token else {}
        if not self.packed:
            return model(self.input_ids, None, labels, real_lengths=self.real_lengths, **extra)
        return model(self.input_ids, self.position_ids, labels, varlen=self.varlen,
                     real_lengths=self.real_lengths, **extra)

    def token_losses(self, model):
        """forward's per-token losses over these rows, as a function of the label positions."""
        return lambda labels: self.forward(model, labels, per_token=True)


class _Graph(_Rows):
    """A batch shape's graph: its rows (and a KTO batch's KL rows, `kl`), the scale of its
    backward, what the capture records, its outputs."""

    def __init__(self, batch: StagedBatch, device: torch.device):
        super().__init__(batch, device)
        self.kl = _Rows(batch.kl, device) if batch.kl is not None else None
        if self.kl is not None:
            self.buffers.update({f"kl.{name}": t for name, t in self.kl.buffers.items()})
        self.scale = torch.zeros((), dtype=torch.float32, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.loss_sum: torch.Tensor | None = None
        self.metrics: dict[str, torch.Tensor] = {}  # a preference method's, as loss_sum


def release_graphs(graphs) -> None:
    """Reset these graphs (one whose capture failed midway among them: torch's reset frees their
    blocks of the shared pool once nothing else holds them) and drop what a failed step's rerun
    left in the kernels' hand-over tables. A capture that a host read invalidated ends with the
    pool still held (torch's reset only warns there); one that ran out of memory ends cleanly."""
    from qlora.kernels.lora import drop_kept_products
    from qlora.kernels.kept_weights import drop_kept_weights

    for g in graphs:
        if g.graph is not None:
            g.graph.reset()
    drop_kept_products()
    drop_kept_weights()


class GraphedSteps:
    """`step(input_ids, position_ids, labels, scale)` = forward, backward of `scale · loss_sum`,
    through a CUDA graph per padded shape; returns the loss sum (a GPU scalar, valid until the
    next call). Inputs come on the CPU, as the loop's batches do. The call is `stage` (host work:
    padding, offsets, page-locked copies) then `run` (copies into the graph's buffers, replay); the
    loop calls them apart, staging a step's micro-batches while the GPU runs the previous step.

    `preference`: (a preference method's module, its PreferenceOptions): the graph's body is then
    that method's batch loss (methods/preference.staged_batch_loss: the policy forward, DPO's or
    KTO's reference forward with the adapters off or DPO's precomputed log-probs, the method's
    losses) over a batch staged with its label slots (`stage_preference`), and `metrics` holds
    the last run's metric sums (fixed tensors, as the loss sum: read or copy them before the
    next run)."""

    def __init__(self, model, grads: list[torch.Tensor], pad_to: int = 256, warmup: int = 2,
                 capture_error_mode: str = "global", log=print, preference=None):
        self.model, self.grads, self.preference = model, grads, preference
        self.capture_error_mode, self.log = capture_error_mode, log
        self.failed: str | None = None  # why capturing failed; the steps then run eagerly
        self.pad_to, self.warmup = pad_to, warmup
        self.device = compute_device(model)
        self.graphs: dict[tuple, _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.metrics: dict[str, torch.Tensor] = {}

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor,
                 scale: float, real_lengths: torch.Tensor | None = None) -> torch.Tensor:
        return self.run(self.stage(input_ids, position_ids, labels, real_lengths), scale)

    def stage(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
              labels: torch.Tensor, real_lengths: torch.Tensor | None = None) -> StagedBatch:
        """The host half of a call (stage_batch): it may run well before `run`."""
        return stage_batch(input_ids, position_ids, labels, self.pad_to,
                           pinned=self.device.type == "cuda", real_lengths=real_lengths)

    def stage_preference(self, batch: dict) -> StagedBatch:
        """`stage` for a preference method's batch (stage_preference)."""
        return stage_preference(batch, self.pad_to, pinned=self.device.type == "cuda",
                                router=getattr(self.model, "adds_router_loss", False))

    def run(self, batch: StagedBatch, scale: float) -> torch.Tensor:
        """The GPU half: copy `batch` into its graph's buffers (captured on first sight), replay."""
        if self.failed is not None or batch.longest_row > GRAPH_ROWS_UP_TO:
            # (a packed preference row holds a micro-batch's sequences: it may be longer than
            # max_seq_length, which unsupported_reason bounded)
            return self._eager(batch, scale)
        g = self.graphs.get(batch.key)
        if g is None:
            g = _Graph(batch, self.device)
            self._fill(g, batch, scale)
            try:
                self._capture(g)
            except Exception as err:  # noqa: BLE001 -- something the capture cannot hold
                self.failed = f"{type(err).__name__}: {err}"
            if self.failed is not None:
                # the eager step runs once the exception is gone: its traceback's frames hold the
                # failed capture's tensors, whose blocks in the graphs' pool an eager step at the
                # memory's edge needs (Qwen3-30B-A3B under a 24 GB cap ran out of memory there);
                # the graphs captured before go too: they share the pool, and every step from
                # here on runs eagerly
                release_graphs([g, *self.graphs.values()])
                self.graphs.clear()
                self.metrics = {}  # the last replay's outputs, in the pool
                del g
                torch.cuda.empty_cache()
                self.log(f"CUDA graphs off from here on: capturing the step failed "
                         f"({self.failed[:300]})")
                return self._eager(batch, scale)
            self.graphs[batch.key] = g
        else:
            self._fill(g, batch, scale)
        g.graph.replay()
        self.metrics = g.metrics
        return g.loss_sum

    def _fill(self, g: _Graph, batch: StagedBatch, scale: float):
        # from page-locked memory the copies are asynchronous; the host allocator keeps each
        # source block until its copy has run, so the staged batch may be dropped right away
        for name, src in batch.buffers().items():
            g.buffers[name].copy_(src, non_blocking=True)
        g.scale.fill_(scale)

    def _eager(self, batch: StagedBatch, scale: float) -> torch.Tensor:
        if self.preference is not None:
            method, opts = self.preference
            loss_sum, self.metrics = batch_loss(method, self.model, batch.source, opts)
        else:
            input_ids, position_ids, labels = batch.unpadded
            loss_sum = self.model(input_ids.to(self.device), position_ids, labels,
                                  real_lengths=batch.real_lengths)
        (loss_sum * scale).backward()
        return loss_sum.detach()

    def _body(self, g: _Graph) -> torch.Tensor:
        """What the capture records: forward, backward of loss_sum · scale; the loss sum (and a
        preference method's metric sums, in g.metrics) out."""
        if self.preference is not None:
            method, opts = self.preference
            kl = (g.kl.token_losses(self.model), g.kl.slots) if g.kl is not None else None
            loss_sum, g.metrics = staged_batch_loss(method, self.model,
                                                    g.token_losses(self.model), g.slots, opts, kl)
        else:
            loss_sum = g.forward(self.model, g.labels)
        (loss_sum * g.scale).backward()
        return loss_sum.detach()

    def _capture(self, g: _Graph) -> None:
        # warm-up runs (library handles, Triton compilation, workspaces) must not count: they
        # back-propagate the loss times 0, which adds nothing to the gradients
        scale = g.scale.clone()
        g.scale.zero_()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self._body(g)
            torch.cuda.current_stream().wait_stream(side)
            g.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g.graph, pool=self.pool,
                                  capture_error_mode=self.capture_error_mode):
                g.loss_sum = self._body(g)
        finally:
            g.scale.copy_(scale)
            torch.cuda.empty_cache()  # the warm-up's eager blocks; the graph keeps its own pool
