"""Dynamic FP8 (float8_e4m3fn) linear method: W8A8, and fp8 weights with float activations on decode rows.

    Fp8Method(per_channel=True)                    "fp8":             weight scale per output channel
    Fp8Method(per_channel=False)                   "fp8-per-tensor":  one weight scale per layer
    Fp8Method(per_channel=True, fast_accum=False)  "fp8-exact-accum": as "fp8", float32 sums (Accumulation below)

Weights: q = e4m3(w / scale) with scale = max|w| / 448 per output channel (or over the whole
matrix), stored [out, in] row-major with weight_scale [out] f32 (a per-tensor scale is stored
repeated, so both variants run the same row-wise GEMM). Activations: per token at apply time,
scale_t = max|x_t| / 448 (`kernels/fp8_quant.py` on CUDA).

CUDA (compute capability 8.9+: Ada, Hopper): y = torch._scaled_mm(x_q, w_q.t(), scale_a [M, 1],
scale_b [1, N], bias, out_dtype=bfloat16), cuBLASLt's (or CUTLASS's) row-wise scaled FP8 GEMM with
the tensor core's accumulation (use_fast_accum on; off for "fp8-exact-accum": see Accumulation below). It needs K and N
multiples of 16; other layers, and CPU, run the emulation below. Older GPUs are refused when the weights are
processed. A SiLU-gated input (`apply_silu_and_mul`, the MLP's down projection) is quantised by
kernels/silu_and_mul_quant.py straight from the [gate | up] rows there, with the same bits as
fp8_quant(silu_and_mul(x)) (run s15c, H200, W-offline qwen-7b, A/B in one call: its row-split form gave
16,518.68 / 16,585.57 output tok/s against 16,265.83 / 16,296.53 for the previous launch). The input of a linear that
reads a pre-norm layer's norm (qkv_proj, gate_up_proj: layers/decoder.py) comes quantised by the norm's kernel
(`fp8_quant.rms_norm_fp8_quant`, `quantizes_input`) as a `PerTokenQuant`, with the same bits as
fp8_quant(rms_norm(x)); run s11d (H200, W-offline qwen-7b, A/B in one call): 16,157.71 / 16,144.85 output tok/s
against 15,992.96 / 15,981.83 unfused.
Accumulation: "fp8" and "fp8-per-tensor" run _scaled_mm with use_fast_accum on: the tensor core's
reduced-precision running sum over all of K, what vLLM's CUTLASS fp8 kernels run (every sm90 fp8 config of its
scaled_mm dispatch takes an FP8FastAccum kernel schedule). "fp8-exact-accum" turns it off (float32 sums, promoted
out of the tensor core). Kernels (run s13e, benchmarks/kernels_fp8_accumulation.py,
H200): 1.02-1.22x faster at 2048-8192 rows (gate_up 1.13-1.22x, down 1.02-1.07x), with 1.6-2.8x the max
error of the float32-accumulated product, 3-4x for down's K = 18944 (1.03e-2 vs 3.38e-3 of the largest
value at 8192 rows). A layer with a bias (qwen's qkv_proj) keeps float32 sums: cuBLASLt (torch 2.11, CUDA 13,
H200) has no row-wise fast-accumulation algorithm with a bias epilogue at M <= 16 for K >= 8192 and raises
CUBLAS_STATUS_NOT_SUPPORTED (run s15d), and adding the bias in a separate launch would cost more than
the few qkv FLOPs gain. W-offline qwen-7b (run s15e, H200, one call, alternating, this method as it is):
17,532.76 / 17,551.86 output tok/s against 12,085.39 / 12,077.99 for bf16 (1.451x / 1.453x) and 16,507.51
with float32 sums (1.366x); with fast sums in the biased qkv too (run s15c): 1.460x; beside vLLM 0.20.0's fp8
(run s16v, one call): 17,952.52 against vLLM's 11,655.46 (1.540x) and 12,408.76 for bf16 (1.447x). On the
default model (run s15d, GPU, bf16 reference: `deepserve eval`) the two accumulations score alike: top-1
0.9089 fast / 0.9107 float32, perplexity ratio 1.0307 / 1.0288, mean KL 0.0255 / 0.0253 (its K is at most
1536; at qwen's K = 18944 the fast sums' kernel error is 3-4x the float32 one's, above).
Decode rows (CUDA, at most DECODE_GEMV_ROWS = 4 bf16/f16 rows, K a multiple of 16; measured at one row only:
2 to 4 rows were not timed against _scaled_mm): the decode GEMV of the unquantised rows and the e4m3 weights
(kernels/gemv.py, float32 sums, the weight scale applied to the sum; the gate_up GEMV's SiLU-and-mul epilogue
too): a batch-1 step reads the 1-byte weights once and quantises no activation,
where _scaled_mm at M = 1 was slower than bf16 (run s16v, H200, W-b1 qwen-7b: 4.1192 ms per token against
3.5919 for bf16). With the GEMV (run s16e, same card, one call): 2.3601 / 2.3616 ms per token against 3.6508 for
bf16 (1.55x). Beside vLLM 0.20.0's fp8 (run s17v, one call): 2.3609 ms per token, 397.67 output tok/s, against
vLLM's 3.4799 (287.36 tok/s, 1.38x; its figure has the prefill in it) and 3.6342 for bf16 (int8-weight-only,
whose decode GEMV runs dp4a since then, kernels/gemv_dp4a.py: 2.2437). These rows
get fp8 weights with float activations (more accurate than W8A8; the accuracy gate's teacher-forced prefill
measures the W8A8 path), so the norm before qkv_proj / gate_up_proj does not quantise them (`quantizes_input`).
Both accumulation variants take it.
CPU (and the fallback): the same quantisation, then float32 matmul of the fp8 values:
y = (x_q @ w_q^T) * x_scale * w_scale + bias. Correct and portable (tests, CI), not fast.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from deepserve.layers.linear_method import LinearMethod, PerTokenQuant
from deepserve.quant.int8 import div_rn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
MIN_CAPABILITY = (8, 9)
DECODE_GEMV_ROWS = 4  # rows that take the decode GEMV (at most kernels/gemv.py GEMV_MAX_M; module docstring)
_EPS = 1e-8


# ---- pure-PyTorch references ------------------------------------------------------------------------


def quantize_weight_fp8_ref(w: torch.Tensor, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] float -> (q [out, in] e4m3, scale [out] f32); per-tensor: one scale, repeated."""
    w = w.float()
    amax = w.abs().amax(dim=1) if per_channel else w.abs().amax().expand(w.shape[0])  # [out]
    scale = div_rn(amax.clamp(min=_EPS), FP8_MAX)
    q = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale.contiguous()


def quantize_per_token_fp8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [tokens, in] float -> (q [tokens, in] e4m3, scale [tokens] f32), per row."""
    x = x.float()
    scale = div_rn(x.abs().amax(dim=1).clamp(min=_EPS), FP8_MAX)  # [tokens]
    return (x / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def fp8_linear_ref(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                   bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """x_q [M, K] e4m3, x_scale [M], w_q [N, K] e4m3, w_scale [N] -> [M, N] out_dtype, in float32
    (products of e4m3 values are exact in float32; only the sums round)."""
    y = (x_q.float() @ w_q.float().t()) * x_scale.float()[:, None] * w_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def dequantize_weight_fp8_ref(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q [out, in] e4m3, scale [out] -> w [out, in] f32."""
    return q.float() * scale.float()[:, None]


# ---- platform -----------------------------------------------------------------------------------


def check_fp8_device(device: torch.device) -> None:
    """ValueError on a CUDA device without FP8 tensor cores (below sm_89); CPU is fine (emulated)."""
    if device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < MIN_CAPABILITY:
        raise ValueError(f"the fp8 methods (fp8, fp8-per-tensor, fp8-exact-accum) need a GPU of compute "
                         f"capability 8.9 or newer (Ada, Hopper); "
                         f"{torch.cuda.get_device_name(device)} is sm_{major}{minor}. "
                         f"Use --quantization int8 or int8-weight-only on this GPU.")


def scaled_mm_fits(x: torch.Tensor, w_q: torch.Tensor) -> bool:
    """torch._scaled_mm's conditions: CUDA, K and N multiples of 16."""
    return x.is_cuda and w_q.shape[1] % 16 == 0 and w_q.shape[0] % 16 == 0


# ---- the method ---------------------------------------------------------------------------------


class Fp8Method(LinearMethod):
    """Dynamic FP8: e4m3 weights (per channel or per tensor), e4m3 activations per token (W8A8); decode rows keep
    their float activations (module docstring)."""

    quantized_input_dtype = FP8_DTYPE

    def __init__(self, per_channel: bool = True, fast_accum: bool = True):
        self.per_channel = per_channel
        self.fast_accum = fast_accum  # _scaled_mm's use_fast_accum (module docstring)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Replace layer.weight (float [out, in]) by e4m3 [out, in] + weight_scale [out] f32, on the
        weight's device; a layer already holding e4m3 weights and a scale is kept as it is."""
        check_fp8_device(layer.weight.device)
        if layer.weight.dtype == FP8_DTYPE:
            if not hasattr(layer, "weight_scale"):
                raise ValueError("float8 weight without a weight_scale")
            return
        q, scale = quantize_weight_fp8_ref(layer.weight.detach(), self.per_channel)
        layer.weight = nn.Parameter(q.contiguous(), requires_grad=False)
        layer.weight_scale = nn.Parameter(scale, requires_grad=False)

    def apply(self, layer: nn.Module, x: torch.Tensor | PerTokenQuant, bias: torch.Tensor | None) -> torch.Tensor:
        """x [..., in] float, or its per-token e4m3 quantisation (`quantizes_input`) -> [..., out] in x's dtype."""
        if not isinstance(x, PerTokenQuant) and decode_gemv_applies(x, layer.weight):
            from deepserve.kernels.gemv import gemv

            rows = x.reshape(-1, x.shape[-1])  # [M, in]
            y = gemv(rows, layer.weight, bias, w_scale=layer.weight_scale, static_weight=True)
            return y.view(*x.shape[:-1], y.shape[-1])
        if isinstance(x, PerTokenQuant):
            if x.q.dtype != FP8_DTYPE:
                raise TypeError(f"Fp8Method takes an e4m3 PerTokenQuant, got q of {x.q.dtype}")
            rows, scale = x.q.reshape(-1, x.q.shape[-1]), x.scale.reshape(-1)  # [tokens, in], [tokens]
            if scaled_mm_fits(rows, layer.weight):
                y = _rowwise_scaled_mm(rows, scale, layer.weight, layer.weight_scale, bias, x.dtype, self.fast_accum)
            else:  # CPU (tests): the emulation the tensor path takes there
                y = fp8_linear_ref(rows, scale, layer.weight, layer.weight_scale, bias, x.dtype)
            return y.view(*x.q.shape[:-1], y.shape[-1])
        rows = x.reshape(-1, x.shape[-1])  # [tokens, in]
        if scaled_mm_fits(rows, layer.weight):
            y = fp8_scaled_mm(rows, layer.weight, layer.weight_scale, bias, self.fast_accum)
        else:
            x_q, x_scale = quantize_per_token_fp8_ref(rows)
            y = fp8_linear_ref(x_q, x_scale, layer.weight, layer.weight_scale, bias, x.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    def quantizes_input(self, layer: nn.Module, x: torch.Tensor) -> bool:
        """Where `apply` runs `_scaled_mm` on x's rows (CUDA, f16/bf16 x, K and N multiples of 16, the weight in
        e4m3): that path is fp8_quant then `_rowwise_scaled_mm`, which takes the quantised rows as they are. Rows
        wider than the fused norm kernel keeps whole are not (kernels/int8_quant.py `norm_matches_rms_norm`)."""
        if not (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)) or layer.weight.dtype != FP8_DTYPE:
            return False
        if _decode_rows(x, layer.weight):  # decode rows: the GEMV takes them unquantised (the norm's output is
            return False  # contiguous, so the GEMV's unit-stride condition holds whatever x's strides)
        from deepserve.kernels.int8_quant import norm_matches_rms_norm

        k, n = layer.weight.shape[1], layer.weight.shape[0]
        return x.shape[-1] == k and k % 16 == 0 and n % 16 == 0 and norm_matches_rms_norm(k)

    def apply_silu_and_mul(self, layer: nn.Module, gate_up: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """gate_up [..., 2 * in] -> apply(silu(gate) * up) [..., out], bit for bit; where `_scaled_mm`
        runs, SiLU-and-mul runs inside the per-token quantisation (`fp8_silu_and_mul_scaled_mm`)."""
        rows = gate_up.reshape(-1, gate_up.shape[-1])  # [tokens, 2 * in]
        if not scaled_mm_fits(rows, layer.weight) or _decode_rows(rows, layer.weight):  # decode: SiLU-and-mul, GEMV
            return super().apply_silu_and_mul(layer, gate_up, bias)
        y = fp8_silu_and_mul_scaled_mm(rows, layer.weight, layer.weight_scale, bias, self.fast_accum)
        return y.view(*gate_up.shape[:-1], y.shape[-1])

    def apply_gated(self, layer: nn.Module, x: torch.Tensor | PerTokenQuant,
                    consumer: nn.Module) -> torch.Tensor | None:
        """Decode rows (`decode_gemv_applies`): silu(gate) * up [..., I] of this merged [gate | up] layer in one GEMV
        launch, the same bits as `consumer.method.apply_silu_and_mul(layer(x))` (`LinearMethod.apply_gated`) where
        the consumer is fp8 too; None otherwise."""
        if isinstance(x, PerTokenQuant) or not decode_gemv_applies(x, layer.weight) \
                or not isinstance(getattr(consumer, "method", None), Fp8Method):
            return None
        from deepserve.kernels.gemv import gated_applies, gemv

        rows = x.reshape(-1, x.shape[-1])  # [M, in]
        if not gated_applies(rows.shape[0], layer.weight.shape[0], layer.weight.shape[1], layer.weight.dtype):
            return None
        h = gemv(rows, layer.weight, layer.bias, w_scale=layer.weight_scale, static_weight=True, gated=True)
        return h.view(*x.shape[:-1], h.shape[-1])


def decode_gemv_applies(x: torch.Tensor, w_q: torch.Tensor) -> bool:
    """Whether x [..., K] are decode rows the GEMV takes with these weights (module docstring): `_decode_rows`, with
    unit stride in K."""
    return len(x.shape) > 0 and x.shape[-1] == w_q.shape[-1] and _decode_rows(x, w_q) and x.stride(-1) == 1


def _decode_rows(x: torch.Tensor, w_q: torch.Tensor) -> bool:
    """x [..., *] CUDA f16/bf16 with 1 to DECODE_GEMV_ROWS rows, and w_q e4m3 [N, K] contiguous with K a multiple
    of 16 (no Triton import: CPU installs without it call this too)."""
    if not (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)):
        return False
    return (1 <= math.prod(x.shape[:-1]) <= DECODE_GEMV_ROWS and w_q.dtype == FP8_DTYPE and w_q.dim() == 2
            and w_q.is_contiguous() and w_q.shape[1] % 16 == 0)


def fp8_scaled_mm(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                  bias: torch.Tensor | None, fast_accum: bool) -> torch.Tensor:
    """x [M, K] f16/bf16/f32 on CUDA, w_q [N, K] e4m3 row-major, w_scale [N] f32 -> [M, N] x.dtype. fast_accum:
    the tensor core's sums (what "fp8" runs) or float32 ones ("fp8-exact-accum"); no default, so that a caller
    says which."""
    from deepserve.kernels.fp8_quant import fp8_quant

    x_q, x_scale = fp8_quant(x if x.stride(-1) == 1 else x.contiguous())
    return _rowwise_scaled_mm(x_q, x_scale, w_q, w_scale, bias, x.dtype, fast_accum)


def fp8_silu_and_mul_scaled_mm(gate_up: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                               bias: torch.Tensor | None, fast_accum: bool) -> torch.Tensor:
    """gate_up [M, 2K] f16/bf16/f32 on CUDA -> [M, N] gate_up.dtype: fp8_scaled_mm(silu_and_mul(gate_up)),
    bit for bit, SiLU-and-mul fused into the quantisation (`kernels/silu_and_mul_quant.py`)."""
    from deepserve.kernels.silu_and_mul_quant import silu_and_mul_fp8_quant

    x_q, x_scale = silu_and_mul_fp8_quant(gate_up)
    return _rowwise_scaled_mm(x_q, x_scale, w_q, w_scale, bias, gate_up.dtype, fast_accum)


def _rowwise_scaled_mm(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                       bias: torch.Tensor | None, out_dtype: torch.dtype, fast_accum: bool) -> torch.Tensor:
    """x_q [M, K] e4m3, x_scale [M] f32 -> [M, N] out_dtype. Row-wise scaled _scaled_mm computes in
    bfloat16 out (the only output it supports row-wise); `fast_accum`: its use_fast_accum, for a GEMM without a
    bias only (module docstring)."""
    y = torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale[:, None], scale_b=w_scale[None, :],
                         bias=None if bias is None else bias.to(torch.bfloat16), out_dtype=torch.bfloat16,
                         use_fast_accum=fast_accum and bias is None)
    return y if out_dtype == torch.bfloat16 else y.to(out_dtype)
