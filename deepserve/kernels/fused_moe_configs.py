"""Launch configurations of the fused MoE grouped GEMMs, per model shape and batch size.

    CONFIGS[(E, I, dtype)] = {max_tokens: MoeConfig, ...}

E = routed experts held by this rank, I = moe intermediate size per rank (after tensor-parallel
sharding), dtype = activation/weight dtype name ("bfloat16"). A batch of T tokens uses the entry
with the smallest `max_tokens >= T` (the largest entry beyond the table). Shapes missing from the
table use `default_config`. One config serves both launches (gate/up and down): the alignment of
tokens into M-blocks depends on BLOCK_M, so both must share it.

Refresh the entries on a new card with

    .venv/bin/python benchmarks/kernels_moe.py --tune

which prints a table in this format.
"""

from __future__ import annotations

import bisect
from typing import NamedTuple

import torch


class MoeConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


_DECODE = MoeConfig(16, 64, 128, 1, 4, 4)  # a few tokens per expert: weight streaming
_SMALL = MoeConfig(16, 128, 64, 1, 4, 4)
_MEDIUM = MoeConfig(32, 128, 64, 8, 4, 3)
_LARGE = MoeConfig(64, 128, 64, 8, 8, 3)
_PREFILL = MoeConfig(128, 128, 64, 8, 8, 3)

# max_tokens -> config; V2-Lite: E=64, I=1408, H=2048, top-6 (E=66, top-8 with its 2 shared experts
# folded in). V3/R1: E=256, I=2048, H=7168, top-8. The V2-Lite rows were measured on an H200
# (benchmarks/kernels_moe.py --tune --shape v2-lite --shape v2-lite-shared, 2026-11-28; at T <= 8 the
# sweep's times include launch overhead, so those rows are the least certain); V3 rows are estimates.
CONFIGS: dict[tuple[int, int, str], dict[int, MoeConfig]] = {
    (64, 1408, "bfloat16"): {1: _DECODE, 8: MoeConfig(16, 32, 128, 1, 4, 4), 64: MoeConfig(16, 32, 128, 1, 4, 4),
                             128: _DECODE, 256: MoeConfig(32, 64, 128, 8, 4, 3),
                             512: MoeConfig(64, 64, 64, 8, 4, 3), 8192: _PREFILL},
    (66, 1408, "bfloat16"): {1: MoeConfig(16, 32, 64, 1, 4, 4), 8: _DECODE, 32: MoeConfig(16, 32, 128, 1, 4, 4),
                             64: _DECODE, 128: MoeConfig(32, 128, 64, 8, 4, 3),
                             512: MoeConfig(64, 64, 64, 8, 4, 3), 8192: _PREFILL},
    (256, 2048, "bfloat16"): {1: _DECODE, 32: _DECODE, 128: _SMALL, 512: _MEDIUM, 2048: _LARGE,
                              8192: _PREFILL},
}


def default_config(num_tokens: int, num_experts: int, top_k: int) -> MoeConfig:
    """Heuristic by the mean assignments per expert, T*k/E."""
    per_expert = num_tokens * top_k / max(num_experts, 1)
    if per_expert <= 4:
        return _DECODE
    if per_expert <= 16:
        return _SMALL
    if per_expert <= 64:
        return _MEDIUM
    return _LARGE if per_expert <= 256 else _PREFILL


def get_config(num_experts: int, inter: int, dtype: torch.dtype, num_tokens: int,
               top_k: int) -> MoeConfig:
    """The launch config for T = `num_tokens` tokens on experts of shape (E, I) in `dtype`."""
    table = CONFIGS.get((num_experts, inter, str(dtype).removeprefix("torch.")))
    if not table:
        return default_config(num_tokens, num_experts, top_k)
    keys = sorted(table)
    index = min(bisect.bisect_left(keys, num_tokens), len(keys) - 1)
    return table[keys[index]]
