"""ORPO (Hong et al. 2024): NLL on the chosen completion minus β · log σ(log odds ratio), no
reference model. The log-probs are averaged over each completion's tokens (as TRL's ORPOTrainer
does), and log odds(y) = log p - log(1 - p) with log(1 - p) computed stably (log1mexp).

The NLL covers the chosen completion's tokens only, as every loss here (data/preference.py): the
authors' code (xfactlab/orpo) with its --disable_prompt_loss. TRL's ORPOTrainer, as the authors'
code by default, takes it over the prompt too, so its loss is higher by the prompt tokens' share
(benchmarks/preference_step.py's test measures the difference); the odds-ratio term is the same.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from qlora.methods.dpo import reward_metrics

LAYOUT = "pairs"
USES_REFERENCE = False


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0: log1p(-exp(x)) far from 0, log(-expm1(x)) near it, where the
    other form loses its digits (Mächler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def losses(policy, reference, opts) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    chosen, rejected = policy.chosen_mean, policy.rejected_mean
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    # the NLL is the batch's token mean over the chosen completions (TRL's cross-entropy is the
    # batch's token mean too, over prompt and completion), the same for each example, so the
    # mean over the batch is that token mean
    nll = policy.chosen_nll_mean.expand_as(ratio)
    loss = nll - opts.beta * ratio
    metrics = reward_metrics(opts.beta * chosen.detach(), opts.beta * rejected.detach(), policy)
    metrics.update({"logps/chosen": chosen.detach(), "logps/rejected": rejected.detach(),
                    "nll_loss": nll.detach(), "log_odds_ratio": ratio.detach(),
                    "log_odds_chosen": log_odds.detach()})
    return loss, metrics
