"""The host work of a step done ahead of the GPU: a CUDA-graph batch staged apart from its replay
(train/graphs.stage_batch), and the loop's windows built one step early (train/windows.WindowBuilder)
must be exactly the micro-batches the plain order gives."""

from __future__ import annotations

import random

import pytest
import torch

from qlora.data import build_rows, iterate_batches
from qlora.train.distributed import DistEnv
from qlora.train.graphs import document_offsets, pad_batch, stage_batch
from qlora.train.windows import IGNORE, WindowBuilder, window_after


@pytest.mark.parametrize("pos,pad_to,key,cu", [
    # 2 rows of 5 padded to 8: 5 documents (the padding is one per row) in 8 slots
    ([[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]], 8, (2, 8, 8), [0, 3, 5, 8, 13, 16, 16, 16, 16]),
    # one document a row: no offsets (causal attention), padded or not
    ([[0, 1, 2, 3]], 4, (1, 4, 0), [0]),
    ([[0, 1, 2], [0, 1, 2]], 4, (2, 4, 0), [0]),
    # two documents, already a multiple of pad_to: no padding document; at least 4 slots
    ([[0, 1, 0, 1]], 4, (1, 4, 4), [0, 2, 4, 4, 4]),
    # 4 documents: exactly 4 slots, no repeated offset
    ([[0, 1, 0, 1, 0, 1, 2]], 4, (1, 8, 4), [0, 2, 4, 7, 8]),
])
def test_staged_batch_is_the_padded_layout_and_its_offsets(pos, pad_to, key, cu):
    pos = torch.tensor(pos)
    ids = torch.arange(pos.numel()).view_as(pos) + 7
    labels = ids.clone()
    labels[:, 0] = IGNORE
    staged = stage_batch(ids, pos, labels, pad_to, pinned=False)
    want_ids, want_pos, want_labels = pad_batch(ids, pos, labels, key[1])
    assert staged.key == key
    assert torch.equal(staged.input_ids, want_ids) and torch.equal(staged.labels, want_labels)
    assert torch.equal(staged.position_ids, want_pos)
    assert staged.cu_seqlens.dtype == torch.int32 and staged.cu_seqlens.tolist() == cu
    if key[2]:
        assert staged.cu_seqlens.tolist()[:len(document_offsets(want_pos))] == document_offsets(want_pos)
    assert all(a is b for a, b in zip(staged.unpadded, (ids, pos, labels)))
    # no real_lengths given: every token of the unpadded rows is real, the staged padding not
    assert staged.real_lengths.tolist() == [pos.shape[1]] * pos.shape[0]
    assert staged.row_buffers()["real_lengths"] is staged.real_lengths


def test_staged_batch_keeps_make_batchs_real_lengths():
    """The graph's padding comes after make_batch's: each row's real tokens stay as counted."""
    pos = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]])  # the second row: 2 real, 3 padding
    real = torch.tensor([5, 2])
    staged = stage_batch(pos, pos, pos, 8, pinned=False, real_lengths=real)
    assert staged.key[1] == 8 and staged.real_lengths is real


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs CUDA")
def test_staged_batch_is_page_locked_when_asked():
    pos = torch.arange(5).view(1, 5)
    staged = stage_batch(pos, pos, pos, 8, pinned=True)
    assert all(t.is_pinned() for t in (staged.input_ids, staged.position_ids, staged.labels,
                                       staged.cu_seqlens, staged.real_lengths))


def _examples(n: int, seed: int = 3) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(3, 12)
        ids = [rng.randint(5, 99) for _ in range(length)]
        labels = [IGNORE if rng.random() < 0.3 else t for t in ids]
        out.append({"input_ids": ids, "labels": labels})
    return out


@pytest.mark.parametrize("mbs,window", [(2, 3), (3, 1), (1, 4)])
def test_windows_built_ahead_are_the_epochs_micro_batches_in_order(mbs, window):
    examples = _examples(23)
    rows = build_rows(examples, 16, packing=True, seed=5)
    prepared = []
    windows = WindowBuilder(examples, rows, mbs, pad_id=0, seed=5, window=window,
                            prepare=prepared.append)
    # the reference: each epoch's micro-batches as qlora.data iterates them
    want = [(e, k, b) for e in range(3) for k, b in iterate_batches(examples, rows, mbs, e, 5, 0)]
    got, here = [], (0, 0)
    while here[0] < 3:
        win = windows.build(*here)
        assert win.ids == list(range(here[1], min(here[1] + window, windows.per_epoch)))
        assert win.n_labels == sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in win.batches)
        got += [(win.epoch, b["index"], b) for b in win.batches]
        here = window_after(win, windows.per_epoch)
    assert len(got) == len(want)
    for (e, index, b), (e_ref, k, ref) in zip(got, want):
        assert (e, index) == (e_ref, e_ref * windows.per_epoch + k)
        for name in ("input_ids", "labels", "position_ids"):
            assert torch.equal(b[name], ref[name])
    assert [id(b) for b in prepared] == [id(b) for _, _, b in got]  # prepare saw every micro-batch


def test_a_window_built_early_does_not_disturb_the_current_epochs_order():
    # the loop builds epoch e+1's first window while epoch e's last one is still running
    examples = _examples(17)
    rows = build_rows(examples, 16, packing=True, seed=1)
    ahead = WindowBuilder(examples, rows, 2, pad_id=0, seed=1, window=2)
    fresh = WindowBuilder(examples, rows, 2, pad_id=0, seed=1, window=2)
    first = ahead.build(0, 0)
    ahead.build(1, 0)
    for a, b in zip(ahead.build(0, 2).batches + first.batches,
                    fresh.build(0, 2).batches + fresh.build(0, 0).batches):
        assert torch.equal(a["input_ids"], b["input_ids"]) and a["index"] == b["index"]


def test_window_after_crosses_into_the_next_epoch():
    examples = _examples(10)
    rows = build_rows(examples, 16, packing=False)
    windows = WindowBuilder(examples, rows, 3, pad_id=0, seed=0, window=2)  # 4 micro-batches
    assert windows.per_epoch == 4
    assert window_after(windows.build(0, 0), 4) == (0, 2)
    assert window_after(windows.build(0, 2), 4) == (1, 0)
    assert window_after(windows.build(2, 3), 4) == (3, 0)  # a short last window


def test_a_rank_left_short_pads_its_window_with_weight_zero():
    examples = _examples(10)
    rows = build_rows(examples, 16, packing=False)
    # 4 micro-batches per epoch, windows of 3 over 2 ranks: the second window holds one (rank 0's)
    rank1 = WindowBuilder(examples, rows, 3, pad_id=0, seed=0, window=3,
                          env=DistEnv(rank=1, world_size=2, local_rank=1))
    last = rank1.build(0, 3)
    assert [b["weight"] for b in last.batches] == [0] and last.n_input == 0 and last.n_labels == 0


def test_a_failed_capture_is_released_before_the_eager_step_runs():
    """When capturing a step's graph fails (out of memory at a tight cap, say), the step runs
    eagerly instead, and by then what the failed capture held is gone: the frames of the
    exception's traceback keep its tensors (the graphs' pool blocks, on a GPU) alive for as long
    as the exception is, so the eager step must not run inside its handler."""
    import weakref

    from qlora.train.graphs import GraphedSteps

    steps = GraphedSteps.__new__(GraphedSteps)  # no CUDA pool on a CPU
    steps.device, steps.pad_to, steps.log, steps.preference = torch.device("cpu"), 8, print, None
    steps.failed, steps.graphs = None, {}
    held, alive_in_eager = [], []

    def capture(g):
        activation = torch.empty(1024)  # referenced by this frame alone, then by the traceback
        held.append(weakref.ref(activation))
        raise torch.OutOfMemoryError("CUDA out of memory (simulated in the capture)")

    def eager(batch, scale):
        alive_in_eager.append(held[0]() is not None)
        return torch.zeros(())

    steps._capture, steps._eager = capture, eager
    ids = torch.arange(6).view(1, 6) + 5
    steps.run(steps.stage(ids, torch.arange(6).view(1, 6), ids.clone()), 1.0)
    assert steps.failed.startswith("OutOfMemoryError") and alive_in_eager == [False]
    assert steps.graphs == {}


def test_a_failed_capture_releases_the_graphs_captured_before_it():
    """A later batch shape's capture fails (the longest padded shape, the usual place to run out
    of memory): every graph captured before is reset and dropped with it, since they share one
    pool whose blocks the eager steps from then on need."""
    from qlora.train.graphs import GraphedSteps

    steps = GraphedSteps.__new__(GraphedSteps)
    steps.device, steps.pad_to, steps.log, steps.preference = torch.device("cpu"), 4, print, None
    steps.failed, steps.graphs = None, {}
    resets = []

    class StandInGraph:  # what the GPU's CUDAGraph is asked for here
        def replay(self):
            pass

        def reset(self):
            resets.append(self)

    def capture(g):
        if g.input_ids.shape[1] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated in the second capture)")
        g.graph, g.loss_sum = StandInGraph(), torch.zeros(())

    steps._capture, steps._eager = capture, lambda batch, scale: torch.zeros(())
    for length in (4, 8):  # one shape captured, then a longer one that fails
        ids = torch.arange(length).view(1, length) + 5
        steps.run(steps.stage(ids, torch.arange(length).view(1, length), ids.clone()), 1.0)
    assert steps.failed.startswith("OutOfMemoryError")
    assert steps.graphs == {} and len(resets) == 1
