"""A preference batch through the model: log-probs, the reference, the loss and its metrics.

    policy     one forward over all rows of the batch (chosen and rejected together), with grad
    reference  the same rows with the adapters off (adapters.adapters_disabled), under no_grad:
               the base model is the reference, as in TRL with a PEFT model; no second copy
    losses     the method's (methods/<name>.py), one per example

`batch_loss` returns the SUM of the per-example losses, as the model's SFT loss is a sum: the loop
divides by the examples of the whole accumulated step, so accumulation averages over examples.
Metrics travel as {name: [sum, count]} so that steps, micro-batches and ranks add up, and are
divided once, when logged (`metric_means`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qlora.adapters import adapters_disabled
from qlora.models.decoder import IGNORE_INDEX as IGNORE


@dataclass
class PreferenceOptions:
    """The methods' knobs, TRL's names and defaults (RunConfig carries them)."""
    beta: float = 0.1
    loss_type: str = "sigmoid"  # DPO: sigmoid, ipo, hinge
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    cpo_alpha: float = 0.0  # SimPO: weight of an NLL term on the chosen completions
    desirable_weight: float = 1.0  # KTO
    undesirable_weight: float = 1.0


@dataclass
class RowLogps:
    """Per row: the summed log-prob of its label tokens, their number, and (with grad) the
    summed NLL of those tokens."""
    logps: torch.Tensor  # [R] fp32
    tokens: torch.Tensor  # [R]


class PairLogps:
    """A pair batch's rows split into the chosen half and the rejected half."""

    def __init__(self, rows: RowLogps):
        self.chosen, self.rejected = rows.logps.chunk(2)
        self.chosen_tokens, self.rejected_tokens = rows.tokens.chunk(2)

    @property
    def chosen_mean(self) -> torch.Tensor:
        return self.chosen / self.chosen_tokens.clamp(min=1)

    @property
    def rejected_mean(self) -> torch.Tensor:
        return self.rejected / self.rejected_tokens.clamp(min=1)

    @property
    def chosen_nll_mean(self) -> torch.Tensor:
        """Cross-entropy over all chosen completion tokens of the batch (one token mean)."""
        return -self.chosen.sum() / self.chosen_tokens.sum().clamp(min=1)


class UnpairedLogps:
    """A KTO batch: each example's completion, its KL row's (under no_grad), its label."""

    def __init__(self, rows: RowLogps, kl: torch.Tensor, label: torch.Tensor):
        self.completion, self.tokens = rows.logps, rows.tokens
        self.kl, self.label = kl, label.to(rows.logps.device)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> RowLogps:
    """Summed log-probs of each row's label tokens, in fp32 (the model predicts labels[t+1] at
    position t). Only the label positions are read, so the fp32 log-softmax covers the
    completion tokens and not the [rows, T, vocab] logits whole."""
    labels = labels[:, 1:].to(logits.device)
    mask = labels != IGNORE
    picked = logits[:, :-1][mask].float()  # [N, V]
    targets = labels[mask]
    token_logps = picked.gather(-1, targets[:, None]).squeeze(-1) - picked.logsumexp(-1)
    rows = mask.nonzero()[:, 0]
    logps = torch.zeros(labels.shape[0], dtype=torch.float32, device=logits.device)
    return RowLogps(logps.index_add(0, rows, token_logps), mask.sum(-1))


def row_logps(model, batch: dict, rows: slice | None = None) -> RowLogps:
    """RowLogps of the batch's rows (all, or a slice of them) through `model`."""
    take = slice(None) if rows is None else rows
    device = next(p.device for p in model.parameters())
    logits = model(batch["input_ids"][take].to(device), batch["position_ids"][take], None)
    return sequence_logps(logits, batch["labels"][take])


def policy_and_reference(method, model, batch: dict):
    """(policy, reference or None) log-probs of a batch for `method`; the reference is `model`
    with its adapters off."""
    if method.LAYOUT == "pairs":
        policy = PairLogps(row_logps(model, batch))
        reference = None
        if method.USES_REFERENCE:
            with torch.no_grad(), adapters_disabled(model):
                reference = PairLogps(row_logps(model, batch))
        return policy, reference
    # KTO: the examples' rows with grad; their KL rows only feed the detached estimate z
    n = batch["n_examples"]
    rows = row_logps(model, batch, slice(0, n))
    with torch.no_grad():
        kl = row_logps(model, batch, slice(n, None)).logps
        with adapters_disabled(model):
            ref_rows = row_logps(model, batch)
    ref_main, ref_kl = ref_rows.logps[:n], ref_rows.logps[n:]
    policy = UnpairedLogps(rows, kl, batch["label"])
    reference = UnpairedLogps(RowLogps(ref_main, ref_rows.tokens[:n]), ref_kl, batch["label"])
    return policy, reference


def batch_loss(method, model, batch: dict, opts: PreferenceOptions
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(sum of the batch's per-example losses, {metric: tensor([sum, count])})."""
    policy, reference = policy_and_reference(method, model, batch)
    losses, metrics = method.losses(policy, reference, opts)
    return losses.sum(), metric_sums(metrics)


def metric_sums(metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: torch.stack([v.detach().float().sum(),
                               torch.tensor(float(v.numel()), device=v.device)])
            for name, v in metrics.items()}


def add_metrics(total: dict[str, torch.Tensor], more: dict[str, torch.Tensor]) -> None:
    for name, v in more.items():
        total[name] = total[name] + v if name in total else v.clone()


def metric_means(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """{name: mean}; a metric none of whose examples came (KTO without an undesirable one) is
    left out. KTO has no pairs: its margin is the difference of the two means, as TRL logs it."""
    out = {name: float(v[0] / v[1]) for name, v in sorted(sums.items()) if float(v[1]) > 0}
    if "rewards/margins" not in out and {"rewards/chosen", "rewards/rejected"} <= out.keys():
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


@torch.no_grad()
def evaluate(method, model, examples: list[dict], opts: PreferenceOptions, batch_size: int,
             pad_id: int, shard: tuple[int, int] = (0, 1)) -> tuple[float, int, dict]:
    """(summed loss, examples, metric sums) of `examples`, in batches of `batch_size` examples;
    `shard=(rank, ranks)`: this process takes every ranks-th batch (the caller sums over ranks)."""
    from qlora.data.preference import preference_batch

    rank, ranks = shard
    was_training = model.training
    model.eval()
    total, count, sums = 0.0, 0, {}
    try:
        for k, start in enumerate(range(0, len(examples), batch_size)):
            if k % ranks != rank:
                continue
            batch = preference_batch(examples[start:start + batch_size], pad_id)
            loss, metrics = batch_loss(method, model, batch, opts)
            total += float(loss)
            count += batch["n_examples"]
            add_metrics(sums, metrics)
    finally:
        model.train(was_training)
    return total, count, sums
