"""Fused MoE router: scoring, group limit, top-k and weight normalisation in one launch.

    moe_router(logits [T, E] f32, cfg, correction_bias [E] | None, num_shared=0)
        -> TopK(weights [T, k + num_shared] f32, ids [T, k + num_shared] int64)

Semantics are those of `deepserve.layers.moe.select_experts` (its module docstring lists the five
steps); `moe_router_ref` is that function. The router's GEMM stays outside (cuBLAS F.linear); this
kernel replaces the ~8 torch ops that follow it (softmax/sigmoid, bias add, the group mask's
view/topk/scatter/expand, the stable sort, gather, normalise, scale) with one launch, which is
what matters once a decode step is a CUDA graph and each MoE layer costs its number of kernels.

One program per token, one warp for E <= 512. The row's E experts are held as a [BLOCK_G, BLOCK_S]
tile, row g = group g (experts g*S .. g*S+S-1, S = E / n_group); without a group limit the tile is
one group of E. Selections are rounds of argmax-and-mask: the maximum, then the lowest index holding
it (ties go to the lower index, as the reference's stable sort does):
  * group score: max of the group (group_limited_greedy) or the sum of its two best choices
    (noaux_tc: the best, plus the best of the rest, so a repeated maximum counts twice);
  * topk_group rounds over the group scores keep the best groups; the others become -inf;
  * top_k rounds over the tile give the ids in decreasing choice order; each round also picks up
    the unbiased score of its expert.
Weights = scores / (sum + 1e-20) if norm_topk_prob, times routed_scaling_factor, in the reference's
order of operations. `num_shared` > 0 (shared experts folded into the expert stack, see
`DeepseekMoE`): columns k .. k+n-1 get ids E .. E+n-1 and weight 1.0, written by the same program,
so the fused expert call needs no concatenation launch (`with_shared_experts` is their reference). exp/sigmoid may differ from torch's by an ulp or two, so only choices closer
than that can order differently (ties of equal logits order identically).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import triton
import triton.language as tl

from deepserve.kernels.pdl import pdl_launch, pdl_prologue
from deepserve.kernels.sizes import next_power_of_2

if TYPE_CHECKING:
    from deepserve.layers.moe import RouterConfig

_MAX_TILE = 4096  # experts held by one program (padded to powers of two per group and per group size)


class TopK(NamedTuple):
    weights: torch.Tensor  # [T, k] float32
    ids: torch.Tensor  # [T, k] int64, by decreasing choice score


@triton.jit
def _argmax_lowest(values, avail, index):
    """Over the entries where `avail`: (max value, lowest `index` holding it). 2-D tiles."""
    masked = tl.where(avail, values, -float("inf"))
    best = tl.max(tl.max(masked, axis=1), axis=0)
    hit = avail & (masked == best)
    return best, tl.min(tl.min(tl.where(hit, index, 2147483647), axis=1), axis=0)


@triton.jit
def _group_keep(choice, s, num_groups, group_size, TOP2: tl.constexpr, TOPK_GROUP: tl.constexpr,
                BLOCK_G: tl.constexpr):
    """choice [BG, BS] f32 (-inf where invalid) -> [BG, 1] bool: the topk_group best groups."""
    best = tl.max(choice, axis=1)  # [BG]
    if TOP2:  # plus the best of the rest of the group (the first maximum removed)
        first = tl.min(tl.where(choice == best[:, None], s, 2147483647), axis=1)  # [BG]
        second = tl.max(tl.where(s == first[:, None], -float("inf"), choice), axis=1)
        best = best + tl.where(group_size > 1, second, 0.0)
    g = tl.arange(0, BLOCK_G)[:, None]  # [BG, 1]
    score = best[:, None]  # [BG, 1]
    avail = g < num_groups
    keep = g < 0
    for _i in tl.static_range(TOPK_GROUP):
        _, pick = _argmax_lowest(score, avail, g)
        keep = keep | (g == pick)
        avail = avail & (g != pick)
    return keep


@triton.jit
def _moe_router_kernel(logits_ptr, bias_ptr, weights_ptr, ids_ptr, stride_t, num_groups, group_size,
                       scale,
                       SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP_LIMIT: tl.constexpr,
                       TOP2: tl.constexpr, TOPK_GROUP: tl.constexpr, NORM: tl.constexpr,
                       TOP_K: tl.constexpr, NUM_SHARED: tl.constexpr,
                       BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
    """One token: logits row [E] -> weights [k + n] f32, ids [k + n] int64 (n = NUM_SHARED:
    ids E.., weight 1)."""
    pdl_prologue(PDL)  # first: wait for the previous kernel (kernels/pdl.py)
    t = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, BLOCK_G)[:, None]
    s = tl.arange(0, BLOCK_S)[None, :]
    expert = g * group_size + s  # [BG, BS]
    valid = (g < num_groups) & (s < group_size)
    x = tl.load(logits_ptr + t * stride_t + expert, mask=valid, other=-float("inf")).to(tl.float32)
    if SIGMOID:
        scores = 1.0 / (1.0 + tl.exp(-x))
    else:
        e = tl.where(valid, tl.exp(x - tl.max(tl.max(x, axis=1), axis=0)), 0.0)
        scores = e / tl.sum(tl.sum(e, axis=1), axis=0)
    choice = scores
    if HAS_BIAS:
        choice = choice + tl.load(bias_ptr + expert, mask=valid, other=0.0).to(tl.float32)
    choice = tl.where(valid, choice, -float("inf"))
    if GROUP_LIMIT:
        keep = _group_keep(choice, s, num_groups, group_size, TOP2, TOPK_GROUP, BLOCK_G)
        choice = tl.where(keep, choice, -float("inf"))
    slot = tl.arange(0, BLOCK_K)
    out_ids = tl.zeros([BLOCK_K], dtype=tl.int32)
    out_w = tl.zeros([BLOCK_K], dtype=tl.float32)
    avail = valid
    for j in tl.static_range(TOP_K):
        _, pick = _argmax_lowest(choice, avail, expert)
        hit = expert == pick
        weight = tl.sum(tl.sum(tl.where(hit, scores, 0.0), axis=1), axis=0)
        out_ids = tl.where(slot == j, pick, out_ids)
        out_w = tl.where(slot == j, weight, out_w)
        avail = avail & (expert != pick)
    if NORM:
        out_w = out_w / (tl.sum(out_w, axis=0) + 1e-20)
    out_w = out_w * scale
    if NUM_SHARED > 0:  # after the normalisation: slots >= TOP_K held 0 until here
        shared = slot >= TOP_K
        out_ids = tl.where(shared, num_groups * group_size + slot - TOP_K, out_ids)
        out_w = tl.where(shared, 1.0, out_w)
    width = TOP_K + NUM_SHARED
    tl.store(weights_ptr + t * width + slot, out_w, mask=slot < width)
    tl.store(ids_ptr + t * width + slot, out_ids.to(tl.int64), mask=slot < width)


def _check(logits: torch.Tensor, cfg: "RouterConfig", bias: torch.Tensor | None) -> None:
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.shape[1] != cfg.num_experts:
        raise ValueError(f"logits must be [num_tokens, {cfg.num_experts}] float32, got "
                         f"{tuple(logits.shape)} {logits.dtype}")
    if logits.stride(1) != 1:
        raise ValueError("logits must be unit-stride in the expert dim")
    if bias is not None and (bias.shape != (cfg.num_experts,) or not bias.is_floating_point()
                             or bias.stride(0) != 1 or bias.device != logits.device):
        raise ValueError(f"correction_bias must be [{cfg.num_experts}] float, unit-stride, on "
                         f"{logits.device}; got {tuple(bias.shape)} {bias.dtype} {bias.device}")


def _tile(cfg: "RouterConfig") -> tuple[int, int]:
    """(groups held by the tile, experts per group): one group unless the group limit applies."""
    groups = cfg.n_group if cfg.group_limited else 1
    return groups, cfg.num_experts // groups


def moe_router(logits: torch.Tensor, cfg: "RouterConfig", correction_bias: torch.Tensor | None = None,
               num_shared: int = 0) -> TopK:
    """logits [T, E] f32 (rows may be strided), cfg: a `RouterConfig`, correction_bias [E] float or
    None, num_shared >= 0 -> TopK(weights [T, k + num_shared] f32, ids [T, k + num_shared] int64):
    the routed top-k, then ids E..E+num_shared-1 with weight 1.0. One launch, no host sync."""
    _check(logits, cfg, correction_bias)
    if num_shared < 0:
        raise ValueError(f"num_shared must be >= 0, got {num_shared}")
    num_tokens, top_k = logits.shape[0], cfg.top_k
    width = top_k + num_shared
    weights = torch.empty(num_tokens, width, dtype=torch.float32, device=logits.device)
    ids = torch.empty(num_tokens, width, dtype=torch.int64, device=logits.device)
    groups, group_size = _tile(cfg)
    block_g, block_s = next_power_of_2(groups), next_power_of_2(group_size)
    if block_g * block_s > _MAX_TILE:
        raise ValueError(f"{cfg.num_experts} experts in {groups} groups exceed one program's tile")
    if num_tokens == 0:
        return TopK(weights, ids)
    bias = correction_bias if correction_bias is not None else logits  # unused pointer without bias
    _moe_router_kernel[(num_tokens,)](
        logits, bias, weights, ids, logits.stride(0), groups, group_size,
        float(cfg.routed_scaling_factor),
        SIGMOID=cfg.scoring_func == "sigmoid", HAS_BIAS=correction_bias is not None,
        GROUP_LIMIT=cfg.group_limited, TOP2=cfg.topk_method == "noaux_tc", TOPK_GROUP=cfg.topk_group,
        NORM=cfg.norm_topk_prob, TOP_K=top_k, NUM_SHARED=num_shared, BLOCK_G=block_g, BLOCK_S=block_s,
        BLOCK_K=next_power_of_2(width), num_warps=1 if block_g * block_s <= 512 else 4,
        **pdl_launch(logits.device))
    return TopK(weights, ids)


def moe_router_ref(logits: torch.Tensor, cfg: "RouterConfig", correction_bias: torch.Tensor | None = None,
                   num_shared: int = 0) -> TopK:
    """Pure-PyTorch reference: `deepserve.layers.moe.select_experts`, then `with_shared_experts`."""
    from deepserve.layers.moe import select_experts, with_shared_experts

    routing = select_experts(logits, cfg, correction_bias)
    return TopK(*with_shared_experts(routing, cfg.num_experts, num_shared))
