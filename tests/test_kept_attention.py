"""keep_attention: a checkpointed layer's first run keeps its attention's autograd graph and the
rerun skips q, k, v's base GEMM, RoPE and attention (speed/kept_attention.AttentionKeptForRerun).

Against the same step without it: the same loss and adapter gradients (the same ops run, only
once instead of twice), fewer attention forwards and 4-bit matmuls, and the kept graph holds no
copy of q, k, v's projection output that its backward does not read.
"""

from __future__ import annotations

import pytest
import torch

from qlora.adapters import set_dropout_seed
from qlora.kernels import matmul_4bit
from qlora.models import attention as attention_module
from qlora.speed import SpeedPlan, apply_speed, fast_decoder
from qlora.speed.kept_attention import KeptAttention

from test_dequant_kernel import assert_same_runs  # noqa: E402
from test_grouped_fast_path import tiny_family_model  # noqa: E402


def counted_step(model, ids, seed, stride, monkeypatch):
    """(loss, adapter gradients, attention forwards, 4-bit matmul forwards) of one step."""
    counts = {"attention": 0, "matmul": 0}
    sdpa, matmul = attention_module.sdpa, matmul_4bit.Matmul4bit.forward

    def counted_sdpa(*args):
        counts["attention"] += 1
        return sdpa(*args)

    def counted_matmul(ctx, *args):
        counts["matmul"] += 1
        return matmul(ctx, *args)

    monkeypatch.setattr(attention_module, "sdpa", counted_sdpa)
    monkeypatch.setattr(matmul_4bit.Matmul4bit, "forward", staticmethod(counted_matmul))
    model.zero_grad()
    set_dropout_seed(seed, run_seed=3, micro_batch_index=1, stride=stride)
    loss = model(ids, labels=ids)
    loss.backward()
    monkeypatch.undo()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    return loss.detach(), grads, counts["attention"], counts["matmul"]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("group", [True, False])
def test_kept_attention_gives_the_same_step_without_rerunning_attention(family, dropout, group,
                                                                       monkeypatch):
    model = tiny_family_model(family, dropout)
    model.gradient_checkpointing = True
    model.train()
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(2))
    runs = []
    for keep in (False, True):
        applied = apply_speed(model, SpeedPlan(fast_base=True, grouped=group, seeded_dropout=True,
                                               keep_attention=keep))
        runs.append(counted_step(model, ids, applied.dropout_seed, applied.dropout_stride,
                                 monkeypatch))
    (loss, grads, attention, matmuls), (kept_loss, kept_grads, kept_attention, kept_matmuls) = runs
    assert_same_runs([(loss, grads), (kept_loss, kept_grads)])
    layers = len(model.model.layers)
    assert (attention, kept_attention) == (2 * layers, layers)  # the rerun ran no attention
    # grouped: one matmul per group (q,k,v; o; gate,up; down); down's is never rerun (it ends
    # the checkpointed block), and with kept attention neither is q,k,v's
    per_layer = 4 if group else 7
    rerun = per_layer - 1
    assert matmuls == layers * (per_layer + rerun)
    assert kept_matmuls == layers * (per_layer + rerun - (1 if group else 0))


def test_attention_kept_in_the_last_n_layers_only(monkeypatch):
    """keep_attention N: the last N layers keep it (their backward runs first), the others rerun
    it; the step is the same."""
    model = tiny_family_model("llama", 0.1)

    def plan(keep):
        return SpeedPlan(fast_base=True, grouped=True, seeded_dropout=True, keep_attention=keep)

    model.gradient_checkpointing = True
    model.train()
    layers = len(model.model.layers)
    assert layers >= 2
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(2))
    applied = apply_speed(model, plan(False))
    runs = [counted_step(model, ids, applied.dropout_seed, applied.dropout_stride, monkeypatch)]
    kept_in, checkpointed = [], fast_decoder.CheckpointedLayer

    def recording(layer, keep):
        kept_in.append(keep)
        return checkpointed(layer, keep)

    applied = apply_speed(model, plan(1))
    monkeypatch.setattr(fast_decoder, "CheckpointedLayer", recording)  # counted_step undoes it
    runs.append(counted_step(model, ids, applied.dropout_seed, applied.dropout_stride, monkeypatch))
    assert_same_runs([run[:2] for run in runs])
    assert kept_in == [False] * (layers - 1) + [True]
    assert runs[1][2] == 2 * layers - 1  # one layer's rerun made no attention
    apply_speed(model, plan(layers + 1))
    with pytest.raises(Exception, match="keep_attention"):
        model(ids, labels=ids)


def test_the_kept_graph_releases_the_projection_output_it_does_not_read():
    """Grouped q, k, v are column views of one projection output. The kept graph saves RoPE'd
    q and k and a copy of v, not that output, so its memory goes when the first run ends."""
    model = tiny_family_model("llama", 0.0)
    apply_speed(model, SpeedPlan(fast_base=True, grouped=True, keep_attention=True))
    model.gradient_checkpointing = True
    model.train()
    kept = []
    init = KeptAttention.__init__

    def recorded(self):
        init(self)
        kept.append(self)

    KeptAttention.__init__ = recorded
    try:
        ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(1))
        loss = model(ids, labels=ids)
    finally:
        KeptAttention.__init__ = init
    assert len(kept) == len(model.model.layers)
    for k in kept:
        assert k.first_run_done and k.output is not None
        assert all(t.untyped_storage().nbytes() == 0 for t in k.inputs)
    loss.backward()
    assert all(k.output is None and k.inputs == () for k in kept)  # the backward let them go


def test_a_second_backward_through_kept_attention_is_refused_with_the_fix():
    model = tiny_family_model("llama", 0.0)
    apply_speed(model, SpeedPlan(fast_base=True, grouped=True, keep_attention=True))
    model.gradient_checkpointing = True
    model.train()
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(1))
    loss = model(ids, labels=ids)
    loss.backward(retain_graph=True)
    with pytest.raises(Exception, match="keep_attention: false"):
        loss.backward()
