"""Calibration statistics and SmoothQuant-style smoothing folded into the float weights.

    stats = calibrate(model, token_ids)            # per linear: max|x_j| [in] and H = X^T X [in, in]
    factors = smoothing_factors(model, stats, 0.5) # {linear name: s [in]}
    smooth_(model, factors)                        # x_j / s_j upstream, W[:, j] * s_j in the linear
    stats = stats.smoothed(factors)                # the statistics of the smoothed inputs

SmoothQuant (Xiao et al., 2022): a per-token int8 grid is set by a token's largest channel; dividing
input channel j by s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha) and multiplying weight column j by
s_j leaves x W^T unchanged and moves part of the channel's range from the activation to the weight.
Here every division is folded into the tensor that produces the input, so a smoothed checkpoint
needs no runtime op. Per pre-norm decoder layer (Llama, Qwen2, Mistral-style blocks):

    input_layernorm.weight / s          -> self_attn.qkv_proj columns * s
    post_attention_layernorm.weight / s -> mlp.gate_up_proj columns * s
    v rows of qkv_proj / s (per kv head)-> self_attn.o_proj columns * s    (attention is linear in v;
                                           with GQA the G query heads of a kv head share its factors:
                                           s = max over the G heads of the per-channel statistics)
    up rows of gate_up_proj / s         -> mlp.down_proj columns * s       (silu(g) * (u / s) =
                                           (silu(g) * u) / s: the gate stays, the up rows absorb s)

The whole function is unchanged in float (tests/unit/test_quant_smooth.py checks it). Channels with
no calibration activity or an all-zero weight column keep s = 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from deepserve.layers.linear import LinearBase
from deepserve.quant.eval import DEFAULT_WINDOW, text_logprobs

_FLOOR = 1e-5


@dataclass(frozen=True)
class CalibrationStats:
    """Per linear layer (module name): input channel max |x| [in] f32 and X^T X [in, in] f32 (`hessian`
    empty when not recorded)."""

    act_max: dict[str, torch.Tensor]
    hessian: dict[str, torch.Tensor]
    num_tokens: int

    def smoothed(self, factors: dict[str, torch.Tensor]) -> "CalibrationStats":
        """The statistics of inputs divided by `factors` (layers without a factor unchanged)."""
        act, hess = dict(self.act_max), dict(self.hessian)
        for name, s in factors.items():
            act[name] = act[name] / s
            if name in hess:
                hess[name] = hess[name] / (s[:, None] * s[None, :])
        return CalibrationStats(act, hess, self.num_tokens)


@torch.no_grad()
def calibrate(model: nn.Module, token_ids: Sequence[int], window: int = DEFAULT_WINDOW,
              hessians: bool = True) -> CalibrationStats:
    """Run the text through `model` (windows as the accuracy gate) and record every linear's inputs
    (X^T X only with `hessians`: GPTQ needs it, smoothing does not)."""
    act: dict[str, torch.Tensor] = {}
    hess: dict[str, torch.Tensor] = {}

    def record(name: str, x: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1]).float()  # [tokens, in]
        amax = rows.abs().amax(dim=0)
        act[name] = amax if name not in act else torch.maximum(act[name], amax)
        if hessians:
            hess[name] = rows.t() @ rows + hess.get(name, 0.0)

    hooks = [module.register_forward_pre_hook(lambda _m, args, name=name: record(name, args[0]))
             for name, module in model.named_modules() if isinstance(module, LinearBase)]
    count = 0
    try:
        for _, targets in text_logprobs(model, token_ids, window):
            count += len(targets) + 1
    finally:
        for hook in hooks:
            hook.remove()
    return CalibrationStats(act, hess, count)


def _factor(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|X|^alpha / max|W|^(1 - alpha) per channel; 1 where either is zero."""
    live = (act_max > _FLOOR) & (weight_max > _FLOOR)
    s = act_max.clamp(min=_FLOOR).pow(alpha) / weight_max.clamp(min=_FLOOR).pow(1.0 - alpha)
    return torch.where(live, s.clamp(min=_FLOOR), torch.ones_like(s))


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's pre-norm decoder layers; ValueError when it is not a Llama-style stack."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    needed = ("input_layernorm", "post_attention_layernorm", "self_attn.qkv_proj", "self_attn.o_proj",
              "mlp.gate_up_proj", "mlp.down_proj")
    for layer in layers or ():
        missing = [n for n in needed if not _has(layer, n)]
        if missing:
            raise ValueError(f"smoothing supports Llama-style decoder layers; {type(layer).__name__} has no "
                             f"{', '.join(missing)}")
    if not layers:
        raise ValueError(f"smoothing supports Llama-style models; {type(model).__name__} has no model.layers")
    return list(layers)


def _has(module: nn.Module, dotted: str) -> bool:
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return False
    return True


def supports_smoothing(model: nn.Module) -> bool:
    try:
        decoder_layers(model)
    except ValueError:
        return False
    return True


def smoothing_factors(model: nn.Module, stats: CalibrationStats, alpha: float) -> dict[str, torch.Tensor]:
    """{linear module name: s [in] f32} for the four smoothable inputs of every decoder layer."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothing alpha must be in [0, 1], got {alpha}")
    factors = {}
    for i, layer in enumerate(decoder_layers(model)):
        prefix = f"model.layers.{i}."
        for name in ("self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            weight = layer.get_submodule(name).weight
            factors[prefix + name] = _factor(stats.act_max[prefix + name], weight.abs().amax(dim=0), alpha)
        factors[prefix + "self_attn.o_proj"] = _o_proj_factor(layer.self_attn, stats.act_max[prefix + "self_attn.o_proj"],
                                                              alpha)
    return factors


def _o_proj_factor(attn: nn.Module, act_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """o_proj's input factors [H * D], equal over the G query heads that read one kv head's v."""
    kv_heads, head_dim = attn.num_kv_heads, attn.head_dim
    group = attn.num_heads // kv_heads

    def per_kv(t: torch.Tensor) -> torch.Tensor:
        return t.view(kv_heads, group, head_dim).amax(dim=1)  # [H_kv, D]

    s = _factor(per_kv(act_max), per_kv(attn.o_proj.weight.abs().amax(dim=0)), alpha)  # [H_kv, D]
    return s[:, None, :].expand(kv_heads, group, head_dim).reshape(-1)  # [H * D]


@torch.no_grad()
def smooth_(model: nn.Module, factors: dict[str, torch.Tensor]) -> None:
    """Fold `factors` into the float weights in place (see the module docstring); float function kept."""
    for i, layer in enumerate(decoder_layers(model)):
        prefix = f"model.layers.{i}."
        attn, mlp = layer.self_attn, layer.mlp
        _fold(layer.input_layernorm.weight, None, attn.qkv_proj, factors[prefix + "self_attn.qkv_proj"])
        _fold(layer.post_attention_layernorm.weight, None, mlp.gate_up_proj, factors[prefix + "mlp.gate_up_proj"])
        s_o = factors[prefix + "self_attn.o_proj"]
        v_rows = _v_rows(attn)
        kv_s = s_o.view(attn.num_kv_heads, -1, attn.head_dim)[:, 0, :].reshape(-1)  # [H_kv * D]
        _fold(attn.qkv_proj.weight[v_rows], _bias_rows(attn.qkv_proj, v_rows), attn.o_proj, s_o, kv_s)
        up_rows = slice(mlp.gate_up_proj.output_sizes[0], None)
        _fold(mlp.gate_up_proj.weight[up_rows], _bias_rows(mlp.gate_up_proj, up_rows), mlp.down_proj,
              factors[prefix + "mlp.down_proj"])


def _v_rows(attn: nn.Module) -> slice:
    q, kv = attn.num_heads * attn.head_dim, attn.num_kv_heads * attn.head_dim
    return slice(q + kv, q + 2 * kv)


def _bias_rows(linear: LinearBase, rows: slice) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias[rows]


def _fold(producer: torch.Tensor, producer_bias: torch.Tensor | None, consumer: LinearBase, s: torch.Tensor,
          producer_s: torch.Tensor | None = None) -> None:
    """producer (norm weight [in] or linear rows [in, k]) and its bias / s; consumer columns * s."""
    ps = s if producer_s is None else producer_s
    producer.div_(ps if producer.dim() == 1 else ps[:, None])
    if producer_bias is not None:
        producer_bias.div_(ps)
    consumer.weight.mul_(s[None, :])
