"""Routed experts stored as int8 per (expert, output row), for the int8 serving modes off CUDA.

    Int8RoutedExperts(w13_q [E, 2I, H] int8, w13_scale [E, 2I] f32, w2_q [E, H, I] int8,
                      w2_scale [E, H] f32, act)
    forward(x [T, H], routing [T, k]) -> [T, H]

Symmetric per-row int8 (`quantize_rows_int8_ref`): each weight is within scale[row] / 2 of the float
weight it came from. The math is `fused_experts_ref`'s (per-expert loop, float32 accumulation), with
each used expert's matrices dequantised to x's dtype when it is reached: activations stay in float
(W8A16), weights take a quarter of float32's memory. On CUDA the loader does not call
`quantize_routed_experts_int8`: the experts arrive in the model dtype and `RoutedExperts` quantises
them itself for the fused Triton kernel's W8A16 specialisation (`int8_experts.py`).
"""

from __future__ import annotations

import torch
from torch import nn

from deepserve.layers.moe import RoutedExperts, Routing, fused_experts_ref
from deepserve.quant.block_fp8_ref import quantize_rows_int8_ref


class _DequantizedOnIndex:
    """Stands in for a stacked [E, N, K] weight: `[e]` gives expert e's [N, K] in `dtype`."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        self.q, self.scale, self.dtype = q, scale, dtype
        self.shape = q.shape

    def __getitem__(self, expert: int) -> torch.Tensor:
        return (self.q[expert].to(torch.float32) * self.scale[expert][:, None]).to(self.dtype)  # [N, K]


class Int8RoutedExperts(nn.Module):
    def __init__(self, w13_q: torch.Tensor, w13_scale: torch.Tensor, w2_q: torch.Tensor,
                 w2_scale: torch.Tensor, act: nn.Module):
        super().__init__()
        self.w13_q = nn.Parameter(w13_q, requires_grad=False)
        self.w13_scale = nn.Parameter(w13_scale, requires_grad=False)
        self.w2_q = nn.Parameter(w2_q, requires_grad=False)
        self.w2_scale = nn.Parameter(w2_scale, requires_grad=False)
        self.act = act

    @classmethod
    def from_float(cls, experts: RoutedExperts) -> "Int8RoutedExperts":
        w13_q, w13_scale = quantize_rows_int8_ref(experts.w13.detach())
        w2_q, w2_scale = quantize_rows_int8_ref(experts.w2.detach())
        return cls(w13_q, w13_scale, w2_q, w2_scale, experts.act)

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """x: [T, H] -> [T, H] in x's dtype."""
        w13 = _DequantizedOnIndex(self.w13_q, self.w13_scale, x.dtype)
        w2 = _DequantizedOnIndex(self.w2_q, self.w2_scale, x.dtype)
        return fused_experts_ref(x, w13, w2, routing, self.act)


def quantize_routed_experts_int8(model: nn.Module) -> int:
    """Replace every `RoutedExperts` of `model` by its `Int8RoutedExperts`; how many were replaced."""
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, RoutedExperts)]
    for name, experts in targets:
        parent_path, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, attr, Int8RoutedExperts.from_float(experts))
    return len(targets)
