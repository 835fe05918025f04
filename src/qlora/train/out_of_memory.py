"""Running out of GPU memory mid-run: keep a checkpoint at the last step boundary, so that the
run can resume after the options are changed (the planner's advice, qlora.memory, says which).

The loop tells a `Boundary` where it is; an error can come at any point of a step, and only two
kinds of moment have a consistent state to save: inside the micro-batches of a step (the
weights, optimizer and data position are still those of the step's start; the RNG state to save
is the one of that start) and after a step was counted. Between the optimizer's first write and
the step being counted, nothing consistent is left to save.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from qlora.train import checkpoint as ckpt
from qlora.train.checkpoint import TrainerState
from qlora.train.optim import zero_grads


class Boundary:
    """Where the run stands relative to its last step boundary."""

    def __init__(self):
        self.rng: dict | None = None  # the RNG state at the unfinished step's start; None: now's
        self.in_update = False  # inside the optimizer step

    def step_starts(self) -> dict:
        """The RNG state of the step boundary (also what an interrupt saves)."""
        self.rng = ckpt.rng_state()
        return self.rng

    def update_starts(self) -> None:
        self.in_update = True

    def step_counted(self) -> None:
        self.in_update, self.rng = False, None


def keep_checkpoint(boundary: Boundary, state: TrainerState,
                    save: Callable[[dict], Path] | None, optimizer, device: torch.device,
                    out: Path, log: Callable[[str], None]) -> Path | None:
    """After an out-of-memory error: a checkpoint of the last step boundary, when the state is
    consistent, there was a step and `save` is given (None: several ranks, where a save is a
    collective), else the newest one already on disk (or None)."""
    zero_grads(optimizer)
    kept = None
    if device.type == "cuda":
        torch.cuda.empty_cache()  # room for the gathers and copies of the save
    if save is not None and not boundary.in_update and state.global_step > 0:
        try:
            kept = save(boundary.rng if boundary.rng is not None else ckpt.rng_state())
        except Exception as save_err:  # noqa: BLE001 -- e.g. out of memory again
            log(f"could not save a checkpoint after running out of memory: {save_err}")
    return kept or next(iter(reversed(ckpt.list_checkpoints(out))), None)
