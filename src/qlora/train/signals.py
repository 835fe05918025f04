"""Ctrl-C and SIGTERM during training: a flag the loop checks, so that it stops where a
checkpoint is consistent (a step boundary) instead of wherever the signal lands."""

from __future__ import annotations

import signal
import threading
from typing import Any


class StopFlag:
    """SIGINT / SIGTERM set a flag the loop checks between micro-batches; a second one kills."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt  # asked twice: stop now, without a checkpoint
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def mid_step(self, distributed: bool) -> bool:
        """Stop before the next micro-batch? One process drops its unfinished step; ranks of a
        torchrun job finish it, and all stop at the next step's all-reduce (train/step.py)."""
        return self.signum is not None and not distributed

    def at_boundary(self, step: int, total: int, stop_after_steps: int | None,
                    distributed: bool) -> bool:
        """Stop (with a checkpoint) after `step`? `stop_after_steps` acts as a Ctrl-C that came
        just then; under torchrun a signal waits for the next step's all-reduce, so that all
        ranks act on it together."""
        cut = stop_after_steps is not None and step >= stop_after_steps and step < total
        if cut:
            self.signum = signal.SIGINT
        return self.signum is not None and (cut or not distributed)
