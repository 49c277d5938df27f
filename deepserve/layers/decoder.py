"""The pre-norm transformer block shared by every architecture we serve.

A subclass builds `input_layernorm`, `self_attn` (positions, hidden -> hidden),
`post_attention_layernorm` and `mlp`; the residual add is fused into the norms.
"""

from __future__ import annotations

import torch
from torch import nn


class PreNormDecoderLayer(nn.Module):
    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden, residual: [T, H] (residual None for the first layer) -> (this layer's output,
        the residual stream before it); their sum is the new stream."""
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual
