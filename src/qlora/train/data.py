"""The examples a run trains and validates on: tokenized as the config says (SFT's formats, or a
preference method's pairs), the validation set read from val_data or split off the training set."""

from __future__ import annotations

from typing import Callable

from qlora.config import RunConfig
from qlora.errors import QloraError


def load_data(cfg: RunConfig, tokenizer, log: Callable[[str], None] = print
              ) -> tuple[list[dict], list[dict], tuple[str, bool | None]]:
    """Tokenized (train, validation) examples, as the config says, and how the training data's
    prompts were rendered, which the run records with its adapter (train/output.
    write_prompt_format): (its format as detected, or a preference layout; whether through a chat
    template, None for an SFT format: its format says)."""
    from qlora.data import prepare, split_validation
    from qlora.methods import method_module

    method = method_module(cfg.method)

    def one(path: str) -> tuple[list[dict], tuple[str, bool | None]]:
        """The file's examples, and how its prompts were rendered."""
        if method is not None:
            examples, report = _preference_data(path, tokenizer, cfg, method.LAYOUT, log)
            return examples, (report.layout, report.chat)
        examples, report = prepare(path, tokenizer, fmt=cfg.data_format, train_on=cfg.train_on,
                                   max_len=cfg.max_seq_length, overlong=cfg.long_examples,
                                   chat_template=cfg.chat_template, refuse_preferences=True)
        for line in report.lines():
            log(line)
        return examples, (report.format, None)

    train, prompts = one(cfg.data)
    val: list[dict] = []
    if cfg.val_data:
        val, _ = one(cfg.val_data)
    elif cfg.val_set_size > 0:
        frac = cfg.val_set_size if cfg.val_set_size < 1 else cfg.val_set_size / len(train)
        if frac >= 1:
            raise QloraError(f"option `val_set_size`: {cfg.val_set_size:g} examples held out of "
                             f"{len(train)} leaves none to train on")
        train, val = split_validation(train, frac, seed=cfg.seed)
    return train, val, prompts


def _preference_data(path: str, tokenizer, cfg: RunConfig, layout: str,
                     log: Callable[[str], None]):
    from qlora.data.preference import load_preference

    examples, report = load_preference(path, tokenizer, layout=layout, max_len=cfg.max_seq_length,
                                       overlong=cfg.long_examples, chat_template=cfg.chat_template)
    for line in report.lines():
        log(line)
    return examples, report
