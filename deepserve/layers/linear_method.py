"""How a linear layer computes x W^T: a per-layer method object (vLLM's LinearMethod pattern).

`process_weights_after_loading(layer)` runs once after the checkpoint is loaded; `apply(layer, x)`
runs every forward; `apply_silu_and_mul(layer, gate_up)` applies it to SiLU-and-mul of a merged
[gate | up] input (the dense MLP's down projection): by default `apply(layer, silu_and_mul(gate_up))`,
fused into the activation quantisation by the W8A8 methods (int8, fp8) on CUDA; `apply_gated(layer, x,
consumer)` runs a merged [gate | up] layer and SiLU-and-mul and hands the down projection its input (int8
W8A8 on CUDA: SiLU-and-mul in the GEMM's epilogue, the result quantised; the decode GEMV of the float, W8A16
and fp8 methods: SiLU-and-mul in its epilogue; default None, not fused);
`quantizes_input(layer, x)` (default False) says whether `apply` may be given, in place of x, its
per-token 8-bit quantisation `PerTokenQuant` computed upstream (the int8 and fp8 W8A8 methods on CUDA: a pre-norm
decoder layer then fuses the norm with that quantisation, layers/decoder.py). The methods subclass
the `LinearMethod` protocol to inherit those defaults. Quantised methods (INT8, FP8) plug in here;
without quantisation:
  * DenseLinearMethod: F.linear on the stored weight (GPU, and any non-float32 CPU weight); on CUDA,
    inputs of at most GEMV_MAX_M rows (decode) go to the Triton GEMV `kernels/gemv` instead
    (`use_gemv`: bf16/f16, 2-D contiguous weight, K % 8 == 0), which streams the weight closer to
    the HBM bandwidth than cuBLAS's GEMV. The LM head (layers/embedding.py) applies this method too.
  * CpuPackedLinearMethod: float32 on CPU, the weight reordered once into oneDNN's blocked layout.
    oneDNN's GEMM on a packed weight runs 2-3x faster than F.linear at decode batch sizes on
    these CPUs (576x3072 at 8 rows: 0.80 ms -> 0.24 ms). The dense copy is released afterwards
    unless the layer sets `keep_dense_weight` (MLA reads kv_b_proj's matrix to absorb it).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from deepserve.layers import fused

# Rows (tokens, after flattening leading dims) up to which DenseLinearMethod calls the Triton GEMV on
# CUDA; 0 turns it off (cuBLAS for every shape). At most kernels/gemv.py's GEMV_MAX_M. Measured on an
# H200 (benchmarks/results/kernels_gemv.jsonl, run s4c2, CUDA-graph replays over cold weights): the
# gemv beats cuBLAS at M = 1 on every qwen-7b / V2-Lite shape (1.04-1.30x; qwen-7b's linears per step
# 3.59 vs 3.95 ms) and at M = 2 (qkv a tie), and loses at M = 4 (0.72-0.97x but V2-Lite's o_proj).
GEMV_MAX_M = 2
_GEMV_DTYPES = (torch.bfloat16, torch.float16)


class PerTokenQuant(NamedTuple):
    """A linear's input x [..., in] handed over already quantised, per token, symmetric: int8 as
    `kernels/int8_quant.py` (= `quant.int8.quantize_per_token_ref`) or e4m3 as `kernels/fp8_quant.py`
    (= `quant.fp8.quantize_per_token_fp8_ref`): x[t] ~ q[t] * scale[t]. q's dtype is the consumer method's
    `quantized_input_dtype`."""

    q: torch.Tensor  # [..., in] int8 or float8_e4m3fn
    scale: torch.Tensor  # [...] f32
    dtype: torch.dtype  # of the unquantised x: the dtype of the linear's output


class LinearMethod(Protocol):
    def process_weights_after_loading(self, layer: nn.Module) -> None: ...

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor: ...

    def apply_silu_and_mul(self, layer: nn.Module, gate_up: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """gate_up [..., 2 * in] (a merged [gate | up] projection) -> apply(silu(gate) * up) [..., out]."""
        return self.apply(layer, fused.silu_and_mul(gate_up), bias)

    def apply_gated(self, layer: nn.Module, x: torch.Tensor | PerTokenQuant,
                    consumer: nn.Module) -> torch.Tensor | PerTokenQuant | None:
        """For a merged [gate | up] layer: silu(gate) * up of its output on x, for `consumer` (the down
        projection), in place of `consumer.method.apply_silu_and_mul(layer(x))` with the same result:
        already quantised (PerTokenQuant, int8 W8A8) or a tensor [..., I] (the decode GEMV's fused epilogue);
        None where this method does not (the default: never)."""
        return None

    # the dtype of PerTokenQuant.q that `apply` takes where `quantizes_input` says yes
    quantized_input_dtype: torch.dtype = torch.int8

    def quantizes_input(self, layer: nn.Module, x: torch.Tensor) -> bool:
        """Whether `apply(layer, PerTokenQuant of x, bias)` (q in `quantized_input_dtype`) is accepted and equals
        `apply(layer, x, bias)` bit for bit, for x [..., in] (or the tensor x is computed from row by row, on
        x's device in x's dtype). Default: no; `apply` then only ever gets tensors."""
        return False


def gemv_applies(x: torch.Tensor, weight: torch.Tensor, max_m: int | None = None) -> bool:
    """Whether `kernels/gemv` takes x [..., K] @ weight [N, K]^T, the device aside: 1..max_m rows
    (default GEMV_MAX_M) of x unit-stride in K, a bf16/f16 weight of x's dtype that is 2-D,
    contiguous and non-empty, with K % 8 == 0 (16-byte rows)."""
    max_m = GEMV_MAX_M if max_m is None else max_m
    if weight.dim() != 2 or weight.dtype not in _GEMV_DTYPES or not weight.is_contiguous():
        return False
    n, k = weight.shape
    if n == 0 or k == 0 or k % 8 or x.dtype != weight.dtype or x.dim() == 0 or x.shape[-1] != k:
        return False
    return x.stride(-1) == 1 and 1 <= x.numel() // k <= max_m


def use_gemv(x: torch.Tensor, weight: torch.Tensor, max_m: int | None = None) -> bool:
    """`gemv_applies` on CUDA tensors; never on other devices (CPU keeps F.linear)."""
    return x.is_cuda and weight.is_cuda and gemv_applies(x, weight, max_m)


class DenseLinearMethod(LinearMethod):
    def process_weights_after_loading(self, layer: nn.Module) -> None:
        return None

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        weight = layer.weight
        if not use_gemv(x, weight):
            return F.linear(x, weight, bias)
        from deepserve.kernels.gemv import gemv  # lazy: Triton on CUDA only

        rows = x.reshape(-1, x.shape[-1])  # [M, in]
        return gemv(rows, weight, bias, static_weight=True).view(*x.shape[:-1], weight.shape[0])

    def apply_gated(self, layer: nn.Module, x: torch.Tensor | PerTokenQuant,
                    consumer: nn.Module) -> torch.Tensor | None:
        """Decode rows (`use_gemv`): silu(gate) * up [..., I] of the merged [gate | up] layer in one GEMV
        launch (kernels/gemv.py `gated`: the [..., 2I] output is never stored, no separate SiLU-and-mul
        launch), the same bits as `consumer.method.apply_silu_and_mul(layer(x))`; None otherwise."""
        weight = layer.weight
        if isinstance(x, PerTokenQuant) or not use_gemv(x, weight):
            return None
        from deepserve.kernels.gemv import gated_applies, gemv  # lazy: Triton on CUDA only

        rows = x.reshape(-1, x.shape[-1])  # [M, in]
        if not gated_applies(rows.shape[0], weight.shape[0], weight.shape[1], weight.dtype):
            return None
        return gemv(rows, weight, layer.bias, static_weight=True, gated=True).view(*x.shape[:-1], -1)


class CpuPackedLinearMethod(LinearMethod):
    def process_weights_after_loading(self, layer: nn.Module) -> None:
        layer.packed_weight = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach())
        if not getattr(layer, "keep_dense_weight", False):
            layer.weight = nn.Parameter(torch.empty(0), requires_grad=False)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [..., in] f32 -> [..., out] f32."""
        rows = x.reshape(-1, x.shape[-1])  # [tokens, in]
        out = torch.ops.mkldnn._linear_pointwise(rows, layer.packed_weight, bias, "none", [], "")
        return out.view(*x.shape[:-1], out.shape[-1])


def linear_method_for(weight: torch.Tensor, quantization: str | None = None) -> LinearMethod:
    """The method for a loaded weight: the `quantization` method from `deepserve.quant` when one
    is named, else packed float32 GEMMs on CPU where oneDNN is built in."""
    if quantization is not None:
        from deepserve.quant import get_quant_method  # lazy: quant methods are optional

        return get_quant_method(quantization)
    packable = weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.numel() > 0
    return CpuPackedLinearMethod() if packable and torch.backends.mkldnn.is_available() else DenseLinearMethod()


def process_weights_after_loading(model: nn.Module, quantization: str | None = None) -> None:
    """Give every layer that has a method the chance to reshape its weights, once. Layers marked
    `quantizable` (LinearBase) get the `quantization` method; the others stay in float."""
    for module in list(model.modules()):
        hook = getattr(module, "process_weights_after_loading", None)
        if callable(hook):
            hook(quantization) if quantization and getattr(module, "quantizable", False) else hook()
