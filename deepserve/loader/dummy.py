"""`--load-format dummy`: random weights of the configured shapes, no checkpoint needed.

Deterministic for a seed (one generator on the parameters' device, walked in `named_parameters`
order); tensors are generated on the target device so big shapes on GPU take milliseconds, not a
host round trip. Norm weights are 1, biases 0, everything else N(0, std).
"""

from __future__ import annotations

import torch
from torch import nn

DUMMY_STD = 0.02


def _is_norm(name: str, param: torch.Tensor) -> bool:
    parts = name.split(".")
    return param.dim() == 1 and parts[-1] == "weight" and len(parts) > 1 and "norm" in parts[-2]


def _fill(name: str, param: torch.Tensor, gen: torch.Generator, std: float) -> None:
    """Fill one parameter in place. [any shape] any dtype (fp8 is drawn in float32 then cast)."""
    if _is_norm(name, param):
        param.fill_(1.0)
    elif param.dim() <= 1 or not param.is_floating_point():
        param.zero_()  # biases, routing bias corrections, integer tensors
    elif param.element_size() >= 2:
        param.normal_(0.0, std, generator=gen)
    else:  # fp8: normal_ is not implemented for 1-byte floats
        noise = torch.empty(param.shape, dtype=torch.float32, device=param.device)
        param.copy_(noise.normal_(0.0, std, generator=gen))


@torch.no_grad()
def fill_dummy_weights(model: nn.Module, seed: int = 0, std: float = DUMMY_STD) -> set[str]:
    """Overwrite every parameter of `model` with dummy values; returns the names filled."""
    generators: dict[torch.device, torch.Generator] = {}
    filled = set()
    for name, param in model.named_parameters():
        if param.device not in generators:
            generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
        _fill(name, param.data, generators[param.device], std)
        filled.add(name)
    return filled
