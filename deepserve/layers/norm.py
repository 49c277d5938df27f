"""RMSNorm with an optional fused residual add (the pre-norm transformer block's two steps)."""

from __future__ import annotations

import torch
from torch import nn

from deepserve.layers import fused


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, the statistics computed in float32.

    `forward(x)` returns the normalised x; `forward(x, residual)` first adds, then returns
    `(norm(x + residual), x + residual)` so the caller keeps the new residual stream.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x [num_tokens, hidden] (and residual like x) -> norm(x) or (norm(x + residual), x + residual)."""
        return fused.rms_norm(x, residual, self.weight, self.eps)
