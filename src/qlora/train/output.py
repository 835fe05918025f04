"""The run's output directory: checked before anything loads; once the model and data have
loaded, emptied (--overwrite) and created, run_config.yaml and the tokenizer files written in, and
a resume's changed options said in the log."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from qlora.config import CONFIG_FILE_NAME, RunConfig, save_config, to_dict
from qlora.errors import QloraError
from qlora.files import check_writable, remove_dir
from qlora.models.load import TOKENIZER_FILES
from qlora.train import checkpoint as ckpt


def check_output_dir(cfg: RunConfig) -> Path:
    """Refuse a non-empty output_dir unless resuming or told to overwrite (a previous run only).

    Only checks: nothing is created or deleted until the model and data have loaded."""
    out = Path(cfg.output_dir)
    if cfg.resume:
        if cfg.resume == "latest" and not ckpt.list_checkpoints(out):
            raise QloraError(f"--resume latest: no checkpoint in {ckpt.checkpoint_dir(out)}")
        check_writable(out, "output_dir")
        return out
    if out.exists() and not out.is_dir():
        raise QloraError(f"output_dir {out} exists and is not a directory")
    check_writable(out, "output_dir")  # before the model and data load, not after
    if out.is_dir() and any(out.iterdir()):
        if not cfg.overwrite:
            raise QloraError(f"output_dir {out} is not empty; pass --resume latest to continue "
                             f"its run, --overwrite true to replace it, or another --output_dir")
        if not (out / CONFIG_FILE_NAME).exists():
            # never delete a directory that is not a run of ours (`--output_dir ~ --overwrite`)
            raise QloraError(f"output_dir {out} is not empty and holds no {CONFIG_FILE_NAME}, so "
                             f"it is not a qlora run; --overwrite only replaces a previous run")
    return out


def prepare_output_dir(cfg: RunConfig) -> Path:
    """check_output_dir, then empty it (overwrite) and create it."""
    out = check_output_dir(cfg)
    if not cfg.resume and out.is_dir() and cfg.overwrite:
        for child in out.iterdir():
            remove_dir(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_run_files(cfg: RunConfig, resolved: dict, log: Callable[[str], None]) -> Path:
    """The output directory made ready (prepare_output_dir), with run_config.yaml (`resolved`: what
    the machine decided, saved beside the options) and the tokenizer files. A resume says what
    changed and keeps the old run_config.yaml until training ends (`train` writes it then)."""
    out = prepare_output_dir(cfg)
    if cfg.resume:
        report_config_changes(out, cfg, log)
    else:
        save_config(cfg, out / CONFIG_FILE_NAME, extra=resolved)
    copy_tokenizer_files(cfg.model, out)
    return out


def copy_tokenizer_files(model_dir: str | Path, out: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        src = Path(model_dir) / name
        if src.is_file():
            tmp = out / f".{name}.tmp"
            shutil.copyfile(src, tmp)
            os.replace(tmp, out / name)
            copied.append(name)
    return copied


def report_config_changes(out: Path, cfg: RunConfig, log: Callable[[str], None]) -> None:
    """Resuming with other options is allowed (more epochs, say) but said out loud."""
    import yaml

    path = out / CONFIG_FILE_NAME
    if not path.exists():
        return
    before = yaml.safe_load(path.read_text()) or {}
    now = to_dict(cfg)
    changed = [k for k in now if k not in ("resume", "overwrite") and before.get(k) != now[k]]
    if changed:
        log("resuming with changed options: " + ", ".join(
            f"{k}: {before.get(k)!r} -> {now[k]!r}" for k in changed))
