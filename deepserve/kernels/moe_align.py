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

Implementations (identical outputs):
  * `moe_align_block_size` on CUDA tensors: one Triton kernel (`moe_align_block_size_triton`, which
    the interpreter also runs on CPU), no atomics, so the order is the documented one and the
    output deterministic.
    - Up to _SINGLE_MAX assignments (decode): one program, one launch. It sorts the keys
      expert * BLOCK_N + a in registers; along the sorted order an element's rank in its expert's
      run comes from a running max, every element whose rank is a multiple of BLOCK_M opens an
      M-block, and a cumsum over the openers gives each element's slot and each block's expert.
      The sentinel / -1 fill is written first, then (after a barrier) the real entries.
    - Beyond (prefill): two launches over chunks of assignments. Pass 1 writes per-chunk expert
      counts to a [chunks, E] workspace; in pass 2 every program sums the workspace (totals, and
      the counts of earlier chunks: its base slot per expert), places its chunk in order (ranks
      from [SUB, SUB] comparisons), and labels its share of the M-blocks (expert id or -1, the
      sentinel in their padding slots), so no fill launch is needed.
  * elsewhere `moe_align_block_size_torch`: a handful of torch ops (scatter_add counts, cumsum,
    stable argsort, one scatter); `torch.bincount` is avoided on purpose (it syncs on CUDA).
  * `moe_align_block_size_ref` is the plain per-expert loop the tests compare against.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from deepserve.kernels.pdl import pdl_launch, pdl_prologue
from deepserve.kernels.sizes import cdiv, next_power_of_2

# Measured on an H200 (benchmarks/kernels_moe.py --align, CUDA-graph replay, V2-Lite): one program
# takes 8.2 / 12.0 / 25.7 / 91 us at 384 / 768 / 1536 / 3072 assignments; two launches over chunks of
# 64 take 11.8 / 12.7 / 13.3 / 15.1 us there (chunks of 1024, the old default: 62.5 us at 1536).
_SINGLE_MAX = 1024  # assignments (T*k) aligned by one program in one launch; more: two launches
_CHUNK = 64  # assignments per program in the two-launch path (grown to keep <= _MAX_PROGRAMS)
_MAX_PROGRAMS = 256  # bounds the workspace every pass-2 program sums


class MoeAlignment(NamedTuple):
    sorted_ids: torch.Tensor  # [P] int32, sentinel = T*k
    expert_ids: torch.Tensor  # [P // block_m] int32, -1 for unused blocks
    num_tokens_post_padded: torch.Tensor  # [1] int32


def max_padded_length(num_assignments: int, num_experts: int, block_m: int) -> int:
    """Upper bound of sum_e roundup(count_e, block_m) for `num_assignments` = T*k, as a multiple of
    block_m: at most min(E, T*k) experts are non-empty and each pads by at most block_m - 1."""
    bound = num_assignments + min(num_experts, num_assignments) * (block_m - 1)
    return -(-bound // block_m) * block_m


@triton.jit
def _load_experts(ids_ptr, a, hi, num_experts):
    """Expert of assignments a [SUB] (int32); -1 past `hi` and for ids outside [0, E)."""
    e = tl.load(ids_ptr + a, mask=a < hi, other=-1).to(tl.int32)
    return tl.where((e >= 0) & (e < num_experts), e, -1)


@triton.jit
def _count(ids_ptr, lo, hi, num_experts, SUB: tl.constexpr, BLOCK_E: tl.constexpr):
    """[BLOCK_E] int32: assignments in [lo, hi) per expert."""
    experts = tl.arange(0, BLOCK_E)
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for start in range(lo, hi, SUB):
        e = _load_experts(ids_ptr, start + tl.arange(0, SUB), hi, num_experts)
        counts += tl.sum((e[:, None] == experts[None, :]).to(tl.int32), axis=0)  # [SUB, BE] -> [BE]
    return counts


@triton.jit
def _sum_counts(ws_ptr, pid, num_chunks, BLOCK_E: tl.constexpr):
    """Workspace [chunks, BLOCK_E] -> (counts of all chunks, counts of the chunks before `pid`)."""
    experts = tl.arange(0, BLOCK_E)
    total = tl.zeros([BLOCK_E], dtype=tl.int32)
    before = tl.zeros([BLOCK_E], dtype=tl.int32)
    for c in range(0, num_chunks):
        row = tl.load(ws_ptr + c * BLOCK_E + experts)
        total += row
        before += tl.where(c < pid, row, 0)
    return total, before


@triton.jit
def _place(ids_ptr, sorted_ptr, lo, hi, next_slot, num_experts, SUB: tl.constexpr,
           BLOCK_E: tl.constexpr):
    """sorted_ids[slot] = a for the assignments a in [lo, hi), in ascending a per expert;
    next_slot [BLOCK_E]: the slot of each expert's first assignment in this range."""
    experts = tl.arange(0, BLOCK_E)
    r = tl.arange(0, SUB)
    for start in range(lo, hi, SUB):
        a = start + r
        e = _load_experts(ids_ptr, a, hi, num_experts)
        onehot = (e[:, None] == experts[None, :]).to(tl.int32)  # [SUB, BE]
        earlier = (e[:, None] == e[None, :]) & (r[None, :] < r[:, None])  # [SUB, SUB]
        slot = tl.sum(onehot * next_slot[None, :], axis=1) + tl.sum(earlier.to(tl.int32), axis=1)
        tl.store(sorted_ptr + slot, a.to(tl.int32), mask=e >= 0)
        next_slot += tl.sum(onehot, axis=0)


@triton.jit
def _label_blocks(sorted_ptr, expert_ids_ptr, b_lo, b_hi, end, filled_end, n, num_experts, block_m,
                  BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr):
    """M-blocks [b_lo, b_hi): expert_ids (the expert whose padded segment holds the block, -1 past
    the last) and the sentinel n in every slot at or past the expert's last real assignment.
    end [BLOCK_E]: inclusive cumsum of the padded segments; filled_end: segment start + count."""
    experts = tl.arange(0, BLOCK_E)
    cols = tl.arange(0, BLOCK_M)
    for b0 in range(b_lo, b_hi, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        first = b * block_m  # [BB] first slot of each block
        passed = (end[None, :] <= first[:, None]) & (experts[None, :] < num_experts)  # [BB, BE]
        eid = tl.sum(passed.to(tl.int32), axis=1)  # [BB]: searchsorted(end, first, right=True)
        used = eid < num_experts
        tl.store(expert_ids_ptr + b, tl.where(used, eid, -1), mask=b < b_hi)
        fill = tl.sum(tl.where(experts[None, :] == eid[:, None], filled_end[None, :], 0), axis=1)
        fill = tl.where(used, fill, 0)  # [BB]
        slot = first[:, None] + cols[None, :]  # [BB, BM]
        pad = (b[:, None] < b_hi) & (cols[None, :] < block_m) & (slot >= fill[:, None])
        tl.store(sorted_ptr + slot, tl.zeros([BLOCK_B, BLOCK_M], dtype=tl.int32) + n, mask=pad)


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _align_sorted(ids_ptr, sorted_ptr, expert_ids_ptr, total_ptr, n, num_experts, block_m, length,
                  num_blocks, BLOCK_N: tl.constexpr, FILL: tl.constexpr):
    """All n <= BLOCK_N assignments in registers: sort the keys expert * BLOCK_N + a; along the
    sorted order, rank = position - start of the expert's run (a running max); an element whose
    rank is a multiple of block_m opens an M-block, so the inclusive cumsum of block_m at those
    elements is (segment start + block_m * (rank // block_m + 1)) and gives each element's slot."""
    p = tl.arange(0, BLOCK_N)
    e = _load_experts(ids_ptr, p, n, num_experts)
    none = num_experts * BLOCK_N
    key = tl.sort(tl.where(e >= 0, e * BLOCK_N + p, none))
    real = key < none
    expert, a = key // BLOCK_N, key % BLOCK_N
    run = tl.associative_scan(tl.where(real, expert * BLOCK_N + (BLOCK_N - 1 - p), -1), 0, _maximum)
    rank = p - (BLOCK_N - 1 - run % BLOCK_N)  # [BN] position within the expert's run
    opens = real & (rank % block_m == 0)
    upto = tl.cumsum(tl.where(opens, block_m, 0), axis=0)  # [BN]
    slot = upto - block_m + rank % block_m
    for f in range(0, length, FILL):  # sentinel / -1 everywhere, then the real entries
        tl.store(sorted_ptr + f + tl.arange(0, FILL), tl.zeros([FILL], dtype=tl.int32) + n,
                 mask=f + tl.arange(0, FILL) < length)
    for f in range(0, num_blocks, FILL):
        tl.store(expert_ids_ptr + f + tl.arange(0, FILL), tl.full([FILL], -1, tl.int32),
                 mask=f + tl.arange(0, FILL) < num_blocks)
    tl.debug_barrier()  # orders the fills before the stores below (one program: bar.sync)
    tl.store(sorted_ptr + slot, a, mask=real)
    tl.store(expert_ids_ptr + slot // block_m, expert, mask=opens)
    tl.store(total_ptr, tl.sum(tl.where(opens, block_m, 0), axis=0))


@triton.jit(do_not_specialize=["n", "length", "num_blocks", "chunk", "num_chunks", "per_program"])
def _moe_align_kernel(ids_ptr, ws_ptr, sorted_ptr, expert_ids_ptr, total_ptr,
                      n, num_experts, block_m, length, num_blocks, chunk, num_chunks, per_program,
                      MODE: tl.constexpr, SUB: tl.constexpr, BLOCK_E: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr = False):
    """MODE 0: one program, all n <= BLOCK_N assignments (`_align_sorted`).
    MODE 1 (pass 1): program p counts the experts of assignments [p*chunk, (p+1)*chunk) into
    workspace row p. MODE 2 (pass 2): program p sums the workspace, places the same assignments
    and labels M-blocks [p*per_program, (p+1)*per_program)."""
    pdl_prologue(PDL)  # first: wait for the previous kernel (kernels/pdl.py)
    pid = tl.program_id(0)
    lo = pid * chunk
    hi = tl.minimum(lo + chunk, n)
    if MODE == 0:
        _align_sorted(ids_ptr, sorted_ptr, expert_ids_ptr, total_ptr, n, num_experts, block_m,
                      length, num_blocks, BLOCK_N, 1024)
    elif MODE == 1:
        tl.store(ws_ptr + pid * BLOCK_E + tl.arange(0, BLOCK_E),
                 _count(ids_ptr, lo, hi, num_experts, SUB, BLOCK_E))
    else:
        counts, before = _sum_counts(ws_ptr, pid, num_chunks, BLOCK_E)
        padded = (counts + block_m - 1) // block_m * block_m  # [BE]
        end = tl.cumsum(padded, axis=0)
        start = end - padded
        _place(ids_ptr, sorted_ptr, lo, hi, start + before, num_experts, SUB, BLOCK_E)
        b_lo = pid * per_program
        b_hi = tl.minimum(b_lo + per_program, num_blocks)
        _label_blocks(sorted_ptr, expert_ids_ptr, b_lo, b_hi, end, start + counts, n, num_experts,
                      block_m, BLOCK_E, BLOCK_B, BLOCK_M)
        if pid == 0:
            tl.store(total_ptr, tl.sum(padded, axis=0))


def _check(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> None:
    if topk_ids.dim() != 2 or topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be [num_tokens, top_k] int32/int64, got "
                         f"{tuple(topk_ids.shape)} {topk_ids.dtype}")
    if num_experts < 1 or block_m < 1:
        raise ValueError(f"num_experts ({num_experts}) and block_m ({block_m}) must be positive")


def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> MoeAlignment:
    """topk_ids [T, k] int32/int64 (values in [0, E)) -> MoeAlignment (see the module doc).

    The Triton kernel for CUDA tensors, torch ops elsewhere; no host synchronisation either way.
    """
    if topk_ids.is_cuda:
        return moe_align_block_size_triton(topk_ids, num_experts, block_m)
    return moe_align_block_size_torch(topk_ids, num_experts, block_m)


def _tiles(num_experts: int, block_m: int) -> dict[str, int]:
    """Tile sizes: [SUB, BLOCK_E], [SUB, SUB], [BLOCK_B, BLOCK_E] and [BLOCK_B, BLOCK_M] stay <= 4K."""
    block_e, bm = next_power_of_2(num_experts), next_power_of_2(block_m)
    return dict(SUB=max(16, min(64, 4096 // block_e)), BLOCK_E=block_e,
                BLOCK_B=max(1, min(64, 4096 // max(block_e, bm))), BLOCK_M=bm)


def moe_align_block_size_triton(topk_ids: torch.Tensor, num_experts: int, block_m: int, *,
                                single_max: int | None = None, chunk: int | None = None) -> MoeAlignment:
    """The Triton path of `moe_align_block_size` (any device Triton runs on): one launch for up to
    `single_max` (default _SINGLE_MAX) assignments, two beyond, with at least `chunk` (default
    _CHUNK) assignments per program; benchmarks sweep both. Ids outside [0, E) are left out of
    sorted_ids."""
    _check(topk_ids, num_experts, block_m)
    single_max = _SINGLE_MAX if single_max is None else single_max
    if chunk is None:  # wider expert rows make pass 2's workspace sum dearer: fewer, longer chunks
        chunk = _CHUNK * max(1, next_power_of_2(num_experts) // 64)
    ids = topk_ids.reshape(-1)  # [N] (a view when contiguous)
    n, device = ids.numel(), ids.device
    length = max_padded_length(n, num_experts, block_m)
    num_blocks = length // block_m
    sorted_ids = torch.empty(length, dtype=torch.int32, device=device)
    expert_ids = torch.empty(num_blocks, dtype=torch.int32, device=device)
    if n == 0:
        return MoeAlignment(sorted_ids, expert_ids, torch.zeros(1, dtype=torch.int32, device=device))
    total = torch.empty(1, dtype=torch.int32, device=device)
    tiles = _tiles(num_experts, block_m)
    warps = 4 if tiles["BLOCK_E"] <= 256 else 8
    args = (n, num_experts, block_m, length, num_blocks)
    if n <= single_max:
        block_n = max(16, next_power_of_2(n))
        _moe_align_kernel[(1,)](ids, total, sorted_ids, expert_ids, total, *args, n, 1, num_blocks,
                                MODE=0, BLOCK_N=block_n, num_warps=4 if block_n <= 1024 else 8, **tiles,
                                **pdl_launch(device))
        return MoeAlignment(sorted_ids, expert_ids, total)
    chunk = max(chunk, -(-cdiv(n, _MAX_PROGRAMS) // tiles["SUB"]) * tiles["SUB"])
    num_chunks = cdiv(n, chunk)
    workspace = torch.empty(num_chunks, tiles["BLOCK_E"], dtype=torch.int32, device=device)
    per_program = cdiv(num_blocks, num_chunks)
    for mode in (1, 2):
        _moe_align_kernel[(num_chunks,)](ids, workspace, sorted_ids, expert_ids, total, *args, chunk,
                                         num_chunks, per_program, MODE=mode, BLOCK_N=16,
                                         num_warps=warps, **tiles, **pdl_launch(device))
    return MoeAlignment(sorted_ids, expert_ids, total)


def moe_align_block_size_torch(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> MoeAlignment:
    """The torch-ops path of `moe_align_block_size` (~12 small launches on CUDA): the CPU path."""
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
