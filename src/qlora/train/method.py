"""What the training method changes in a run: SFT (the model's own loss) or a preference method
(qlora.methods): the method's options, the batch layout, a preference micro-batch's collate, the
reference log-probs precomputed before training, and what the progress bar shows of a step."""

from __future__ import annotations

import time
from typing import Callable

import torch

from qlora.config import RunConfig


def preference_options(cfg: RunConfig):
    """The preference methods' knobs (qlora.methods.preference) from the run's options."""
    from qlora.methods.preference import PreferenceOptions

    return PreferenceOptions(beta=cfg.beta, loss_type=cfg.loss_type,
                             label_smoothing=cfg.label_smoothing, simpo_gamma=cfg.simpo_gamma,
                             cpo_alpha=cfg.cpo_alpha, desirable_weight=cfg.desirable_weight,
                             undesirable_weight=cfg.undesirable_weight)


def batch_layout(model, cfg: RunConfig, device: torch.device, method,
                 log: Callable[[str], None]) -> tuple[bool, bool]:
    """(SFT packs its rows?, a preference method packs its micro-batches?), said in the log."""
    from qlora.methods.preference import layout_line, packs_with_varlen

    # SFT packs examples into rows; a preference micro-batch is its examples' sequences, packed
    # into one row of their own (preference_packed) or padded
    packing = cfg.packing and model.packs_documents and method is None
    preference_packed = method is not None and cfg.packing and packs_with_varlen(model, device)
    if method is not None:
        log(layout_line(preference_packed, cfg.packing))
    if cfg.packing and not packing and method is None:
        log("packing off: this model would let packed documents see each other (no position ids "
            "in its forward, or layers that carry state along a row), so each row holds one "
            "example, padded")
    return packing, preference_packed


def precompute_reference_log_probs(model, examples: list[dict], cfg: RunConfig, pad_id: int,
                                    packed: bool, device: torch.device,
                                    log: Callable[[str], None]) -> None:
    """precompute_ref_log_probs: every pair's reference log-probs in one pass, before the
    adapters are trained (the reference is the base, adapters off, so any time gives the same)."""
    from qlora.methods.preference import precompute_reference

    start = time.perf_counter()
    precompute_reference(model, examples, cfg.eval_batch_size or cfg.micro_batch_size, pad_id,
                         packed)
    log(f"reference log-probs of {len(examples)} pairs precomputed in "
        f"{time.perf_counter() - start:.1f}s: no step runs the reference forward")


def preference_collate(packed: bool):
    """A preference method's micro-batch layout (data/preference.py): its examples' sequences
    `packed` into one row, or padded."""
    from functools import partial

    from qlora.data.preference import preference_batch

    return partial(preference_batch, packed=packed)


def bar_metrics(sums: dict) -> dict[str, float]:
    """What the progress bar shows of a preference step: reward accuracy and margin."""
    from qlora.methods.preference import metric_means

    means = metric_means(sums) if sums else {}
    short = {"rewards/accuracies": "acc", "rewards/margins": "margin"}
    return {label: means[name] for name, label in short.items() if name in means}
