"""Early stopping and the best adapter.

What they count lives in the TrainerState (best loss, its step, evaluations since it improved),
so it is saved with every checkpoint and a resumed run goes on counting where it stopped. The
best adapter is written to `best_adapter/` when an evaluation improves on every earlier one, and
with `load_best_at_end` it is the adapter the run leaves in output_dir.
"""

from __future__ import annotations

import os
from pathlib import Path

from qlora.train import distributed as dist_
from qlora.train.checkpoint import TrainerState

BEST_ADAPTER = "best_adapter"


def note_eval(state: TrainerState, loss: float) -> bool:
    """Count an evaluation's loss at state.global_step; True when it is the best so far."""
    improved = state.best_metric is None or loss < state.best_metric
    if improved:
        state.best_metric, state.best_step = loss, state.global_step
        state.evals_without_improvement = 0
    else:
        state.evals_without_improvement += 1
    return improved


def patience_spent(state: TrainerState, patience: int) -> bool:
    """`patience` evaluations in a row without improvement (0: never stop early)."""
    return patience > 0 and state.evals_without_improvement >= patience


def stop_message(state: TrainerState, patience: int) -> str:
    return (f"early stopping: no eval improvement in {patience} evaluations (best "
            f"{state.best_metric:.4f} at step {state.best_step})")


def save_best(model, out: Path, base_model: str, main: bool) -> None:
    """The adapter as it is now, into out/best_adapter."""
    from qlora.adapters import save_adapter

    with dist_.full_trainables(model):  # sharded: gathered on all ranks, rank 0 writes
        if main:
            save_adapter(model, out / BEST_ADAPTER, base_model)


def load_best(model, out: Path, main: bool) -> None:
    """out/best_adapter's weights back into the model's adapters."""
    with dist_.full_trainables(model, load=True):  # sharded: rank 0's copy is sharded
        if main:
            _adapter_weights_from(model, out / BEST_ADAPTER)


def save_final(model, out: Path, base_model: str, main: bool) -> None:
    """The run's adapter into output_dir itself."""
    with dist_.full_trainables(model):
        if main:
            _save_adapter_into(model, out, base_model)


def _adapter_weights_from(model, adapter_dir: Path) -> None:
    """Copy a saved adapter's tensors into the (already attached) adapters of `model`."""
    from qlora.adapters import copy_into_adapters, read_adapter_weights

    copy_into_adapters(model, read_adapter_weights(adapter_dir))


def _save_adapter_into(model, out: Path, base_model: str) -> None:
    """The adapter files straight into `out` (save_adapter replaces a whole directory)."""
    from qlora.adapters import save_adapter

    tmp = out / ".adapter.tmp"
    save_adapter(model, tmp, base_model)
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()
