"""Mixture of experts for DeepSeek-V2/V3: router, stacked routed experts, shared experts.

The math here is pure PyTorch: the router is the pure function `select_experts`, the reference
that `kernels/moe_router` (which TopKRouter runs on CUDA) is tested against; `fused_experts_ref`
is the reference for the grouped expert GEMMs (`kernels/fused_moe`, the MoE backend on CUDA).

Routing (DeepSeek-V2 / V3, as HF transformers computes it):
  1. scores = softmax(logits) (V2) or sigmoid(logits) (V3), float32;
  2. choice = scores (+ e_score_correction_bias for V3 `noaux_tc`; the bias only steers choice);
  3. group limit: experts form `n_group` contiguous groups; a group's score is its max choice
     (`group_limited_greedy`) or the sum of its two best choices (`noaux_tc`); only experts of the
     `topk_group` best groups stay eligible;
  4. ids = the top_k eligible experts by choice; ties go to the lower index (group and expert);
  5. weights = unbiased scores of those ids, divided by their sum if `norm_topk_prob`, then
     multiplied by `routed_scaling_factor`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from deepserve.config import ModelConfig
from deepserve.layers.activation import get_act_and_mul
from deepserve.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from deepserve.layers.moe_backend import moe_backend_for

TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class RouterConfig:
    num_experts: int
    top_k: int
    scoring_func: str = "softmax"  # softmax | sigmoid
    topk_method: str = "greedy"  # greedy | group_limited_greedy | noaux_tc
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        for field_name, value, allowed in (("topk_method", self.topk_method, TOPK_METHODS),
                                           ("scoring_func", self.scoring_func, SCORING_FUNCS)):
            if value not in allowed:
                raise ValueError(f"unsupported {field_name} {value!r} (supported: {', '.join(allowed)})")
        if self.num_experts % self.n_group:
            raise ValueError(f"n_routed_experts {self.num_experts} is not divisible by n_group "
                             f"{self.n_group}")
        if self.top_k > self.num_experts // self.n_group * self.topk_group:
            raise ValueError(f"top_k {self.top_k} exceeds the experts of topk_group {self.topk_group} groups")

    @property
    def group_limited(self) -> bool:
        return self.topk_method != "greedy" and self.n_group > 1

    @classmethod
    def from_model_config(cls, config: ModelConfig, v3_defaults: bool = False) -> "RouterConfig":
        """`v3_defaults`: HF's V3 config omits scoring_func/topk_method (it always uses sigmoid +
        noaux_tc), so a V3 checkpoint without those keys gets them here."""
        raw = config.hf_config
        scoring = raw.get("scoring_func") or ("sigmoid" if v3_defaults else config.scoring_func)
        method = raw.get("topk_method") or ("noaux_tc" if v3_defaults else config.topk_method)
        return cls(num_experts=config.n_routed_experts, top_k=config.num_experts_per_tok,
                   scoring_func=scoring, topk_method=method, n_group=config.n_group or 1,
                   topk_group=config.topk_group or 1, norm_topk_prob=config.norm_topk_prob,
                   routed_scaling_factor=config.routed_scaling_factor)


class Routing(NamedTuple):
    weights: torch.Tensor  # [num_tokens, top_k] float32
    ids: torch.Tensor  # [num_tokens, top_k] int64


def _topk_stable(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries along the last dim; ties go to the lower index."""
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]


def _group_mask(choice: torch.Tensor, cfg: RouterConfig) -> torch.Tensor:
    """choice: [T, E] f32 -> [T, E] bool, True for experts in the `topk_group` best groups."""
    grouped = choice.view(choice.shape[0], cfg.n_group, -1)  # [T, G, E/G]
    if cfg.topk_method == "noaux_tc":
        best = min(2, grouped.shape[-1])
        group_scores = grouped.topk(best, dim=-1).values.sum(dim=-1)  # [T, G]
    else:
        group_scores = grouped.max(dim=-1).values  # [T, G]
    keep = torch.zeros_like(group_scores, dtype=torch.bool)
    keep.scatter_(1, _topk_stable(group_scores, cfg.topk_group), True)
    return keep.unsqueeze(-1).expand_as(grouped).reshape_as(choice)  # [T, E]


def select_experts(router_logits: torch.Tensor, cfg: RouterConfig,
                   correction_bias: torch.Tensor | None = None) -> Routing:
    """router_logits: [T, E] f32; correction_bias: [E] f32 (noaux_tc) -> Routing([T,k] f32, [T,k] int64).

    Ids come ordered by decreasing choice score.
    """
    logits = router_logits.float()
    scores = logits.softmax(dim=-1) if cfg.scoring_func == "softmax" else logits.sigmoid()
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if cfg.group_limited:
        choice = choice.masked_fill(~_group_mask(choice, cfg), float("-inf"))
    ids = _topk_stable(choice, cfg.top_k)  # [T, k]
    weights = scores.gather(1, ids)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return Routing(weights * cfg.routed_scaling_factor, ids)


def fused_experts_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, routing: Routing,
                      act: nn.Module) -> torch.Tensor:
    """Weighted sum of each token's routed experts.

    x: [T, H]; w13: [E, 2I, H] (gate rows, then up rows); w2: [E, H, I]; routing: [T, k] each.
    Returns [T, H] in x's dtype (accumulated in float32).
    """
    num_tokens, top_k = routing.ids.shape
    flat_ids = routing.ids.flatten()  # [T*k]
    order = torch.argsort(flat_ids, stable=True)  # [T*k] grouped by expert
    counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()
    out = torch.zeros(num_tokens, x.shape[1], dtype=torch.float32, device=x.device)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        picks = order[start:start + count]  # [n] positions in the flat [T*k] routing
        start += count
        tokens = picks // top_k  # [n]
        hidden = act(F.linear(x[tokens], w13[expert])) @ w2[expert].t()  # [n, H]
        out.index_add_(0, tokens, hidden.float() * routing.weights.flatten()[picks, None])
    return out.to(x.dtype)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with gate/up merged: gate_up_proj [2I, H], down_proj [H, I]."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "silu"):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size)
        self.act = get_act_and_mul(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H] -> [T, H]."""
        return self.down_proj(self.act(self.gate_up_proj(x)))


class TopKRouter(nn.Module):
    """gate.weight [E, H] (router logits in float32) and, for noaux_tc, e_score_correction_bias [E].

    On CUDA the routing after the logits GEMM is one Triton launch (`kernels/moe_router`, imported
    lazily: CPU installs never import Triton); elsewhere `select_experts`. After loading, the weight
    and bias are kept in float32, so a bf16 model does not cast them on every forward.
    """

    def __init__(self, hidden_size: int, cfg: RouterConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, hidden_size))
        self.e_score_correction_bias = (
            nn.Parameter(torch.zeros(cfg.num_experts), requires_grad=False)
            if cfg.topk_method == "noaux_tc" else None
        )

    def process_weights_after_loading(self) -> None:
        for param in (self.weight, self.e_score_correction_bias):
            if param is not None:
                param.data = param.data.float()

    def forward(self, x: torch.Tensor) -> Routing:
        """x: [T, H] -> Routing [T, k]."""
        logits = F.linear(x.float(), self.weight.float())  # [T, E] f32
        if logits.is_cuda:
            from deepserve.kernels.moe_router import moe_router  # lazy: Triton on CUDA only

            return Routing(*moe_router(logits, self.cfg, self.e_score_correction_bias))
        return select_experts(logits, self.cfg, self.e_score_correction_bias)


class RoutedExperts(nn.Module):
    """Stacked expert weights: w13 [E, 2I, H] (gate | up), w2 [E, H, I]; computed by the MoE
    backend of the input's device (`layers/moe_backend.py`: torch on CPU, triton on CUDA)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.act = get_act_and_mul(hidden_act)

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """x: [T, H] -> [T, H]."""
        return moe_backend_for(x.device).apply(x, self.w13, self.w2, routing, self.act)


class DeepseekMoE(nn.Module):
    """Routed experts plus `n_shared_experts` shared experts run as one MLP on every token."""

    def __init__(self, config: ModelConfig, router: RouterConfig):
        super().__init__()
        hidden, inter = config.hidden_size, config.moe_intermediate_size
        self.gate = TopKRouter(hidden, router)
        self.experts = RoutedExperts(router.num_experts, hidden, inter, config.hidden_act)
        self.shared_experts = (GatedMLP(hidden, inter * config.n_shared_experts, config.hidden_act)
                               if config.n_shared_experts else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H] -> [T, H]."""
        out = self.experts(x, self.gate(x))
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
