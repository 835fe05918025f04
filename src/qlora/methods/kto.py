"""KTO (Ethayarajh et al. 2024): unpaired completions, each desirable or not.

    desirable:    w_d (1 - σ(β (log-ratio - z)))
    undesirable:  w_u (1 - σ(β (z - log-ratio)))

z, the reference point, estimates KL(policy || reference) from mismatched pairs (each prompt with
the completion of another example of the batch): the mean log-ratio of those rows, detached and
clamped at 0, as TRL's KTOTrainer computes it. A micro-batch of one has no other example to pair
with; its KL row is its own completion.

Nothing here reads the data on the host: the desirable and undesirable examples are told apart by
masks (their metrics are masked sums, methods/preference.metric_sums), never by indexing, whose
shape would come from the labels; so a CUDA graph records the loss (train/graphs.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LAYOUT = "unpaired"
USES_REFERENCE = True


def losses(policy, reference, opts) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ratio = policy.completion - reference.completion
    z = (policy.kl - reference.kl).mean().detach().clamp(min=0)
    good = policy.label
    loss = torch.where(good, opts.desirable_weight * (1 - F.sigmoid(opts.beta * (ratio - z))),
                       opts.undesirable_weight * (1 - F.sigmoid(opts.beta * (z - ratio))))
    reward = opts.beta * ratio.detach()
    logps = policy.completion.detach()
    # chosen and rejected metrics average over their own examples (values, mask); the margin is
    # the difference of those two means (metric_means), as TRL logs it
    return loss, {"rewards/chosen": (reward, good), "rewards/rejected": (reward, ~good),
                  "logps/chosen": (logps, good), "logps/rejected": (logps, ~good),
                  "kl": z.expand(1)}
