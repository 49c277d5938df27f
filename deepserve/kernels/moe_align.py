"""Sort MoE token-to-expert assignments by expert and pad each expert's segment to BLOCK_M.

The grouped GEMM of `fused_moe` walks the assignments in M-blocks that each belong to one expert.
With T tokens routed to k experts each, assignment `a = t * k + j` (a flat index into
topk_ids [T, k]) is token t's j-th expert. This module produces

    sorted_ids [P] int32        assignments grouped by expert (ascending expert, then ascending a);
                                each expert's segment padded to a multiple of BLOCK_M with the
                                sentinel T*k; entries past `num_tokens_post_padded` are sentinel
    expert_ids [P / BLOCK_M] int32   the expert of each M-block; -1 past the used blocks
    num_tokens_post_padded [1] int32 used length of sorted_ids (sum of the padded segments)

P is a static upper bound (`max_padded_length`), so the grid of the GEMMs depends on T only and
nothing here syncs with the host: the whole MoE layer can be captured in a CUDA graph; programs
whose block starts at or past `num_tokens_post_padded` return at once.

Implementation choice: the "kernel" is a handful of torch ops (scatter_add counts, cumsum,
stable argsort, one scatter), not a Triton kernel. At decode sizes (T*k <= a few thousand) each op
is a single small launch and the whole alignment costs a few microseconds next to reading the
expert weights; a hand-written Triton version would save launches, not bandwidth. `torch.bincount`
is avoided on purpose: on CUDA it syncs to size its output. `moe_align_block_size_ref` is the
plain per-expert loop the tests compare against.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class MoeAlignment(NamedTuple):
    sorted_ids: torch.Tensor  # [P] int32, sentinel = T*k
    expert_ids: torch.Tensor  # [P // block_m] int32, -1 for unused blocks
    num_tokens_post_padded: torch.Tensor  # [1] int32


def max_padded_length(num_assignments: int, num_experts: int, block_m: int) -> int:
    """Upper bound of sum_e roundup(count_e, block_m) for `num_assignments` = T*k, as a multiple of
    block_m: at most min(E, T*k) experts are non-empty and each pads by at most block_m - 1."""
    bound = num_assignments + min(num_experts, num_assignments) * (block_m - 1)
    return -(-bound // block_m) * block_m


def _check(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> None:
    if topk_ids.dim() != 2 or topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be [num_tokens, top_k] int32/int64, got "
                         f"{tuple(topk_ids.shape)} {topk_ids.dtype}")
    if num_experts < 1 or block_m < 1:
        raise ValueError(f"num_experts ({num_experts}) and block_m ({block_m}) must be positive")


def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> MoeAlignment:
    """topk_ids [T, k] int32/int64 (values in [0, E)) -> MoeAlignment (see the module doc).

    No host synchronisation; ids outside [0, E) are not checked on the device.
    """
    _check(topk_ids, num_experts, block_m)
    device = topk_ids.device
    flat = topk_ids.flatten().long()  # [N], N = T*k
    n = flat.numel()
    counts = torch.zeros(num_experts, dtype=torch.long, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # [E]
    padded = (counts + block_m - 1) // block_m * block_m  # [E]
    padded_end = padded.cumsum(0)  # [E] inclusive
    order = torch.argsort(flat, stable=True)  # [N] assignments grouped by expert
    expert_of = flat[order]  # [N] ascending
    rank = torch.arange(n, device=device) - (counts.cumsum(0) - counts)[expert_of]  # [N] within expert
    dest = (padded_end - padded)[expert_of] + rank  # [N] slot in sorted_ids
    length = max_padded_length(n, num_experts, block_m)
    sorted_ids = torch.full((length,), n, dtype=torch.int32, device=device)
    sorted_ids[dest] = order.to(torch.int32)
    block_starts = torch.arange(0, length, block_m, device=device)  # [P / block_m]
    expert_ids = torch.searchsorted(padded_end, block_starts, right=True)  # [P / block_m]
    expert_ids = torch.where(expert_ids < num_experts, expert_ids, -1).to(torch.int32)
    total = padded_end[-1:].to(torch.int32)  # [1]
    return MoeAlignment(sorted_ids, expert_ids, total)


def moe_align_block_size_ref(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> MoeAlignment:
    """Pure-PyTorch reference, one expert at a time; sorted_ids / expert_ids have exactly the used
    length (no trailing sentinel blocks)."""
    _check(topk_ids, num_experts, block_m)
    flat = topk_ids.flatten().long()  # [N]
    n = flat.numel()
    ids: list[int] = []
    experts: list[int] = []
    for expert in range(num_experts):
        picks = (flat == expert).nonzero().flatten().tolist()
        pad = -len(picks) % block_m
        ids += picks + [n] * pad
        experts += [expert] * ((len(picks) + pad) // block_m)
    as_i32 = dict(dtype=torch.int32, device=topk_ids.device)
    return MoeAlignment(torch.tensor(ids, **as_i32), torch.tensor(experts, **as_i32),
                        torch.tensor([len(ids)], **as_i32))
