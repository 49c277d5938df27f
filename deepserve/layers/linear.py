"""Linear layers with checkpoint weight loaders, shaped for tensor parallelism.

Every parameter carries `weight_loader(param, loaded, shard_id=None)`: it copies the checkpoint
tensor (or this rank's slice of it) into `param`, raising ValueError with the expected and got
shapes on a mismatch. Column layers split the output dimension over `tp_size` ranks, row layers the
input dimension; with the default `tp_size=1` they are plain linears. Merged layers (q/k/v,
gate/up) take one checkpoint tensor per `shard_id` and place it at its offset.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from deepserve.layers import fused
from deepserve.layers.linear_method import DenseLinearMethod, LinearMethod, PerTokenQuant, linear_method_for


def _check_shape(expected: torch.Size, loaded: torch.Tensor) -> None:
    if tuple(expected) != tuple(loaded.shape):
        raise ValueError(f"shape mismatch: expected {tuple(expected)}, got {tuple(loaded.shape)}")


def _divide(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise ValueError(f"{what} ({total}) is not divisible by tp_size ({parts})")
    return total // parts


def checked_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy `src` into `dst`; ValueError with both shapes when they differ."""
    _check_shape(dst.shape, src)
    with torch.no_grad():
        dst.copy_(src)


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
    """Whole-tensor copy with a shape check, for parameters without their own loader (norms)."""
    checked_copy(param.data, loaded)


class LinearBase(nn.Module):
    """y = x W^T (+ b). x: [num_tokens, in_per_rank] -> [num_tokens, out_per_rank]."""

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 tp_size: int = 1, tp_rank: int = 0):
        super().__init__()
        self.tp_size, self.tp_rank = tp_size, tp_rank
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.weight.weight_loader = self.weight_loader
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = self.weight_loader
        self.method: LinearMethod = DenseLinearMethod()

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        checked_copy(param.data, loaded)

    # Quantisation methods may replace this layer's weight; not the layers whose dense matrix is
    # read elsewhere (MLA's kv_b_proj sets keep_dense_weight).
    quantizable = True
    # A merged [gate | up] layer whose output only ever goes through SiLU-and-mul (`silu_and_mul_mlp`; set
    # by the dense MLPs): a method may then keep its weight in another row order (int8 W8A8's gated layout).
    silu_gate_up = False
    # Set (to I) when the method keeps the weight rows in that other order: `weight` / `weight_scale` are then
    # not [gate | up] (int8 W8A8: kernels/int8_gemm_silu.py `to_gated_layout`); None: rows as loaded.
    gated_inter: int | None = None

    def process_weights_after_loading(self, quantization: str | None = None) -> None:
        keep = getattr(self, "keep_dense_weight", False)
        self.method = linear_method_for(self.weight, None if keep else quantization)
        self.method.process_weights_after_loading(self)

    def forward(self, x: torch.Tensor | PerTokenQuant) -> torch.Tensor:
        """x [..., in_per_rank], or its per-token 8-bit quantisation (`PerTokenQuant`, int8 or e4m3: only where
        `takes_quantized_input`) -> [..., out_per_rank]."""
        return self.method.apply(self, x, self.bias)

    def takes_quantized_input(self, x: torch.Tensor) -> bool:
        """Whether forward may be given `PerTokenQuant` of x [..., in] (or of a tensor computed from x row
        by row, such as its RMSNorm) in place of x, with the same result: the method quantizes its input
        (`LinearMethod.quantizes_input`) and no forward hooks are registered on this layer (calibration
        records real inputs: quant/smooth.py)."""
        if self._forward_pre_hooks or self._forward_hooks:
            return False
        return self.method.quantizes_input(self, x)


class ReplicatedLinear(LinearBase):
    """The full matrix on every rank."""


class ColumnParallelLinear(LinearBase):
    """Output features split over ranks; the checkpoint holds the full [out, in] matrix."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 tp_size: int = 1, tp_rank: int = 0):
        super().__init__(in_features, _divide(out_features, tp_size, "output features"), bias,
                         tp_size, tp_rank)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        size = param.shape[0]
        _check_shape(torch.Size((size * self.tp_size, *param.shape[1:])), loaded)
        checked_copy(param.data, loaded.narrow(0, self.tp_rank * size, size))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column linears sharing an input, concatenated on the output (gate | up).

    `shard_id` is the index into `output_sizes` of the checkpoint tensor being loaded.
    """

    def __init__(self, in_features: int, output_sizes: Sequence[int], bias: bool = False,
                 tp_size: int = 1, tp_rank: int = 0):
        self.output_sizes = tuple(output_sizes)
        super().__init__(in_features, sum(self.output_sizes), bias, tp_size, tp_rank)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if shard_id is None:
            raise ValueError("merged column linear needs a shard_id (index into output_sizes)")
        sizes = [s // self.tp_size for s in self.output_sizes]  # per rank
        offset, size = sum(sizes[:shard_id]), sizes[shard_id]
        _check_shape(torch.Size((self.output_sizes[shard_id], *param.shape[1:])), loaded)
        checked_copy(param.data.narrow(0, offset, size), loaded.narrow(0, self.tp_rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection; output layout [q heads | k heads | v heads] of `head_dim` each.

    Query heads split over ranks; key/value heads too, or are replicated when fewer than ranks.
    `shard_id` is "q", "k" or "v".
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, tp_size: int = 1, tp_rank: int = 0):
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, tp_size, "attention heads")
        if num_kv_heads >= tp_size:
            self.num_kv_heads = _divide(num_kv_heads, tp_size, "key/value heads")
        else:
            _divide(tp_size, num_kv_heads, "tp_size over key/value heads")
            self.num_kv_heads = 1
        self.total_heads = {"q": num_heads, "k": num_kv_heads, "v": num_kv_heads}
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp_size
        super().__init__(hidden_size, out, bias, tp_size, tp_rank)

    def _shard_range(self, shard_id: str) -> tuple[int, int, int]:
        """(offset in param, size, start in the checkpoint tensor) along dim 0 for this rank."""
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if shard_id == "q":
            return 0, q, self.tp_rank * q
        total_kv = self.total_heads["k"]
        if total_kv >= self.tp_size:
            first_head = self.tp_rank * self.num_kv_heads
        else:  # replicated: tp_size // total_kv consecutive ranks share one head
            first_head = self.tp_rank * total_kv // self.tp_size
        return (q if shard_id == "k" else q + kv), kv, first_head * self.head_dim

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if shard_id not in ("q", "k", "v"):
            raise ValueError(f"qkv linear needs shard_id 'q', 'k' or 'v', got {shard_id!r}")
        offset, size, start = self._shard_range(shard_id)
        _check_shape(torch.Size((self.total_heads[shard_id] * self.head_dim, *param.shape[1:])), loaded)
        checked_copy(param.data.narrow(0, offset, size), loaded.narrow(0, start, size))


class RowParallelLinear(LinearBase):
    """Input features split over ranks; partial products summed by `all_reduce` (needed if tp > 1).

    The bias is added once, after the reduction.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 tp_size: int = 1, tp_rank: int = 0,
                 all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if tp_size > 1 and all_reduce is None:
            raise ValueError("RowParallelLinear with tp_size > 1 needs an all_reduce")
        super().__init__(_divide(in_features, tp_size, "input features"), out_features, bias,
                         tp_size, tp_rank)
        self.all_reduce = all_reduce

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if param.dim() == 1:  # bias: replicated
            checked_copy(param.data, loaded)
            return
        size = param.shape[1]
        _check_shape(torch.Size((param.shape[0], size * self.tp_size)), loaded)
        checked_copy(param.data, loaded.narrow(1, self.tp_rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._reduce(self.method.apply(self, x, None))

    def forward_silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up [..., 2 * in_per_rank] (a merged [gate | up] projection) -> forward(silu(gate) * up);
        the method may fuse SiLU-and-mul into its activation quantisation (LinearMethod.apply_silu_and_mul).
        With forward hooks on this layer (calibration records its inputs: quant/smooth.py) the layer is
        called on silu(gate) * up instead, so that they see its input; the result is the same. So is a
        method that follows the LinearMethod protocol without subclassing it (no apply_silu_and_mul)."""
        if self._forward_pre_hooks or self._forward_hooks or not hasattr(self.method, "apply_silu_and_mul"):
            return self(fused.silu_and_mul(gate_up))
        return self._reduce(self.method.apply_silu_and_mul(self, gate_up, None))

    def _reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """This rank's partial product -> the sum over ranks, plus the bias."""
        out = partial if self.all_reduce is None else self.all_reduce(partial)
        return out if self.bias is None else out + self.bias


def silu_and_mul_mlp(gate_up_proj: LinearBase, down_proj: RowParallelLinear,
                     x: torch.Tensor | PerTokenQuant) -> torch.Tensor:
    """down_proj(silu(gate) * up) with [gate | up] = gate_up_proj(x) (x [..., H] or its PerTokenQuant, where
    gate_up_proj takes one) -> [..., H_out], with the fusion the methods offer: gate_up_proj's method may
    run SiLU-and-mul itself and hand down_proj its input (`LinearMethod.apply_gated`, the gate_up output never
    written: int8 W8A8 on CUDA hands it quantised, the float, W8A16 and fp8 methods' decode GEMV as a tensor);
    else down_proj's method may fuse SiLU-and-mul into its input quantisation (`forward_silu_and_mul`).
    Neither with forward hooks on either layer (calibration records real inputs and outputs)."""
    hooked = any(layer._forward_pre_hooks or layer._forward_hooks for layer in (gate_up_proj, down_proj))
    apply_gated = getattr(gate_up_proj.method, "apply_gated", None)
    if not hooked and apply_gated is not None:
        h = apply_gated(gate_up_proj, x, down_proj)
        if h is not None:
            return down_proj(h)
    return down_proj.forward_silu_and_mul(gate_up_proj(x))
