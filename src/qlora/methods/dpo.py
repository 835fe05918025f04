"""DPO (Rafailov et al. 2023): the log-ratio of policy to reference, chosen minus rejected.

loss_type sigmoid: -log σ(β Δ), with label_smoothing ε the conservative DPO of older TRL,
-(1-ε) log σ(β Δ) - ε log σ(-β Δ) (TRL 1.x's sigmoid is the ε = 0 case; its "robust" is another
loss); hinge: relu(1 - β Δ); ipo: (Δ̄ - 1/2β)², Δ̄ from the log-ratios averaged over each
completion's tokens (as TRL does, so β means the same at any completion length).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LAYOUT = "pairs"
USES_REFERENCE = True
LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def losses(policy, reference, opts) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    chosen_ratio = policy.chosen - reference.chosen
    rejected_ratio = policy.rejected - reference.rejected
    delta = chosen_ratio - rejected_ratio
    beta = opts.beta
    if opts.loss_type == "sigmoid":
        eps = opts.label_smoothing
        loss = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    elif opts.loss_type == "hinge":
        loss = torch.relu(1 - beta * delta)
    elif opts.loss_type == "ipo":
        per_token = chosen_ratio / policy.chosen_tokens.clamp(min=1) \
            - rejected_ratio / policy.rejected_tokens.clamp(min=1)
        loss = (per_token - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {opts.loss_type!r}")
    chosen_reward, rejected_reward = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    return loss, reward_metrics(chosen_reward, rejected_reward, policy)


def reward_metrics(chosen_reward, rejected_reward, policy) -> dict[str, torch.Tensor]:
    """The rewards/* and logps/* values of a batch of pairs, one per example (TRL's names)."""
    return {"rewards/chosen": chosen_reward, "rewards/rejected": rejected_reward,
            "rewards/margins": chosen_reward - rejected_reward,
            "rewards/accuracies": (chosen_reward > rejected_reward).float(),
            "logps/chosen": policy.chosen.detach(), "logps/rejected": policy.rejected.detach()}
