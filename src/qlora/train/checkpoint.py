"""Checkpoints that appear whole or not at all, and that resume a run exactly.

A checkpoint is a directory `output_dir/checkpoints/step-00000123/` holding:

    adapter/                   the adapter in PEFT format (usable on its own)
    trainable.safetensors      every trainable tensor, bit-exact, by module name (what resume loads)
    optimizer.pt               optimizer state_dict
    scheduler.pt               LR scheduler state_dict
    rng.pt                     python, numpy, torch (and CUDA) generator states
    trainer_state.json         global step, data position (epoch, batch index), best metric, ...

It is written into a temporary directory next to its final place, every file fsynced, then
renamed: a crash leaves either the old set of checkpoints or the new one, never half a checkpoint.
Temporary directories start with a dot and are ignored (and cleaned) when looking for `latest`.

For the training loop: `Checkpoints` saves one at a step boundary (every rank gathers, rank 0
writes, old ones rotated out), and `start_state` is a run's first TrainerState, fresh or resumed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from qlora.config import RunConfig
from qlora.errors import QloraError
from qlora.files import remove_dir, staged_dir
from qlora.train import distributed as dist_
from qlora.train.distributed import DistEnv

CHECKPOINTS = "checkpoints"
PREFIX = "step-"
STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    global_step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch of the next micro-batch
    batch_index: int = 0  # index, within that epoch's order, of the next micro-batch
    tokens_seen: int = 0  # label tokens trained on so far
    best_metric: float | None = None  # best eval loss so far
    best_step: int | None = None
    best_checkpoint: str | None = None  # directory name of the checkpoint holding the best adapter
    evals_without_improvement: int = 0
    elapsed_s: float = 0.0  # training wall time before this process (for summary)
    grad_scaler: dict[str, Any] | None = None  # fp16 loss-scaler state, when there is one
    log_history: list[dict[str, Any]] = field(default_factory=list)  # eval records, for the plot


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def rng_state() -> dict[str, Any]:
    # numpy's state as plain values and a tensor, so that torch.load(weights_only=True) reads it
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu").contiguous().clone()
            for n, p in model.named_parameters() if p.requires_grad}


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the rename is still atomic
    finally:
        os.close(fd)


def save_checkpoint(output_dir: str | Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler, state: TrainerState,
                    rng: dict[str, Any], base_model: str, save_adapter_fn=None) -> Path:
    """Write checkpoint `step-<global_step>` atomically and return its path.

    `rng` is passed in (not read here) because the loop saves the generator states of the moment
    the data position refers to, which on an interrupt is the start of the unfinished step.
    """
    from safetensors.torch import save_file

    parent = checkpoint_dir(output_dir)
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / f"{PREFIX}{state.global_step:08d}"
    if save_adapter_fn is None:
        from qlora.adapters import save_adapter as save_adapter_fn
    # the same step saved again (an interrupt right after a save) replaces the first one
    with staged_dir(final, replace=True) as tmp:
        save_adapter_fn(model, tmp / "adapter", base_model)
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng, tmp / "rng.pt")
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
        _fsync_tree(tmp)
    _fsync_dir(parent)
    return final


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are not listed)."""
    parent = checkpoint_dir(output_dir)
    if not parent.is_dir():
        return []
    found = [p for p in parent.iterdir()
             if p.is_dir() and p.name.startswith(PREFIX) and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def clean_partial(output_dir: str | Path) -> None:
    """Remove temporary directories a crash left behind."""
    parent = checkpoint_dir(output_dir)
    if parent.is_dir():
        for p in parent.iterdir():
            if p.name.startswith("."):
                shutil.rmtree(p, ignore_errors=True)


def rotate_checkpoints(output_dir: str | Path, keep: int, best: str | None) -> list[Path]:
    """Delete all but the newest `keep` checkpoints and the best one; return the deleted ones."""
    ckpts = list_checkpoints(output_dir)
    newest = {p.name for p in ckpts[-keep:]} if keep > 0 else set()
    deleted = []
    for p in ckpts:
        if p.name not in newest and p.name != best:
            remove_dir(p)  # a kill during the removal must not leave a listed, half-deleted one
            deleted.append(p)
    return deleted


CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", STATE_FILE)


def damage(path: str | Path) -> str | None:
    """Why checkpoint `path` cannot be resumed from (naming the file), or None when it looks whole.

    Cheap checks only: trainer_state.json parses, the safetensors header covers the file, the
    torch.save archives have their central directory (a truncated zip has none)."""
    import zipfile

    from safetensors import safe_open

    path = Path(path)
    for name in CHECKPOINT_FILES:
        if not (path / name).is_file():
            return f"{path / name} is missing"
    try:
        raw = json.loads((path / STATE_FILE).read_text())
        TrainerState(**raw)
    except (ValueError, TypeError) as err:  # JSONDecodeError, UnicodeDecodeError, wrong keys
        return f"{path / STATE_FILE} is broken ({type(err).__name__}: {err})"
    try:
        with safe_open(str(path / "trainable.safetensors"), framework="pt") as sf:
            list(sf.keys())
    except Exception as err:  # noqa: BLE001 -- SafetensorError of a truncated/corrupt file
        return f"{path / 'trainable.safetensors'} is truncated or corrupt ({err})"
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        try:
            with zipfile.ZipFile(path / name) as zf:
                zf.namelist()
        except (zipfile.BadZipFile, OSError) as err:
            return f"{path / name} is truncated or corrupt ({err})"
    return None


def resolve_resume(output_dir: str | Path, resume: str, log=None) -> Path:
    """`latest` -> the newest undamaged checkpoint of output_dir (damaged newer ones are named
    through `log`); otherwise that checkpoint path, refused (QloraError) when it is damaged."""
    if resume == "latest":
        ckpts = list_checkpoints(output_dir)
        if not ckpts:
            raise QloraError(f"--resume latest: no checkpoint in {checkpoint_dir(output_dir)}; "
                             f"start the run without --resume")
        skipped = []
        for path in reversed(ckpts):
            why = damage(path)
            if why is None:
                if skipped and log is not None:
                    log(f"resume latest: skipping damaged checkpoint{'s' if len(skipped) > 1 else ''}"
                        f" {', '.join(p.name for p, _ in skipped)} ({skipped[0][1]}); resuming "
                        f"from {path.name}, the newest good one")
                return path
            skipped.append((path, why))
        raise QloraError(f"--resume latest: every checkpoint in {checkpoint_dir(output_dir)} is "
                         f"damaged (newest: {skipped[0][1]}); start the run again without --resume")
    path = Path(resume)
    if not (path / STATE_FILE).exists():
        raise QloraError(f"--resume {resume}: not a checkpoint directory (no {STATE_FILE}); "
                         f"pass `latest` or a path like {checkpoint_dir(output_dir)}/step-00000100")
    why = damage(path)
    if why is not None:
        raise QloraError(f"--resume {resume}: the checkpoint is damaged: {why}; remove {path} "
                         f"(rm -r) and resume with --resume latest or an earlier checkpoint")
    return path


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler) -> tuple[TrainerState, dict[str, Any]]:
    """Restore model adapters, optimizer and scheduler in place; return the state and RNG states."""
    from safetensors.torch import load_file

    path = Path(path)
    why = damage(path)
    if why is not None:
        raise QloraError(f"cannot resume from {path}: the checkpoint is damaged: {why}; remove "
                         f"{path} (rm -r) and resume with --resume latest or an earlier checkpoint")
    saved = load_file(str(path / "trainable.safetensors"))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(saved) != set(params):
        missing = sorted(set(params) - set(saved))[:2]
        extra = sorted(set(saved) - set(params))[:2]
        raise QloraError(f"checkpoint {path} does not fit this model and adapter configuration "
                         f"(missing {missing}, unexpected {extra}); resume with the same options")
    with torch.no_grad():
        for name, p in params.items():
            if p.shape != saved[name].shape:
                raise QloraError(f"checkpoint {path}: {name} has shape {tuple(saved[name].shape)}, "
                                 f"the model needs {tuple(p.shape)}; "
                                 f"{_resume_advice(name, saved[name].ndim, p.ndim)}")
            p.copy_(saved[name].to(p.device, p.dtype))
    device = next(iter(params.values())).device
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device,
                                         weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    raw = json.loads((path / STATE_FILE).read_text())
    return TrainerState(**raw), rng


def _resume_advice(name: str, saved_dims: int, dims: int) -> str:
    """What to do about a trainable tensor of another shape than the model's."""
    if name.endswith("lora_B.weight") and (saved_dims, dims) == (2, 3):
        # experts' lora_B, [out, r·E] in checkpoints of qlora before 2026-12-07, now [E, r, out]
        return ("the checkpoint holds the experts' lora_B as an older qlora did; it cannot be "
                "resumed (start the run again), but its adapter/ folder loads in qlora generate, "
                "merge and export")
    return "resume with the same options"


class Checkpoints:
    """A checkpoint at a step boundary: every rank gathers (a collective), rank 0 writes, then
    the old ones are rotated out (the best one stays)."""

    def __init__(self, out: Path, cfg: RunConfig, env: DistEnv, model, optimizer, scheduler,
                 scaler, base_model: str, elapsed_s: Callable[[], float]):
        self.out, self.cfg, self.env, self.model = out, cfg, env, model
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.base_model, self.elapsed_s = base_model, elapsed_s  # metrics.Clock.total_s

    def save(self, state: TrainerState, rng: dict) -> Path:
        """`rng`: the generator states of the boundary the data position refers to."""
        out, env = self.out, self.env
        state.elapsed_s = self.elapsed_s()
        state.grad_scaler = self.scaler.state_dict() if self.scaler is not None else None
        if state.best_step is not None and state.best_step == state.global_step:
            state.best_checkpoint = f"{PREFIX}{state.global_step:08d}"
        with dist_.full_trainables(self.model):  # sharded: whole tensors on every rank
            full_optimizer = dist_.full_optimizer(self.optimizer, self.model)
            if not env.is_main:  # rank 0 writes; the others wait until the checkpoint is whole
                dist_.barrier(env)
                return checkpoint_dir(out) / f"{PREFIX}{state.global_step:08d}"
            path = save_checkpoint(out, self.model, full_optimizer, self.scheduler, state,
                                        rng, self.base_model)
        rotate_checkpoints(out, self.cfg.save_total_limit, state.best_checkpoint)
        dist_.barrier(env)
        return path


def start_state(out: Path, cfg: RunConfig, model, optimizer, scheduler, scaler,
                log: Callable[[str], None]) -> TrainerState:
    """A fresh TrainerState, or with --resume the checkpoint's: weights, optimizer, schedule,
    loss scale and the RNG states of its step boundary restored."""
    state = TrainerState()
    torch.manual_seed(cfg.seed)  # any other randomness; LoRA dropout is seeded per micro-batch
    if cfg.resume:
        path = resolve_resume(out, cfg.resume)
        with dist_.full_trainables(model, load=True):  # sharded: whole tensors while loading
            state, rng = load_checkpoint(path, model, dist_.optimizer_for_load(
                optimizer, model), scheduler)
        set_rng_state(rng)  # after the manual_seed: the checkpoint's state wins
        if scaler is not None and state.grad_scaler:
            scaler.load_state_dict(state.grad_scaler)
        log(f"resumed from {path} at step {state.global_step} (epoch {state.epoch}, "
            f"micro-batch {state.batch_index})")
    return state
