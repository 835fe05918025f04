"""RMSNorm as the supported families define it (Llama's: normalise in fp32, scale in the input
dtype). The fast path's (speed/fast_decoder.py) runs the same math in one Triton kernel."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32, scale in the input dtype: what the checkpoints were trained with
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + residual, this norm of it): one step a fused kernel can take at once."""
        total = x + residual
        return total, self(total)
