"""Cross-entropy over a frozen output head whose backward recomputes nothing.

Why: DecoderLM's loss used to checkpoint each chunk of rows, so the lm_head GEMM and the fp32
softmax ran twice per step (~5 of 205 ms of a Llama-3-8B step on an H100). With lm_head frozen
(every LoRA run), the loss's only gradient is that of the hidden states, and it is cheap to make
while the chunk's logits exist: per chunk of rows,

    logits  = h @ W.T                              in h's dtype (the bf16 GEMM, as before)
    loss    = logsumexp(logits) - logits[target]   per row, in fp32
    dlogits = softmax(logits) - onehot(target)     in fp32, rounded to h's dtype over the logits
    grad_h  = dlogits @ W                          [rows, H], kept for backward

Backward is then grad_h * grad_output. Rows whose target is IGNORE_INDEX add 0 to the loss and get
a zero gradient. dlogits is rounded where autograd rounded it before (the cast back from the fp32
loss to the bf16 logits, ahead of the lm_head backward GEMM); it is made for a loss scale of 1 and
grad_h is scaled afterwards, so a scale that is not a power of two rounds once more than autograd's.

The per-row step (logsumexp, loss, gradient in place) is one Triton kernel where Triton runs
(dropout.use_triton: CUDA, or the CPU under TRITON_INTERPRET=1) and plain torch elsewhere;
`cross_entropy_rows_reference` is that torch code, which tests/test_cross_entropy.py compares the
kernel with. Memory at the loss's peak (forward now): one chunk's logits in h's dtype, one fp32
loss per row, and grad_h for every row (qlora.memory.loss.loss_peak_bytes counts them).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from qlora.errors import QloraError
from qlora.kernels.dropout import use_triton
from qlora.models.decoder import IGNORE_INDEX

VOCAB_BLOCK = 4096  # logits per loop iteration of one row's program


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def cross_entropy_rows(logits_ptr, targets_ptr, loss_ptr, ignore_index, cap,
                           N_COLS: tl.constexpr, WRITE_GRAD: tl.constexpr, CAPPED: tl.constexpr,
                           BLOCK: tl.constexpr):
        """One row per program: loss = logsumexp - logit[target] (0 for an ignored row); with
        WRITE_GRAD, softmax - onehot(target) (zeros for an ignored row) over the row's logits.
        CAPPED: each logit x is first soft-capped, cap · tanh(x / cap), and the gradient written
        is the uncapped logits' (times 1 - tanh², the cap's derivative). tanh(y) is written
        1 - 2 / (exp(2y) + 1): exp's inf and 0 at the extremes give ±1 exactly.
        The vocabulary is a constant (one compile per model): the interpreter cannot loop up to a
        runtime bound, and a constant trip count lets the compiler pipeline the loads."""
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * N_COLS
        target = tl.load(targets_ptr + row)
        labelled = target != ignore_index
        cols = tl.arange(0, BLOCK)
        # pass 1: running max and sum of exp(x - max), rescaled whenever the max grows
        running_max = float("-inf")
        running_sum = 0.0
        for start in range(0, N_COLS, BLOCK):
            inside = start + cols < N_COLS
            x = tl.load(base + start + cols, mask=inside, other=0.0).to(tl.float32)
            if CAPPED:
                x = cap * (1.0 - 2.0 / (tl.exp(2.0 * x / cap) + 1.0))  # cap·tanh(x/cap)
            x = tl.where(inside, x, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(x, axis=0))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
            running_max = new_max
        lse = running_max + tl.log(running_sum)
        target_logit = tl.load(base + target, mask=labelled, other=0.0).to(tl.float32)
        if CAPPED:
            target_logit = cap * (1.0 - 2.0 / (tl.exp(2.0 * target_logit / cap) + 1.0))
        tl.store(loss_ptr + row, tl.where(labelled, lse - target_logit, 0.0))
        if WRITE_GRAD:
            # pass 2: over the same buffer; each block is read before it is overwritten
            keep = tl.where(labelled, 1.0, 0.0)
            for start in range(0, N_COLS, BLOCK):
                offsets = start + cols
                inside = offsets < N_COLS
                x = tl.load(base + offsets, mask=inside, other=0.0).to(tl.float32)
                if CAPPED:
                    x = cap * (1.0 - 2.0 / (tl.exp(2.0 * x / cap) + 1.0))  # cap·tanh(x/cap)
                grad = tl.exp(x - lse) - tl.where(offsets == target, 1.0, 0.0)
                if CAPPED:
                    tanh = x / cap
                    grad = grad * (1.0 - tanh * tanh)
                tl.store(base + offsets, (grad * keep).to(logits_ptr.dtype.element_ty), mask=inside)

    return dict(cross_entropy_rows=cross_entropy_rows)


def cross_entropy_rows_reference(logits: torch.Tensor, targets: torch.Tensor,
                                 write_grad: bool, softcap: float | None = None) -> torch.Tensor:
    """The per-row step in torch: fp32 losses [rows]; with write_grad, softmax - onehot(target)
    over `logits` in place, rounded to its dtype (zeros on rows whose target is IGNORE_INDEX).
    `softcap`: the loss of the capped logits cap · tanh(x / cap) (Gemma's final soft-cap, in
    fp32), and the gradient of the uncapped ones (times 1 - tanh²)."""
    x = logits.float()
    tanh = None
    if softcap is not None:
        tanh = torch.tanh(x / softcap)
        x = tanh * softcap
    lse = torch.logsumexp(x, dim=-1)
    ignored = targets == IGNORE_INDEX
    safe = targets.masked_fill(ignored, 0).unsqueeze(1)
    loss = (lse - x.gather(1, safe).squeeze(1)).masked_fill(ignored, 0.0)
    if write_grad:
        grad = torch.exp(x.sub_(lse.unsqueeze(1)))  # x is a copy unless logits are fp32: done with it
        grad.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=grad.dtype))
        if tanh is not None:
            grad.mul_(1.0 - tanh * tanh)
        logits.copy_(grad.masked_fill_(ignored.unsqueeze(1), 0.0))
    return loss


def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, write_grad: bool,
                       block: int = VOCAB_BLOCK, softcap: float | None = None) -> torch.Tensor:
    """The Triton kernel where Triton runs, else the reference; logits [rows, V] contiguous,
    targets [rows] int64. `block`: logits per loop iteration (a power of two)."""
    if not use_triton(logits) or logits.numel() == 0:
        return cross_entropy_rows_reference(logits, targets, write_grad, softcap)
    rows, vocab = logits.shape
    losses = torch.empty(rows, device=logits.device, dtype=torch.float32)
    block = min(block, 1 << max(vocab - 1, 0).bit_length())
    _kernels()["cross_entropy_rows"][(rows,)](logits, targets, losses, IGNORE_INDEX,
                                              float(softcap or 1.0), N_COLS=vocab,
                                              WRITE_GRAD=write_grad, CAPPED=softcap is not None,
                                              BLOCK=block,
                                              num_warps=min(16, max(4, block // 256)))
    return losses


def _loss_and_grad(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
                   want_grad: bool, per_row: bool = False, softcap: float | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The summed loss (fp32 scalar), or with per_row each row's loss (fp32 [N]); with want_grad,
    each row's d(its loss)/dh [N, H] in h's dtype (the same rows whichever the loss); `softcap`:
    the logits' soft-cap applied inside (Gemma's final_logit_softcapping)."""
    total = h.new_zeros((), dtype=torch.float32)
    losses = h.new_empty(h.shape[0], dtype=torch.float32) if per_row else None
    grad_h = torch.empty_like(h) if want_grad else None
    for start in range(0, h.shape[0], chunk_tokens):
        end = start + chunk_tokens
        logits = F.linear(h[start:end], weight)  # what lm_head computes
        rows = cross_entropy_rows(logits, targets[start:end], want_grad, softcap=softcap)
        if per_row:
            losses[start:end] = rows
        else:
            total = total + rows.sum()
        if want_grad:  # logits now hold dlogits
            torch.mm(logits, weight, out=grad_h[start:end])
        del logits  # the next chunk's logits reuse its memory
    return (losses if per_row else total), grad_h


class LinearCrossEntropySum(torch.autograd.Function):
    """Saves grad_h alone (not h, not logits); save_for_backward, not a ctx attribute, so autograd
    frees it as soon as this backward has run, not when the graph goes."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
                softcap: float | None = None):
        total, grad_h = _loss_and_grad(h, weight, targets, chunk_tokens, want_grad=True,
                                       softcap=softcap)
        ctx.save_for_backward(grad_h)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_output, None, None, None, None


class LinearCrossEntropyRows(torch.autograd.Function):
    """Each row's loss; its gradient is that row's grad_h times the row's incoming gradient (a
    preference loss weighs each sequence's tokens by its own factor), taken in fp32 and rounded
    once to h's dtype."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
                softcap: float | None = None):
        losses, grad_h = _loss_and_grad(h, weight, targets, chunk_tokens, want_grad=True,
                                        per_row=True, softcap=softcap)
        ctx.save_for_backward(grad_h)
        ctx.chunk_tokens = chunk_tokens
        return losses

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad_h,) = ctx.saved_tensors
        out = torch.empty_like(grad_h)
        for start in range(0, grad_h.shape[0], ctx.chunk_tokens):  # the fp32 product a chunk at a time
            end = start + ctx.chunk_tokens
            out[start:end] = grad_h[start:end].float() * grad_output[start:end, None]
        return out, None, None, None, None


def _check(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
           name: str = "linear_cross_entropy_sum") -> None:
    if weight.requires_grad:
        raise QloraError(f"{name} makes no gradient for the output head, but "
                         "lm_head.weight requires one; freeze it (lm_head.weight.requires_grad_(False)) "
                         "or use DecoderLM's checkpointed chunk loss, which trains it")
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise QloraError(f"{name} needs h [N, H] and weight [V, H], got "
                         f"{tuple(h.shape)} and {tuple(weight.shape)}")
    if targets.shape != h.shape[:1]:
        raise QloraError(f"{name} needs one target per row of h ({h.shape[0]}), "
                         f"got targets of shape {tuple(targets.shape)}")
    if h.dtype != weight.dtype:
        raise QloraError(f"{name} needs h and weight in one dtype, got {h.dtype} "
                         f"and {weight.dtype}; cast the hidden states to lm_head's dtype")
    if not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise QloraError(f"chunk_tokens must be a positive whole number, not {chunk_tokens!r}")


def linear_cross_entropy_sum(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             chunk_tokens: int, softcap: float | None = None) -> torch.Tensor:
    """Sum over rows of h [N, H] whose target (int64 [N]) is not IGNORE_INDEX of the cross-entropy
    of logits h @ weight.T (soft-capped first where `softcap` is given: Gemma's
    final_logit_softcapping), as an fp32 scalar; weight [V, H] must be frozen. Logits exist
    chunk_tokens rows at a time. h's gradient is made here, only where one is wanted (grad
    enabled and h requiring grad); evaluation computes the loss alone."""
    _check(h, weight, targets, chunk_tokens)
    h = h.contiguous()
    targets = targets.contiguous()
    if torch.is_grad_enabled() and h.requires_grad:
        return LinearCrossEntropySum.apply(h, weight, targets, chunk_tokens, softcap)
    total, _ = _loss_and_grad(h, weight, targets, chunk_tokens, want_grad=False, softcap=softcap)
    return total


def linear_cross_entropy_rows(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              chunk_tokens: int, softcap: float | None = None) -> torch.Tensor:
    """linear_cross_entropy_sum's losses, one per row of h (fp32 [N], 0 where the target is
    IGNORE_INDEX; soft-capped logits where `softcap` is given), with h's gradient made in forward
    in the same way."""
    _check(h, weight, targets, chunk_tokens, "linear_cross_entropy_rows")
    h = h.contiguous()
    targets = targets.contiguous()
    if torch.is_grad_enabled() and h.requires_grad:
        return LinearCrossEntropyRows.apply(h, weight, targets, chunk_tokens, softcap)
    losses, _ = _loss_and_grad(h, weight, targets, chunk_tokens, want_grad=False, per_row=True,
                               softcap=softcap)
    return losses
