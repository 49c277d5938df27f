"""Mixture of experts for DeepSeek-V2/V3: router, stacked routed experts, shared experts.

The math here is pure PyTorch: the router is the pure function `select_experts`, the reference
that `kernels/moe_router` (which TopKRouter runs on CUDA) is tested against; `fused_experts_ref`
is the reference for the grouped expert GEMMs (`kernels/fused_moe`, the MoE backend on CUDA).

Shared-expert fusion (`DeepseekMoE.process_weights_after_loading`): where the routed experts are
float weights served by a backend with `fuses_shared_experts` (triton, i.e. CUDA) and nothing is
quantised, the n shared experts (one MLP of intermediate n*I) are moved into the expert stack as
experts E..E+n-1 (`split_shared_mlp`: I-sized pieces of the gate rows, up rows and down columns),
and the router appends them to every token with weight 1 (`with_shared_experts`). One grouped-GEMM
call then computes routed + shared: at decode that replaces 3-4 GEMM launches, an activation and an
add per layer. Rounding differs from `round(round(routed) + shared)` by bf16 rounding: each shared
piece's down product is rounded on its own and the sum is rounded once.
Tried under `--quantization int8` too and not kept (run s14d, H200, V2-Lite W-offline, A/B in one call):
folding the float shared experts into the stack before its int8 quantisation cut a prefill step from
714 to 529 launches, but at decode (256 rows) the two shared experts, each fed every row, took
`fused_moe` from 3.9 to 6.2 ms per step: 16,220 / 16,708 tok/s against 17,676 / 17,606 unfolded. The
patch would need a shared-expert path in the kernel (or its config) that reads their weights once.

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

import functools

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from deepserve.config import ModelConfig
from deepserve.layers.activation import SiluAndMul, get_act_and_mul
from deepserve.layers.linear import MergedColumnParallelLinear, RowParallelLinear, silu_and_mul_mlp
from deepserve.layers.linear_method import DenseLinearMethod, PerTokenQuant
from deepserve.layers.moe_backend import MoEBackend, get_moe_backend, moe_backend_for

TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")
# Router logits by the Triton GEMV (kernels/router_gemv) for at most this many tokens on the Triton
# route: at decode sizes cuBLAS's GEMV is latency-bound (5.1 us for V2-Lite's gate at T=1, H200).
SMALL_T = 16
# The GEMV wins for small gates only (H200, kernels_moe.jsonl run s4c2, one call from a CUDA graph, cold
# weights): V2-Lite's 64 x 2048 at 1.78 vs 5.33 us (T = 1) and 3.2 vs 5.4 us (T = 16); V3's 256 x 7168
# loses at every T (9.6 vs 7.7 us at T = 1): torch.mm there.
GEMV_MAX_WEIGHT = 1 << 18  # E * H elements
_GEMV_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


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


def with_shared_experts(routing: Routing, first_id: int, num_shared: int) -> Routing:
    """routing [T, k] -> [T, k + num_shared]: ids first_id .. first_id+num_shared-1, weight 1.0, appended."""
    if num_shared == 0:
        return routing
    num_tokens, device = routing.ids.shape[0], routing.ids.device
    ids = torch.arange(first_id, first_id + num_shared, device=device).expand(num_tokens, num_shared)
    ones = torch.ones(num_tokens, num_shared, dtype=routing.weights.dtype, device=device)
    return Routing(torch.cat([routing.weights, ones], dim=1), torch.cat([routing.ids, ids], dim=1))


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
        self.gate_up_proj.silu_gate_up = type(self.act) is SiluAndMul  # its method may reorder the rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H] -> [T, H]."""
        if type(self.act) is SiluAndMul:  # W8A8 methods fuse it with their GEMMs / input quantisation
            return silu_and_mul_mlp(self.gate_up_proj, self.down_proj, x)
        return self.down_proj(self.act(self.gate_up_proj(x)))  # [T, 2I] -> [T, I] -> [T, H]


@functools.lru_cache(maxsize=None)
def mm_float32_out_supported(device: torch.device) -> bool:
    """Whether torch.mm(half, half, out_dtype=float32) runs on `device` (CUDA in torch >= 2.8; not
    on CPU), tried once per device."""
    if device.type != "cuda":
        return False
    try:
        a = torch.ones(1, 8, dtype=torch.bfloat16, device=device)
        return torch.mm(a, a.t(), out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        return False


class TopKRouter(nn.Module):
    """gate.weight [E, H] (router logits in float32) and, for noaux_tc, e_score_correction_bias [E].

    On CUDA the routing after the logits GEMM is one Triton launch (`kernels/moe_router`, imported
    lazily: CPU installs never import Triton); elsewhere `select_experts`. After loading, the weight
    and bias are kept in float32, so a bf16 model does not cast them on every forward; on CUDA a
    half-precision checkpoint weight is kept too and the logits GEMM takes x as it is (`logits`).
    `num_shared` > 0 (set by the shared-expert fusion): the routing has that many more columns,
    ids E.. with weight 1. `use_kernel`: None = the Triton kernels on CUDA (the routing, and the logits
    GEMV for T <= SMALL_T and small gates: `gemv_weight`); True/False force them (tests).
    """

    def __init__(self, hidden_size: int, cfg: RouterConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, hidden_size))
        self.e_score_correction_bias = (
            nn.Parameter(torch.zeros(cfg.num_experts), requires_grad=False)
            if cfg.topk_method == "noaux_tc" else None
        )
        self.num_shared = 0
        self.use_kernel: bool | None = None
        self.half_weight: torch.Tensor | None = None  # [E, H] half precision, CUDA (see the hook)

    def process_weights_after_loading(self) -> None:
        w = self.weight.data
        # A half-precision checkpoint weight also stays as it is, for CUDA's mm with a float32
        # output: half x half products are exact in float32 and accumulate in float32, so the logits
        # are those of the float32 GEMM (up to summation order) without casting x every forward
        # (one launch fewer per MoE layer, half the weight bytes).
        self.half_weight = (w if w.dtype in (torch.float16, torch.bfloat16) and mm_float32_out_supported(w.device)
                            else None)
        for param in (self.weight, self.e_score_correction_bias):
            if param is not None:
                param.data = param.data.float()

    def triton_route(self, x: torch.Tensor) -> bool:
        """Whether the Triton kernels run: on CUDA, unless `use_kernel` forces a choice."""
        return x.is_cuda if self.use_kernel is None else self.use_kernel

    def gemv_weight(self, x: torch.Tensor) -> torch.Tensor | None:
        """The [E, H] weight of x's dtype and device for the router GEMV (`kernels/router_gemv`): on the
        Triton route for T <= SMALL_T and gates of at most GEMV_MAX_WEIGHT elements (V2-Lite's, not
        V3's), decided from shapes on the host (a CUDA graph captures one path per batch size).
        None: the torch GEMM."""
        if x.shape[0] > SMALL_T or x.dtype not in _GEMV_DTYPES or x.stride(-1) != 1 or not self.triton_route(x):
            return None
        if self.weight.numel() > GEMV_MAX_WEIGHT:
            return None
        return next((w for w in (self.half_weight, self.weight)
                     if w is not None and w.dtype == x.dtype and w.device == x.device), None)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H] -> router logits [T, E] float32: the Triton GEMV where `gemv_weight` has a weight,
        else mm(half, half -> f32) with the half weight, else the float32 GEMM."""
        weight = self.gemv_weight(x)
        if weight is not None:
            from deepserve.kernels.router_gemv import router_logits  # lazy: Triton on CUDA only

            return router_logits(x, weight)
        half = self.half_weight
        if half is not None and x.dtype == half.dtype and x.device == half.device:
            return torch.mm(x, half.t(), out_dtype=torch.float32)
        return F.linear(x.float(), self.weight.float())

    def forward(self, x: torch.Tensor) -> Routing:
        """x: [T, H] -> Routing [T, k + num_shared]."""
        logits = self.logits(x)  # [T, E] f32
        if self.triton_route(x):
            from deepserve.kernels.moe_router import moe_router  # lazy: Triton on CUDA only

            return Routing(*moe_router(logits, self.cfg, self.e_score_correction_bias, self.num_shared))
        routing = select_experts(logits, self.cfg, self.e_score_correction_bias)
        return with_shared_experts(routing, self.cfg.num_experts, self.num_shared)


class RoutedExperts(nn.Module):
    """Stacked expert weights: w13 [E, 2I, H] (gate | up), w2 [E, H, I]; computed by the MoE
    backend of the weights' device (`layers/moe_backend.py`: torch on CPU, triton on CUDA), or the
    one named by `backend` (tests run triton on CPU under the interpreter).

    After `process_weights_after_loading("int8" | "int8-weight-only")` with a backend that takes int8
    stacks (triton), w13 / w2 are int8 with w13_scale [E, 2I] / w2_scale [E, H] f32, one scale per
    expert and output row (`deepserve/quant/int8_experts.py`); otherwise the scales are None."""

    quantizable = True  # the loader passes the serving quantization to process_weights_after_loading

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, hidden_act: str,
                 backend: str | None = None):
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.register_parameter("w13_scale", None)  # [E, 2I] f32 once the stacks are int8
        self.register_parameter("w2_scale", None)  # [E, H] f32
        self.w8a8_min_tokens: int | None = None  # W8A8 from this many tokens (None: never; quant/int8_experts.py)
        self.act = get_act_and_mul(hidden_act)
        self.backend = backend

    def moe_backend(self) -> MoEBackend:
        return get_moe_backend(self.backend) if self.backend else moe_backend_for(self.w13.device)

    def process_weights_after_loading(self, quantization: str | None = None) -> None:
        """Quantise the stacks per row under the int8 modes where the backend computes int8 stacks."""
        if quantization is not None:
            from deepserve.quant.int8_experts import quantize_routed_experts_in_place  # lazy: quant is optional

            quantize_routed_experts_in_place(self, quantization)

    def quantizes_input(self, x: torch.Tensor) -> bool:
        """Whether forward(x, ...) runs W8A8 (x quantised per token by `int8_quant`): int8 stacks served from
        `w8a8_min_tokens` rows (quant/int8_experts.py) and x has at least that many."""
        return self.w8a8_min_tokens is not None and x.shape[0] >= self.w8a8_min_tokens

    def forward(self, x: torch.Tensor, routing: Routing, addend: torch.Tensor | None = None,
                x_quant: PerTokenQuant | None = None) -> torch.Tensor:
        """x: [T, H], routing [T, k], addend [T, H] or None -> [T, H] (+ addend, rounded once more). x_quant:
        x quantised per token (int8 q [T, H], scale [T]) by `int8_quant`, used where the stacks run W8A8
        (`quantizes_input`) instead of quantising x again; ignored elsewhere."""
        w8a8 = self.quantizes_input(x)
        given = (x_quant.q, x_quant.scale) if w8a8 and x_quant is not None else None
        return self.moe_backend().apply(x, self.w13, self.w2, routing, self.act, addend, self.w13_scale,
                                        self.w2_scale, int8_activations=w8a8, x_quant=given)


def split_shared_mlp(mlp: GatedMLP, num_shared: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared MLP (intermediate n*I) as n experts of intermediate I: w13 [n, 2I, H], w2 [n, H, I].

    down(act(gate x) * up x) = sum_j down[:, jI:(j+1)I] (act(gate[jI:(j+1)I] x) * up[jI:(j+1)I] x).
    """
    gate_up, down = mlp.gate_up_proj.weight.detach(), mlp.down_proj.weight.detach()  # [2nI, H], [H, nI]
    hidden = gate_up.shape[1]
    gate, up = gate_up.reshape(2, num_shared, -1, hidden).unbind(0)  # [n, I, H] each
    w2 = down.reshape(hidden, num_shared, -1).transpose(0, 1)  # [n, H, I]
    return torch.cat([gate, up], dim=1), w2.contiguous()  # [n, 2I, H], [n, H, I]


class DeepseekMoE(nn.Module):
    """Routed experts plus `n_shared_experts` shared experts run as one MLP on every token, or, after
    `process_weights_after_loading` where it applies, as extra experts of the routed stack (see the
    module docstring). `fuse_shared_experts` (constructor argument, attribute read at that hook):
    False keeps the shared MLP apart everywhere."""

    # process_weights_after_loading receives the serving quantization (the loader passes it to the
    # modules marked quantizable); this module quantises nothing itself: a quantised model (int8,
    # block-fp8, ...) keeps its shared experts as a separate MLP, which the method quantises.
    quantizable = True

    def __init__(self, config: ModelConfig, router: RouterConfig, fuse_shared_experts: bool = True):
        super().__init__()
        hidden, inter = config.hidden_size, config.moe_intermediate_size
        self.gate = TopKRouter(hidden, router)
        self.experts = RoutedExperts(router.num_experts, hidden, inter, config.hidden_act)
        self.shared_experts = (GatedMLP(hidden, inter * config.n_shared_experts, config.hidden_act)
                               if config.n_shared_experts else None)
        self.n_shared_experts = config.n_shared_experts
        self.fuse_shared_experts = fuse_shared_experts

    def can_fuse_shared_experts(self, quantization: str | None = None) -> bool:
        """Whether the shared MLP can move into the expert stack: float weights of one dtype and
        device, unsharded (tp_size 1), no bias, no quantization, the same activation, and a backend
        that fuses them (triton)."""
        mlp, experts = self.shared_experts, self.experts
        if not self.fuse_shared_experts or mlp is None or quantization is not None:
            return False
        if not isinstance(experts, RoutedExperts) or not experts.moe_backend().fuses_shared_experts:
            return False
        return type(mlp.act) is type(experts.act) and all(
            _plain_linear(linear, experts.w13) for linear in (mlp.gate_up_proj, mlp.down_proj))

    def process_weights_after_loading(self, quantization: str | None = None) -> None:
        """Fold the shared experts into the expert stack where `can_fuse_shared_experts`."""
        if self.can_fuse_shared_experts(quantization):
            self._fold_shared_experts()

    def _fold_shared_experts(self) -> None:
        """experts.w13 [E, 2I, H] -> [E+n, 2I, H], w2 [E, H, I] -> [E+n, H, I]; the shared MLP's tensors
        are released at once (while one layer's stack is rebuilt, it is held twice)."""
        w13_shared, w2_shared = split_shared_mlp(self.shared_experts, self.n_shared_experts)
        experts = self.experts
        for name, extra in (("w13", w13_shared), ("w2", w2_shared)):
            old = getattr(experts, name)
            setattr(experts, name, nn.Parameter(torch.cat([old.detach(), extra]), requires_grad=old.requires_grad))
        del w13_shared, w2_shared
        for linear in (self.shared_experts.gate_up_proj, self.shared_experts.down_proj):
            linear.weight = nn.Parameter(linear.weight.new_empty(0, linear.weight.shape[1]), requires_grad=False)
        self.shared_experts = None
        self.gate.num_shared = self.n_shared_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H] -> [T, H]."""
        routing = self.gate(x)
        x_quant = self._shared_input_quant(x)
        shared = None if self.shared_experts is None else self.shared_experts(x if x_quant is None else x_quant)
        if isinstance(self.experts, RoutedExperts):  # the shared add rides in the backend's sum
            return self.experts(x, routing, shared, x_quant)
        out = self.experts(x, routing)  # quantised stand-ins (Int8RoutedExperts) take no addend
        return out if shared is None else out + shared

    def _shared_input_quant(self, x: torch.Tensor) -> PerTokenQuant | None:
        """x [T, H] quantised per token once (`int8_quant`) for both of its int8 consumers, or None: the
        shared MLP's gate_up (int8 W8A8 method, which takes pre-quantised rows: `takes_quantized_input`)
        and the routed stacks when they run W8A8 (`RoutedExperts.quantizes_input`, T >= 256 on CUDA). Both
        would quantise x with that same kernel, so the result is the same; one launch and one [T, H] pass
        fewer per MoE layer. None where either does not quantise, the shared MLP is not SiLU-gated, or a
        hook sits on the shared MLP or its linears (calibration records real inputs). The gate is conservative:
        `takes_quantized_input` also asks for rows the fused RMSNorm keeps whole (H <= 8192) and f16/bf16 x,
        which plain `int8_quant` would not need; every served DeepSeek width passes it."""
        mlp, experts = self.shared_experts, self.experts
        if mlp is None or not isinstance(experts, RoutedExperts) or not experts.quantizes_input(x):
            return None
        if type(mlp.act) is not SiluAndMul or mlp._forward_pre_hooks or mlp._forward_hooks:
            return None
        gate_up = mlp.gate_up_proj
        if not (gate_up.takes_quantized_input(x) and gate_up.method.quantized_input_dtype == torch.int8) \
                or mlp.down_proj._forward_pre_hooks or mlp.down_proj._forward_hooks:
            return None
        from deepserve.kernels.int8_quant import int8_quant  # lazy: Triton

        q, scale, _ = int8_quant(x if x.stride(-1) == 1 else x.contiguous())
        return PerTokenQuant(q, scale, x.dtype)


def _plain_linear(linear: nn.Module, like: torch.Tensor) -> bool:
    """An unsharded, bias-free dense linear whose weight has `like`'s dtype and device."""
    weight = linear.weight
    return (getattr(linear, "tp_size", 1) == 1 and linear.bias is None
            and not hasattr(linear, "weight_scale_inv") and isinstance(linear.method, DenseLinearMethod)
            and weight.dtype == like.dtype and weight.device == like.device)


def set_shared_expert_fusion(model: nn.Module, enabled: bool) -> int:
    """Set `fuse_shared_experts` on every DeepseekMoE of `model` (before its weights are processed);
    how many were set."""
    layers = [m for m in model.modules() if isinstance(m, DeepseekMoE)]
    for layer in layers:
        layer.fuse_shared_experts = enabled
    return len(layers)
