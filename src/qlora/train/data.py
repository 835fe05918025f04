"""The examples a run trains and validates on: tokenized as the config says (SFT's formats, or a
preference method's pairs), the validation set read from val_data or split off the training set."""

from __future__ import annotations

from typing import Callable

from qlora.config import RunConfig
from qlora.errors import QloraError


def load_data(cfg: RunConfig, tokenizer, log: Callable[[str], None] = print
              ) -> tuple[list[dict], list[dict], str | None]:
    """Tokenized (train, validation) examples, as the config says, and the training data's format
    (as detected; None for preference data), which the run records with its adapter."""
    from qlora.data import prepare, split_validation
    from qlora.methods import method_module

    method = method_module(cfg.method)
    formats: list[str] = []

    def one(path: str) -> list[dict]:
        if method is not None:
            return _preference_data(path, tokenizer, cfg, method.LAYOUT, log)
        examples, report = prepare(path, tokenizer, fmt=cfg.data_format, train_on=cfg.train_on,
                                   max_len=cfg.max_seq_length, overlong=cfg.long_examples,
                                   chat_template=cfg.chat_template)
        for line in report.lines():
            log(line)
        formats.append(report.format)
        return examples

    train = one(cfg.data)
    val: list[dict] = []
    if cfg.val_data:
        val = one(cfg.val_data)
    elif cfg.val_set_size > 0:
        frac = cfg.val_set_size if cfg.val_set_size < 1 else cfg.val_set_size / len(train)
        if frac >= 1:
            raise QloraError(f"option `val_set_size`: {cfg.val_set_size:g} examples held out of "
                             f"{len(train)} leaves none to train on")
        train, val = split_validation(train, frac, seed=cfg.seed)
    return train, val, formats[0] if formats else None


def _preference_data(path: str, tokenizer, cfg: RunConfig, layout: str,
                     log: Callable[[str], None]) -> list[dict]:
    from qlora.data.preference import load_preference

    examples, report = load_preference(path, tokenizer, layout=layout, max_len=cfg.max_seq_length,
                                       overlong=cfg.long_examples, chat_template=cfg.chat_template)
    for line in report.lines():
        log(line)
    return examples
