"""MoE backends: who computes the routed experts of `DeepseekMoE`.

    backend.apply(x [T, H], w13 [E, 2I, H], w2 [E, H, I], routing [T, k], act, addend [T, H] | None,
                  w13_scale [E, 2I] f32 | None, w2_scale [E, H] f32 | None, int8_activations=False,
                  x_quant=(q [T, H] int8, scale [T] f32) | None)
        -> [T, H] = round(routed sum) (+ addend, rounded again: the unfused shared-expert output)

    "torch"   `fused_experts_ref`: per-expert loop in PyTorch, any device (the CPU path)
    "triton"  `deepserve.kernels.fused_moe`: expert-sorted grouped GEMMs, SiLU fused, the k-sum and
              the addend in one more launch (`moe_sum`); CUDA tensors

`fuses_shared_experts`: whether `DeepseekMoE` folds its shared experts into the expert stack when
this backend serves it (triton: the shared experts become 2 more rows of the same grouped GEMMs,
instead of three GEMM launches, an activation and an add; torch: no gain, today's path kept).
`int8_weights`: whether `apply` takes int8 stacks with per-(expert, row) scales (W8A16; triton), so
that `RoutedExperts` quantises its stacks under the int8 serving modes (`quant/int8_experts.py`);
`int8_activations` (int8 stacks only) asks for W8A8, the activations quantised per row as well
(`RoutedExperts` decides it: `int8` mode and a batch of at least `W8A8_MIN_TOKENS`, 256); `x_quant` hands
the W8A8 path x already quantised per token (triton; `DeepseekMoE` shares it with its shared MLP).

`get_moe_backend(name)` builds a backend by name (module imported on first use, so importing this
file never imports Triton); `moe_backend_for(device)` picks the default for a device type: triton on
CUDA, torch elsewhere.
"""

from __future__ import annotations

import functools
import importlib
from types import MappingProxyType
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from deepserve.layers.moe import Routing

Act = Callable[[torch.Tensor], torch.Tensor]  # gated activation: [n, 2I] -> [n, I]


class MoEBackend:
    """Interface: one method, no state."""

    name: str = "base"
    fuses_shared_experts: bool = False
    int8_weights: bool = False

    def apply(self, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, routing: "Routing",
              act: Act, addend: torch.Tensor | None = None, w13_scale: torch.Tensor | None = None,
              w2_scale: torch.Tensor | None = None, int8_activations: bool = False,
              x_quant: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x [T, H], w13 [E, 2I, H] (gate | up), w2 [E, H, I], routing [T, k], addend [T, H] or None
        -> [T, H] x's dtype. int8 w13 / w2 come with w13_scale [E, 2I] / w2_scale [E, H] f32 (only
        where `int8_weights`); int8_activations: W8A8 on those stacks, with x_quant (q [T, H] int8,
        scale [T] f32) its per-token quantisation when the caller has it."""
        raise NotImplementedError


class TorchMoEBackend(MoEBackend):
    name = "torch"

    def apply(self, x, w13, w2, routing, act, addend=None, w13_scale=None, w2_scale=None, int8_activations=False,
              x_quant=None):
        from deepserve.layers.moe import fused_experts_ref

        if w13_scale is not None or w2_scale is not None or int8_activations or x_quant is not None:
            raise ValueError("the torch MoE backend takes float expert stacks (int8_weights is False)")
        out = fused_experts_ref(x, w13, w2, routing, act)
        return out if addend is None else out + addend


class TritonMoEBackend(MoEBackend):
    """The fused kernels compute SiLU themselves, so `act` must be `SiluAndMul`."""

    name = "triton"
    fuses_shared_experts = True
    int8_weights = True

    def apply(self, x, w13, w2, routing, act, addend=None, w13_scale=None, w2_scale=None, int8_activations=False,
              x_quant=None):
        from deepserve.kernels.fused_moe import fused_moe
        from deepserve.layers.activation import SiluAndMul

        if not isinstance(act, SiluAndMul):
            raise ValueError(f"the triton MoE backend fuses SiLU only; got {type(act).__name__}")
        return fused_moe(x, w13, w2, routing.weights, routing.ids, addend=addend, w13_scale=w13_scale,
                         w2_scale=w2_scale, int8_activations=int8_activations, x_quant=x_quant)


BACKENDS = MappingProxyType({
    "torch": "deepserve.layers.moe_backend:TorchMoEBackend",
    "triton": "deepserve.layers.moe_backend:TritonMoEBackend",
})
DEVICE_DEFAULTS = MappingProxyType({"cuda": "triton"})  # device type -> backend; others: torch


@functools.lru_cache(maxsize=None)
def get_moe_backend(name: str) -> MoEBackend:
    """The backend registered under `name`; ValueError naming the known ones."""
    if name not in BACKENDS:
        raise ValueError(f"unknown MoE backend {name!r}; known: {', '.join(BACKENDS)}")
    module, _, attr = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), attr)()


def moe_backend_for(device: torch.device) -> MoEBackend:
    """The default backend for tensors on `device`."""
    return get_moe_backend(DEVICE_DEFAULTS.get(device.type, "torch"))
