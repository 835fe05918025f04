"""The windows of a run: one optimizer step's micro-batches (this rank's share), in each epoch's
order, built on the host, and what a window's summed loss is divided by."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from qlora.models.decoder import IGNORE_INDEX as IGNORE
from qlora.train import distributed as dist_
from qlora.train.distributed import SINGLE, DistEnv


@dataclass
class Window:
    """One optimizer step's micro-batches (this rank's share), built on the host. Building them
    uses no RNG and no GPU, so the loop builds the next step's window while the GPU runs this one."""
    epoch: int
    ids: list[int]  # the window's micro-batch indices in the epoch, over all ranks
    batches: list[dict]
    n_input: int  # this rank's input tokens, weighted
    n_labels: int  # this rank's label tokens, weighted: the normaliser before any all-reduce


def window_after(window: Window, per_epoch: int) -> tuple[int, int]:
    """(epoch, micro-batch index) at which the step after `window` starts."""
    following = window.ids[-1] + 1
    return (window.epoch + 1, 0) if following >= per_epoch else (window.epoch, following)


class WindowBuilder:
    """The windows of a run: `window` micro-batches (over all ranks) at a time, in each epoch's
    order; `prepare(batch)` readies each micro-batch for the device (pinning, CUDA-graph staging)."""

    def __init__(self, examples: list[dict], rows: list[list[int]], micro_batch_size: int,
                 pad_id: int, seed: int, window: int, env: DistEnv = SINGLE, lockstep: bool = False,
                 prepare: Callable[[dict], None] | None = None, collate=None):
        """`collate`: the batch layout of a preference method (data/preference.py), else SFT's."""
        from qlora.data import num_batches

        self.examples, self.rows, self.micro_batch_size = examples, rows, micro_batch_size
        self.pad_id, self.seed, self.window = pad_id, seed, window
        self.env, self.lockstep, self.prepare, self.collate = env, lockstep, prepare, collate
        self.per_epoch = num_batches(len(rows), micro_batch_size)
        self._order: tuple[int, list[int]] | None = None  # one shuffle per epoch, not per step

    def order(self, epoch: int) -> list[int]:
        from qlora.data import batch_order

        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, batch_order(len(self.rows), epoch, self.seed))
        return self._order[1]

    def build(self, epoch: int, start: int) -> Window:
        from qlora.data import micro_batch

        order = self.order(epoch)
        ids = list(range(start, min(start + self.window, self.per_epoch)))
        batches, n_input = [], 0
        # this rank's share; a rank left short (last window of an epoch) pads with weight-0
        # micro-batches, so that it joins every collective (distributed.py)
        for k, weight in dist_.micro_batches(ids, self.env, lockstep=self.lockstep):
            batch, n = micro_batch(self.examples, self.rows, order, k, self.micro_batch_size,
                                   self.pad_id, self.collate)
            batch["index"] = epoch * self.per_epoch + k
            batch["weight"] = weight
            if self.prepare is not None:
                self.prepare(batch)
            batches.append(batch)
            n_input += n * weight
        n_labels = sum(loss_normaliser(b) * b["weight"] for b in batches)
        return Window(epoch, ids, batches, n_input, n_labels)


def loss_normaliser(batch: dict) -> int:
    """What a window's summed loss is divided by: its label tokens (SFT; the model shifts labels
    by 1), or its examples (a preference method's loss is a mean over examples, as TRL's)."""
    if "n_examples" in batch:
        return batch["n_examples"]
    return int((batch["labels"][:, 1:] != IGNORE).sum())
