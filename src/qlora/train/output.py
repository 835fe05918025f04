"""The run's output directory: checked before anything loads; once the model and data have
loaded, emptied (--overwrite) and created, run_config.yaml, prompt_format.json and the tokenizer
files written in, and a resume's changed options said in the log.

prompt_format.json records how training rendered its prompts (the data format detected, and
whether a chat template applied and which), so that `qlora generate` / `chat` with this run's
adapter render prompts the same way by default. An adapter in the run (the output directory,
best_adapter/, checkpoints/step-N/adapter/) finds both files with `find_run_dir`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from qlora.config import CONFIG_FILE_NAME, RunConfig, save_config, to_dict
from qlora.errors import QloraError
from qlora.files import check_writable, remove_dir, replaceable, staged_file
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
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise QloraError(f"output_dir {out} is not empty; pass --resume latest to continue "
                         f"its run, --overwrite true to replace it, or another --output_dir")
    if not replaceable(out, lambda: (out / CONFIG_FILE_NAME).exists()):
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


def write_run_files(cfg: RunConfig, resolved: dict, log: Callable[[str], None],
                    prompts: tuple[str, bool | None]) -> Path:
    """The output directory made ready (prepare_output_dir), with run_config.yaml (`resolved`: what
    the machine decided, saved beside the options), prompt_format.json (`prompts`: the data format
    training detected, or a preference layout, and whether its prompts went through a chat
    template: train/data.load_data's) and the tokenizer files. A resume says what changed and
    keeps the old run_config.yaml until training ends (`train` writes it then)."""
    out = prepare_output_dir(cfg)
    if cfg.resume:
        report_config_changes(out, cfg, log)
    else:
        save_config(cfg, out / CONFIG_FILE_NAME, extra=resolved)
    write_prompt_format(out, prompts[0], cfg.chat_template, chat=prompts[1])
    copy_tokenizer_files(cfg.model, out)
    return out


PROMPT_FORMAT_FILE = "prompt_format.json"


def write_prompt_format(out: Path, data_format: str, chat_template: str | None,
                        chat: bool | None = None) -> Path:
    """prompt_format.json: the data format (an SFT format, or a preference layout: pairs,
    unpaired) and, where its prompts went through a chat template (`chat`; None: as the format
    says, its chat formats), the chat_template option they were rendered with (None: the
    tokenizer's own)."""
    import json

    from qlora.data.templates import CHAT_FORMATS

    if chat is None:
        chat = data_format in CHAT_FORMATS
    record = {"data_format": data_format, "chat_template": chat,
              "chat_template_option": chat_template if chat else None}
    with staged_file(out / PROMPT_FORMAT_FILE) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    return out / PROMPT_FORMAT_FILE


def find_run_dir(adapter_dir: str | Path | None) -> Path | None:
    """The output directory of the training run that wrote the adapter (it holds
    run_config.yaml): the adapter directory itself, or above it (best_adapter/,
    checkpoints/step-N/adapter/)."""
    if adapter_dir is None:
        return None
    here = Path(adapter_dir).resolve()
    for folder in [here, *here.parents][:4]:
        if (folder / CONFIG_FILE_NAME).is_file():
            return folder
    return None


def read_prompt_format(adapter_dir: str | Path | None) -> tuple[dict, Path] | None:
    """(the record, its path) of the run that wrote the adapter, or None: no adapter, an adapter
    from elsewhere, or a run from before the record existed. A damaged record is refused."""
    import json

    run_dir = find_run_dir(adapter_dir)
    path = None if run_dir is None else run_dir / PROMPT_FORMAT_FILE
    if path is None or not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        fmt = record["data_format"]
    except (ValueError, KeyError, TypeError) as err:
        raise QloraError(f"{path} is damaged ({type(err).__name__}: {err}); delete it to render "
                         f"prompts with the model's chat template, or pass --chat-template / "
                         f"--no-chat-template") from None
    from qlora.data.formats import FORMATS, LAYOUTS

    known = (*FORMATS, *LAYOUTS)
    if fmt not in known:
        raise QloraError(f"{path}: unknown data_format {fmt!r} (known: {', '.join(known)}); "
                         f"pass --chat-template or --no-chat-template instead")
    return record, path


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
