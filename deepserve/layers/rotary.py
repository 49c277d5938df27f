"""Rotary position embedding with default, linear, Llama-3 and YaRN frequency scaling.

Two pairings of the rotated dimensions exist in the checkpoints we serve:
  * neox style (Llama, Qwen2): dimension i pairs with i + d/2 ("rotate half");
  * interleaved style (DeepSeek-V2/V3): dimension 2i pairs with 2i + 1.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from deepserve.layers import fused


def default_inv_freq(dim: int, base: float) -> torch.Tensor:
    """[dim // 2] float32 inverse frequencies base^(-2i/dim)."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)).float()


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: Mapping[str, Any]) -> torch.Tensor:
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_correction_range(dim: int, base: float, max_pos: int, beta_fast: float, beta_slow: float,
                           truncate: bool) -> tuple[float, float]:
    def correction_dim(rotations: float) -> float:
        return dim * math.log(max_pos / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def yarn_inv_freq(dim: int, base: float, scaling: Mapping[str, Any], max_position: int) -> torch.Tensor:
    factor = scaling["factor"]
    original = scaling.get("original_max_position_embeddings") or max_position
    low, high = _yarn_correction_range(dim, base, original, scaling.get("beta_fast") or 32,
                                       scaling.get("beta_slow") or 1, scaling.get("truncate", True))
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency, 0: interpolate
    inv_freq = default_inv_freq(dim, base)
    return inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate


def yarn_cos_sin_scale(scaling: Mapping[str, Any]) -> float:
    """YaRN's attention factor applied to cos/sin (1.0 when mscale == mscale_all_dim, as in V3)."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor, mscale, mscale_all = scaling["factor"], scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all:
        return yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all)
    return yarn_get_mscale(factor)


def yarn_softmax_scale(scaling: Mapping[str, Any] | None) -> float:
    """Multiplier on DeepSeek's softmax scale: mscale(factor, mscale_all_dim)^2, else 1."""
    if not scaling or scaling.get("rope_type", scaling.get("type")) != "yarn":
        return 1.0
    mscale_all = scaling.get("mscale_all_dim", 0)
    return yarn_get_mscale(scaling["factor"], mscale_all) ** 2 if mscale_all else 1.0


def inv_freq_and_scale(dim: int, base: float, scaling: Mapping[str, Any] | None,
                       max_position: int) -> tuple[torch.Tensor, float]:
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return default_inv_freq(dim, base), 1.0
    if kind == "linear":
        return default_inv_freq(dim, base) / scaling["factor"], 1.0
    if kind == "llama3":
        return llama3_inv_freq(default_inv_freq(dim, base), scaling), 1.0
    if kind == "yarn":
        return yarn_inv_freq(dim, base, scaling, max_position), yarn_cos_sin_scale(scaling)
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3, yarn)")


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, base: float,
                 scaling: Mapping[str, Any] | None = None, interleaved: bool = False):
        super().__init__()
        self.head_dim = head_dim
        self.interleaved = interleaved
        inv_freq, scale = inv_freq_and_scale(head_dim, base, scaling, max_position)
        table_len = max(max_position, int((scaling or {}).get("original_max_position_embeddings", 0)))
        freqs = torch.outer(torch.arange(table_len, dtype=torch.float32), inv_freq)  # [P, D/2]
        self.register_buffer("cos", freqs.cos() * scale, persistent=False)
        self.register_buffer("sin", freqs.sin() * scale, persistent=False)

    def _apply(self, fn, recurse=True):
        """Module casts move the cos/sin tables but keep them float32: `model.to(device, bf16)` must
        not round them (the rotary kernel requires float32 tables of equal strides)."""
        tables = {name: self._buffers[name] for name in ("cos", "sin")}
        super()._apply(fn, recurse)
        for name, table in tables.items():
            moved = self._buffers[name]
            if moved.dtype != table.dtype:
                self._buffers[name] = table.to(moved.device)  # the float32 values, on the new device
        return self

    def rotate(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, num_heads, head_dim]; positions: [num_tokens] int64."""
        return fused.apply_rotary(positions, x, None, self.cos, self.sin, self.interleaved)[0]

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return fused.apply_rotary(positions, q, k, self.cos, self.sin, self.interleaved)
