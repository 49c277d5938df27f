"""Gated activations over a merged [gate | up] projection."""

from __future__ import annotations

import torch
from torch import nn

from deepserve.layers import fused


class SiluAndMul(nn.Module):
    """x: [num_tokens, 2 * intermediate] -> silu(x[:, :I]) * x[:, I:]  [num_tokens, intermediate]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused.silu_and_mul(x)


_ACT_AND_MUL = {"silu": SiluAndMul}


def get_act_and_mul(name: str) -> nn.Module:
    """The gated activation for HF `hidden_act` `name`; ValueError listing the supported ones."""
    if name not in _ACT_AND_MUL:
        raise ValueError(f"unsupported hidden_act {name!r} (supported: {', '.join(sorted(_ACT_AND_MUL))})")
    return _ACT_AND_MUL[name]()
