"""kernels/cross_entropy.py: the per-row Triton kernel (run by Triton's interpreter on the CPU)
against its torch reference; linear_cross_entropy_sum's loss and hidden-state gradient against
autograd through F.cross_entropy; what it keeps for backward; and a tiny model's loss and adapter
gradients through DecoderLM.loss_sum with a frozen head (the new path) and a trainable one (the
checkpointed chunks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from qlora.errors import QloraError
from qlora.kernels import cross_entropy as ce
from qlora.kernels.cross_entropy import IGNORE_INDEX, linear_cross_entropy_sum


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max())


def reference(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scale: float = 1.0):
    """Loss and h's gradient by autograd through the plain ops: (h @ W.T).float() -> F.cross_entropy."""
    h = h.detach().requires_grad_()
    loss = F.cross_entropy((h @ weight.T).float(), targets, reduction="sum", ignore_index=IGNORE_INDEX)
    (loss * scale).backward()
    return loss.detach(), h.grad


def inputs(n: int, hidden: int, vocab: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g).to(dtype)
    weight = (torch.randn(vocab, hidden, generator=g) / hidden**0.5 * 3).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[::5] = IGNORE_INDEX  # rows 0, 5, 10, ...: no label
    targets[1], targets[2] = 0, vocab - 1  # the first and the last column
    return h, weight, targets


# --- the kernel, interpreted ---------------------------------------------------------------------
KERNEL_CHECK = r"""
import json, torch
import torch.nn.functional as F
from qlora.kernels import cross_entropy as ce

def rel(a, b):
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max())

out = []
for dtype in (torch.float32, torch.bfloat16):
    for rows, vocab, block in ((7, 1000, 256), (5, 300, 128), (3, 64, 64)):  # 1000, 300: not a multiple
        torch.manual_seed(vocab)
        logits = (torch.randn(rows, vocab) * 5).to(dtype)
        targets = torch.randint(0, vocab, (rows,))
        targets[1] = -100
        targets[0] = vocab - 1
        got, want = logits.clone(), logits.clone()
        loss_got = ce.cross_entropy_rows(got, targets, True, block=block)
        loss_want = ce.cross_entropy_rows_reference(want, targets, True)
        untouched = logits.clone()
        loss_only = ce.cross_entropy_rows(untouched, targets, False, block=block)
        out.append(dict(dtype=str(dtype), vocab=vocab, loss=rel(loss_got, loss_want),
                        grad_abs=float((got.float() - want.float()).abs().max()),
                        ignored_row_zero=bool((got[1] == 0).all()), ignored_loss=float(loss_got[1]),
                        loss_only=rel(loss_only, loss_want), untouched=bool(torch.equal(untouched, logits)),
                        ce=rel(loss_want, F.cross_entropy(logits.float(), targets, reduction="none"))))
# the whole function through the kernel: loss and h's gradient against autograd
torch.manual_seed(1)
h = torch.randn(23, 16, requires_grad=True)
w = torch.randn(301, 16) / 2
t = torch.randint(0, 301, (23,))
t[::4] = -100
loss = ce.linear_cross_entropy_sum(h, w, t, 10)
loss.backward()
h2 = h.detach().requires_grad_()
ref = F.cross_entropy((h2 @ w.T).float(), t, reduction="sum")
ref.backward()
fn_loss, fn_grad = rel(loss, ref), rel(h.grad, h2.grad)
# Gemma's final soft-cap inside the kernel: against autograd through cap * tanh(logits / cap)
capped = {}
for dtype in (torch.float32, torch.bfloat16):
    torch.manual_seed(2)
    h = torch.randn(23, 16).to(dtype).requires_grad_()
    w = (torch.randn(301, 16) * 2).to(dtype)  # logits of tens: the cap (10) bends them
    loss = ce.linear_cross_entropy_sum(h, w, t, 10, softcap=10.0)
    loss.backward()
    h2 = h.detach().float().requires_grad_()
    logits = torch.tanh((h2 @ w.float().T) / 10.0) * 10.0
    ref = F.cross_entropy(logits, t, reduction="sum")
    ref.backward()
    uncapped = F.cross_entropy(h2.detach() @ w.float().T, t, reduction="sum")
    capped[str(dtype)] = dict(loss=rel(loss, ref), grad=rel(h.grad, h2.grad),
                              cap_matters=rel(uncapped, ref))
print(json.dumps(dict(rows=out, fn_loss=fn_loss, fn_grad=fn_grad, capped=capped)))
"""


def test_kernel_equals_the_torch_reference_under_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", KERNEL_CHECK], env=env, capture_output=True,
                          text=True, timeout=3600)  # stops a hung run only, never a slow one
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(r["rows"]) == 6
    for row in r["rows"]:
        # losses are fp32 sums either way (lse by another summation order: fp32 gradients within
        # 1e-5); bf16 only in the stored gradient, which lies in [-1, 1]:
        # the interpreter rounds to bf16 by truncation, torch to nearest (one ulp apart, 2^-8 near 1)
        assert row["loss"] < 1e-5 and row["loss_only"] < 1e-5 and row["ce"] < 1e-5, row
        assert row["grad_abs"] < (1e-5 if row["dtype"] == "torch.float32" else 2**-7), row
        assert row["ignored_row_zero"] and row["ignored_loss"] == 0.0, row
        assert row["untouched"], row  # no gradient asked: the logits are only read
    assert r["fn_loss"] < 1e-5 and r["fn_grad"] < 1e-5, r
    # soft-capped: fp32 within 1e-5 (the kernel's tanh from exp, ~1e-7 apart from torch's); bf16
    # logits and gradients rounded to bf16 where autograd's fp32 reference is not: 2^-7
    fp32, bf16 = r["capped"]["torch.float32"], r["capped"]["torch.bfloat16"]
    assert fp32["loss"] < 1e-5 and fp32["grad"] < 1e-5, r["capped"]
    assert bf16["loss"] < 2**-7 and bf16["grad"] < 2**-7, r["capped"]
    assert fp32["cap_matters"] > 1e-2, r["capped"]


# --- linear_cross_entropy_sum (the torch reference on the CPU) --------------------------------------
@pytest.mark.parametrize("chunk", [1, 8, 10, 37, 64])  # 10 does not divide 37; 64 > N
def test_loss_and_gradient_equal_autograd_fp32(chunk):
    h, weight, targets = inputs(37, 16, 53, torch.float32)
    want_loss, want_grad = reference(h, weight, targets, scale=0.37)
    x = h.clone().requires_grad_()
    loss = linear_cross_entropy_sum(x, weight, targets, chunk)
    (loss * 0.37).backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert rel(loss, want_loss) < 1e-6
    assert rel(x.grad, want_grad) < 1e-5
    assert torch.all(x.grad[targets == IGNORE_INDEX] == 0)


@pytest.mark.parametrize("chunk", [4, 13])
def test_loss_and_gradient_equal_autograd_bf16(chunk):
    h, weight, targets = inputs(30, 32, 70, torch.bfloat16, seed=3)
    want_loss, want_grad = reference(h, weight, targets)
    x = h.clone().requires_grad_()
    loss = linear_cross_entropy_sum(x, weight, targets, chunk)
    loss.backward()
    assert x.grad.dtype == torch.bfloat16
    assert rel(loss, want_loss) < 1e-5  # the same bf16 logits, summed in fp32 either way
    assert rel(x.grad, want_grad) < 1e-2  # bf16 GEMMs of the same rounded dlogits


@pytest.mark.parametrize("chunk", [8, 37])
def test_per_row_losses_and_weighted_gradient_equal_autograd_fp32(chunk):
    """linear_cross_entropy_rows: each row's loss, and the gradient of a weighted sum of them (a
    preference loss weighs each sequence's tokens by its own factor), as autograd gives them."""
    h, weight, targets = inputs(37, 16, 53, torch.float32, seed=4)
    row_weights = torch.linspace(-2.0, 3.0, 37)
    x = h.detach().requires_grad_()
    want = F.cross_entropy((x @ weight.T).float(), targets, reduction="none",
                           ignore_index=IGNORE_INDEX)
    (want * row_weights).sum().backward()
    y = h.clone().requires_grad_()
    got = ce.linear_cross_entropy_rows(y, weight, targets, chunk)
    (got * row_weights).sum().backward()
    assert got.shape == (37,) and got.dtype == torch.float32
    assert rel(got, want) < 1e-6  # fp32 either way, one row's logsumexp in another order
    assert rel(y.grad, x.grad) < 1e-5
    assert torch.all(got[targets == IGNORE_INDEX] == 0)
    with torch.no_grad():
        assert rel(ce.linear_cross_entropy_rows(h, weight, targets, chunk), want) < 1e-6


def test_no_labels_give_zero_loss_and_gradient():
    h, weight, _ = inputs(6, 8, 11, torch.float32)
    x = h.clone().requires_grad_()
    loss = linear_cross_entropy_sum(x, weight, torch.full((6,), IGNORE_INDEX), 4)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.all(x.grad == 0)


def test_backward_keeps_the_gradient_of_h_alone():
    """What the loss leaves for backward: one [N, H] tensor in h's dtype (neither h nor any
    logits), which qlora.memory.loss.loss_peak_bytes counts."""
    h, weight, targets = inputs(20, 16, 40, torch.bfloat16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        linear_cross_entropy_sum(h.clone().requires_grad_(), weight, targets, 6)
    assert [(tuple(t.shape), t.dtype) for t in saved] == [((20, 16), torch.bfloat16)]


def test_no_gradient_is_made_where_none_is_wanted(monkeypatch):
    asked = []
    rows = ce.cross_entropy_rows
    monkeypatch.setattr(ce, "cross_entropy_rows", lambda lg, t, write_grad, **kw: asked.append(write_grad)
                        or rows(lg, t, write_grad, **kw))
    h, weight, targets = inputs(12, 8, 30, torch.float32)
    want, _ = reference(h, weight, targets)
    x = h.clone().requires_grad_()
    with torch.no_grad():
        evaluated = linear_cross_entropy_sum(x, weight, targets, 5)
    frozen_input = linear_cross_entropy_sum(h, weight, targets, 5)  # grad on, h wants none
    assert asked == [False] * 6
    assert evaluated.grad_fn is None and frozen_input.grad_fn is None
    assert rel(evaluated, want) < 1e-6 and rel(frozen_input, want) < 1e-6
    linear_cross_entropy_sum(x, weight, targets, 5)
    assert asked[6:] == [True] * 3


def test_a_trainable_head_is_refused():
    h, weight, targets = inputs(4, 8, 10, torch.float32)
    with pytest.raises(QloraError, match=r"lm_head\.weight.*requires_grad_\(False\)"):
        linear_cross_entropy_sum(h, weight.requires_grad_(), targets, 2)


def test_mismatched_inputs_are_refused():
    h, weight, targets = inputs(4, 8, 10, torch.float32)
    with pytest.raises(QloraError, match="one target per row"):
        linear_cross_entropy_sum(h, weight, targets[:3], 2)
    with pytest.raises(QloraError, match="one dtype"):
        linear_cross_entropy_sum(h.bfloat16(), weight, targets, 2)
    with pytest.raises(QloraError, match="chunk_tokens"):
        linear_cross_entropy_sum(h, weight, targets, 0)


# --- through the decoder -----------------------------------------------------------------------------
def tiny_lora_model(dtype: torch.dtype):
    from qlora.adapters import AdapterConfig, attach_adapters
    from qlora.models.load import random_model
    from qlora.models.spec import spec_from_config
    from qlora.quant import QuantConfig
    from qlora.speed import SpeedPlan, apply_speed

    cfg = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=97, rms_norm_eps=1e-5,
               rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=False)
    model = random_model(spec_from_config(cfg), QuantConfig(method="none", compute_dtype=dtype), seed=1)
    attach_adapters(model, AdapterConfig(r=4, alpha=8, dropout=0.0))  # freezes lm_head
    with torch.no_grad():  # B away from 0: every adapter carries gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    # the training step's loss (kernels/cross_entropy.py) is the speed layer's: every path else off
    apply_speed(model, SpeedPlan())
    model.loss_chunk_tokens = 7  # several chunks, the last one short
    return model.train()


def head_rows(monkeypatch, model) -> list[int]:
    """Rows of every lm_head GEMM (the module's or kernels/cross_entropy.py's)."""
    rows, linear = [], F.linear

    def counted(x, w, b=None):
        if w is model.lm_head.weight:
            rows.append(x.shape[0])
        return linear(x, w, b)

    monkeypatch.setattr(F, "linear", counted)
    return rows


def step(model, ids, labels, all_positions=False):
    """Loss and adapter gradients; all_positions: the CUDA-graph capture path, on the CPU."""
    model.zero_grad()
    if all_positions:
        targets = torch.full_like(labels, IGNORE_INDEX)
        targets[:, :-1] = labels[:, 1:]
        loss = model._loss_sum_all_positions(model.hidden_states(ids), targets.reshape(-1))
    else:
        loss = model(ids, labels=labels)
    loss.backward()
    return loss.detach(), {n: p.grad.float().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("all_positions", [False, True])
def test_tiny_model_gives_the_loss_and_gradients_of_the_checkpointed_path(monkeypatch, dtype,
                                                                            all_positions):
    model = tiny_lora_model(dtype)
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(5))
    labels = ids.clone()
    labels[0, :6] = IGNORE_INDEX  # a prompt without labels
    rows = head_rows(monkeypatch, model)
    assert not model.lm_head.weight.requires_grad
    new_loss, new_grads = step(model, ids, labels, all_positions)
    new_rows, rows[:] = list(rows), []
    model.lm_head.weight.requires_grad_(True)  # the old path: checkpointed chunks
    old_loss, old_grads = step(model, ids, labels, all_positions)
    positions = 2 * 20 if all_positions else 2 * 19 - 5  # targets are labels shifted by one
    # the head's GEMM once per chunk of at most 7 rows; the old path recomputes each in backward
    assert sum(new_rows) == positions and max(new_rows) == 7
    assert sum(rows) == 2 * positions
    assert len(new_grads) == 2 * 7 * 2 and any(g.abs().sum() > 0 for g in new_grads.values())
    fp32 = dtype == torch.float32
    assert rel(new_loss, old_loss) < (1e-6 if fp32 else 1e-5)
    for name, g in new_grads.items():
        assert rel(g, old_grads[name]) < (1e-5 if fp32 else 1e-2), name


def test_evaluation_through_the_model_equals_the_checkpointed_path():
    model = tiny_lora_model(torch.float32).eval()
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        new = model(ids, labels=ids)
        model.lm_head.weight.requires_grad_(True)
        old = model(ids, labels=ids)
    assert rel(new, old) < 1e-6
