"""SimPO (Meng et al. 2024): -log σ(β (avg log p(chosen) - avg log p(rejected)) - γ), no
reference model; the averages are over each completion's tokens. TRL's CPOTrainer with
loss_type="simpo" (its simpo_gamma is γ, its label_smoothing ε as in DPO's sigmoid), and its
cpo_alpha: an NLL term on the chosen completions, 0 here by default as in the SimPO paper
(CPOConfig defaults to 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qlora.methods.dpo import reward_metrics

LAYOUT = "pairs"
USES_REFERENCE = False


def losses(policy, reference, opts) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    chosen, rejected = policy.chosen_mean, policy.rejected_mean
    margin = opts.beta * (chosen - rejected) - opts.simpo_gamma
    eps = opts.label_smoothing
    loss = -(1 - eps) * F.logsigmoid(margin) - eps * F.logsigmoid(-margin)
    metrics = reward_metrics(opts.beta * chosen.detach(), opts.beta * rejected.detach(), policy)
    metrics.update({"logps/chosen": chosen.detach(), "logps/rejected": rejected.detach()})
    if opts.cpo_alpha:
        nll = policy.chosen_nll_mean.expand_as(loss)
        loss = loss + opts.cpo_alpha * nll
        metrics["nll_loss"] = nll.detach()
    return loss, metrics
