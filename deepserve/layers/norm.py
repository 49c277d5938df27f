"""RMSNorm with an optional fused residual add (the pre-norm transformer block's two steps)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from deepserve.layers import fused

if TYPE_CHECKING:
    from deepserve.layers.linear_method import PerTokenQuant


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

    def forward_quantized(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                          qdtype: torch.dtype = torch.int8) -> tuple[PerTokenQuant, torch.Tensor | None]:
        """x [num_tokens, hidden] (and residual like x) -> (norm(x (+ residual)) quantised per token to
        qdtype (int8 / float8_e4m3fn) for a W8A8 linear, x + residual or None): `fused.rms_norm_quant`, one
        launch on CUDA."""
        return fused.rms_norm_quant(x, residual, self.weight, self.eps, qdtype)
