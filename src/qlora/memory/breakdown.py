"""The plan's answer: Breakdown (bytes per GPU by part, at each moment of the step that may be the
peak), whether it fits a GPU (with the allocator's usual slack, or tightly), and its table."""

from __future__ import annotations

from dataclasses import dataclass, field

from qlora.memory.host import embedding_in_host_memory
from qlora.memory.settings import PlanConfig
from qlora.memory.sizes import CUDA_CONTEXT_BYTES, RESERVED_FACTOR, gib
from qlora.models.spec import ArchSpec


@dataclass
class Breakdown:
    """Bytes per GPU. `allocated` is what torch.cuda.max_memory_allocated should read.

    static: what lives across steps. Then three moments of a step, each of which may be the peak:
    the loss's peak (its forward for `chunked-fused`, its backward otherwise: all activations still
    saved, no adapter gradient yet: they are set to None after every step and made during
    backward), the last layer's backward, and the optimizer step (every gradient, activations
    freed); DPO and KTO a fourth, the reference forward, after the policy's loss and before its
    backward (all the policy's activations saved).
    """

    arch: ArchSpec
    cfg: PlanConfig
    base: int  # quantized (or 16-bit) decoder linears, with their biases
    embeddings: int  # embed_tokens + lm_head (once when tied)
    norms: int
    adapters: int  # master weights
    optimizer: int  # states inside PyTorch's allocator
    optimizer_paged: int  # paged states: GPU memory, but outside memory_allocated
    activations: int  # saved for backward at the end of the forward (per-token tensors)
    adapter_copies: int  # per-layer tensors the graph keeps (bf16 adapter copies, DoRA weights)
    # what of them is alive at the loss: every layer's without checkpointing, under it the
    # layers keep_activations leaves whole
    forward_copies: int
    loss: int  # logits/loss transient
    backward: int  # one layer's backward: recomputed layer (checkpointing) + gradients in flight
    adapter_grads: int  # all adapter gradients (alive at the optimizer step)
    layer_grads: int  # one layer's adapter gradients (alive in the last layer's backward)
    optimizer_step: int  # temporaries during optimizer.step()
    workspace: int  # cuBLAS workspaces + batch tensors (always) + dequantized weight (in a matmul)
    dequant: int  # the part of workspace alive only inside a quantized matmul
    adapter_params: int = 0
    reference: int = 0  # DPO / KTO: the reference forward's own moment (reference_forward_bytes)
    notes: list[str] = field(default_factory=list)
    # what of `activations` is still alive at the layer backward that peaks (None: all of it):
    # the final norm's and the loss's tensors are gone by then, and at an earlier layer's
    # backward the later layers' inputs and kept attention too
    backward_activations: int | None = None
    flat_grads: bool = False  # every adapter gradient alive in every phase (PlanConfig.flat_grads)

    @property
    def static(self) -> int:
        return self.base + self.embeddings + self.norms + self.adapters + self.optimizer

    def phases(self) -> dict[str, list[tuple[str, int]]]:
        """The rows alive on top of `static` at each candidate peak."""
        fixed = ("workspace (cuBLAS, batch)", self.workspace - self.dequant)
        acts = ("activations saved for backward" + (" (checkpointed)" if self.cfg.checkpointing else ""),
                self.activations)
        left = self.activations if self.backward_activations is None else self.backward_activations
        acts_left = ("activations still saved" + (" (checkpointed)" if self.cfg.checkpointing else ""),
                     left)
        copies = ("adapter compute copies kept by autograd" + (" (one layer)" if self.cfg.checkpointing else ""),
                  self.adapter_copies)
        grads = {"loss": ("adapter gradients (none yet)", 0),
                 "backward": ("adapter gradients (last layer)", self.layer_grads)}
        if self.flat_grads:
            # all of them in the buffer; in backward also one layer's as autograd makes them,
            # before they are added into it
            grads = {"loss": ("adapter gradients (flat buffer, all)", self.adapter_grads),
                     "backward": ("adapter gradients (flat buffer, all; one layer's in flight)",
                                  self.adapter_grads + self.layer_grads)}
        phases = {
            "loss (logits)": [
                acts, (copies[0], self.forward_copies),
                grads["loss"], ("logits/loss", self.loss), fixed],
            "backward of the last layer": [
                acts_left, copies, grads["backward"],
                ("recomputed layer + gradients in flight" if self.cfg.checkpointing else "gradients in flight",
                 self.backward),
                fixed, ("dequantized weight", self.dequant)],
            "optimizer step": [
                ("adapter gradients (all)", self.adapter_grads), ("optimizer step temporaries", self.optimizer_step),
                fixed],
        }
        if self.reference:
            phases["reference forward"] = [
                acts, (copies[0], self.forward_copies), grads["loss"],
                ("reference forward (no grad, adapters off) + the policy's kept loss gradient",
                 self.reference),
                fixed, ("dequantized weight", self.dequant)]
        return phases

    @property
    def peak_phase(self) -> str:
        return max(self.phases().items(), key=lambda kv: sum(n for _, n in kv[1]))[0]

    @property
    def allocated(self) -> int:
        return self.static + sum(n for _, n in self.phases()[self.peak_phase])

    @property
    def transient(self) -> int:
        return max(self.loss, self.backward)

    @property
    def total(self) -> int:
        """GPU memory the run needs: allocated peak + paged optimizer states."""
        return self.allocated + self.optimizer_paged

    @property
    def reserved_estimate(self) -> int:
        return int(self.allocated * RESERVED_FACTOR)

    def parts(self) -> list[tuple[str, int]]:
        """(label, bytes) rows of the table, in the order they add up to `allocated`."""
        c = self.cfg
        base = {"none": "16-bit base (bf16)", "int8": "8-bit base (LLM.int8)"}.get(
            c.quant, f"4-bit base ({c.quant}{', double quant' if c.double_quant else ''})")
        emb = f"16-bit embeddings + lm_head ({'tied' if self.arch.tie_word_embeddings else 'untied'}, {c.nonquant_dtype})"
        if embedding_in_host_memory(self.arch, c):
            emb = f"16-bit lm_head ({c.nonquant_dtype}; the input embedding in host memory)"
        rows = [
            (base, self.base),
            (emb, self.embeddings),
            ("norms" if isinstance(self.arch, ArchSpec) else "other 16-bit parameters (norms...)",
             self.norms),
            (f"adapters ({self.adapter_params:,} params, {c.adapter_dtype})", self.adapters),
            (f"optimizer states ({c.optimizer}, in allocator)", self.optimizer),
        ]
        phase = self.peak_phase
        rows += [(f"[{phase}] {label}", n) for label, n in self.phases()[phase]]
        return rows


# --- does it fit ----------------------------------------------------------------------------------
def needed_bytes(b: Breakdown) -> int:
    """What the GPU must have: allocated x allocator slack + paged states + the CUDA context."""
    return int(b.allocated * RESERVED_FACTOR) + b.optimizer_paged + CUDA_CONTEXT_BYTES


def fits(b: Breakdown, gpu_bytes: int) -> bool:
    """Fits with the allocator's usual slack: what the planner's own choices (kept attention,
    offload, tiles, auto-fit) require, so that they never pick a configuration on the edge."""
    return needed_bytes(b) <= gpu_bytes


def least_needed_bytes(b: Breakdown) -> int:
    """What the GPU must have at the very least: the allocated peak, the paged states and the CUDA
    context, with no cached-but-free slack. The allocator gives its cache back and retries before
    it reports out of memory, so a run between this and `needed_bytes` can train: Qwen3-30B-A3B
    (planned 21.84 GiB allocated) trained under a 22.35 GiB allocator cap at 21.53 allocated,
    22.06 reserved, its step in a CUDA graph (H100, 2026-12-07), where the usual slack asks for
    ~30 GiB."""
    return b.allocated + b.optimizer_paged + CUDA_CONTEXT_BYTES


def fits_tightly(b: Breakdown, gpu_bytes: int) -> bool:
    """Does not fit with the usual slack, but its allocated peak does: it may train, with the
    allocator near full (`qlora train` warns and goes on; only below this does it refuse)."""
    return not fits(b, gpu_bytes) and least_needed_bytes(b) <= gpu_bytes


def tight_fit_line(b: Breakdown, gpu_bytes: int, gpu_name: str) -> str:
    """What `qlora plan` and `qlora train` say of a tight fit."""
    spare = gpu_bytes - least_needed_bytes(b)
    # every term least_needed_bytes takes, named, so that the numbers add up on the page
    paged = (f" + paged optimizer states ~{gib(b.optimizer_paged):.2f} GiB"
             if b.optimizer_paged else "")
    return (f"may fit on {gpu_name}, tightly: peak allocated ~{gib(b.allocated):.2f} GiB{paged} + "
            f"CUDA context ~{gib(CUDA_CONTEXT_BYTES):.2f} GiB leave ~{gib(spare):.2f} GiB of "
            f"{gib(gpu_bytes):.1f} for the allocator's cached "
            f"blocks, where ~{gib(needed_bytes(b)):.1f} GiB is the usual need (reserved measured "
            f"1.01-1.29x allocated without a cap); PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "
            "cuts fragmentation. If it runs out of memory, change one of:")


def format_table(b: Breakdown) -> str:
    rows = b.parts()
    width = max(len(label) for label, _ in rows) + 2
    lines = [f"{'part':<{width}}{'GiB':>8}", "-" * (width + 8)]
    lines += [f"{label:<{width}}{gib(n):>8.2f}" for label, n in rows]
    lines.append("-" * (width + 8))
    lines.append(f"{'peak allocated (torch.cuda.max_memory_allocated)':<{width}}{gib(b.allocated):>8.2f}")
    if b.optimizer_paged:
        lines.append(f"{'+ paged optimizer states (managed memory)':<{width}}{gib(b.optimizer_paged):>8.2f}")
    lines.append(f"{'total GPU memory of the run':<{width}}{gib(b.total):>8.2f}")
    lines.append(f"{'needed on the GPU (advice: slack, CUDA context)':<{width}}{gib(needed_bytes(b)):>8.2f}")
    lines.append(f"  = allocated x {RESERVED_FACTOR:.2f} (reserved, estimate) + paged states "
                 f"+ {gib(CUDA_CONTEXT_BYTES):.2f} GiB CUDA context")
    lines.append(f"peak phase: {b.peak_phase}")
    lines += [f"note: {n}" for n in b.notes]
    return "\n".join(lines)
