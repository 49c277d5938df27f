"""Dynamic INT8 linear methods: eager PyTorch on CPU, Triton / cuBLAS kernels on CUDA (`int8_cuda`).

    Int8W8A8Method        weights int8 per output channel (symmetric, scale [out] f32), activations
                          quantised per token at apply time; int8 x int8 -> int32 GEMM
                          (torch._int_mm), then y = acc * x_scale[:, None] * w_scale[None, :].
    Int8WeightOnlyMethod  W8A16: int8 weights + scales (+ zero points when asymmetric), activations
                          stay float: y = (x @ q^T - sum(x) * zp) * scale.

Quantisation (per output channel c of w [out, in]):
    symmetric   scale = max|w_c| / 127,             q = clamp(round(w / scale), -127, 127)
    asymmetric  lo, hi = min(w_c, 0), max(w_c, 0)
                scale = (hi - lo) / 255,            zp = clamp(round(-128 - lo / scale), -128, 127)
                q = clamp(round(w / scale) + zp, -128, 127),   w ~ (q - zp) * scale
Every element round-trips within scale / 2. Symmetric quantisation is idempotent on its own output:
quantising dequant(q, scale) again gives the same q (and scale to an ulp), which is why a quantised
checkpoint is loaded by dequantising it to float and letting the method quantise again.

CPU timings (2 cores, 576x1536 weight): float32 packed GEMM at 8 rows 0.52 ms, _int_mm 0.04 ms;
torch._weight_int8pack_mm accepts float32 but runs ~9x slower than dequantise-and-matmul here, so
W8A16 dequantises (it saves memory on CPU, not time).

Weight layout: on CPU the int8 [out, in] weight is a view of a contiguous [in, out] buffer (what
torch._int_mm wants there); on CUDA it is [out, in] row-major (K-major, what the int8 tensor cores,
the Triton kernels and cuBLASLt's TN int8 GEMM want; see `kernels/int8_gemm.py`). Quantising runs
where the weight lives, one layer at a time, so a model built on the GPU (dummy weights included)
is quantised there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepserve.layers.linear_method import LinearMethod, PerTokenQuant
from deepserve.loader.safetensors_loader import StreamWrapper

_EPS = 1e-8


def div_rn(t: torch.Tensor, divisor: float) -> torch.Tensor:
    """t / divisor correctly rounded on every device, as the kernels' `tl.div_rn`. Not `t / 127.0`:
    PyTorch's CUDA division by a Python number computes t * float32(1 / divisor), a second
    rounding (1 ulp off the quotient for a few percent of the scales amax / 127 or amax / 448), while its CPU
    division divides; dividing by a tensor on t's device is an IEEE division on both."""
    return t / torch.full_like(t, divisor)


# ---- pure-PyTorch references ------------------------------------------------------------------------


def quantize_per_channel_ref(w: torch.Tensor, symmetric: bool = True
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """w [out, in] float -> (q [out, in] int8, scale [out] f32, zero_point [out] int8 or None)."""
    w = w.float()
    if symmetric:
        scale = div_rn(w.abs().amax(dim=1).clamp(min=_EPS), 127.0)  # [out]
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return q, scale, None
    lo, hi = w.amin(dim=1).clamp(max=0.0), w.amax(dim=1).clamp(min=0.0)  # [out]
    scale = div_rn((hi - lo).clamp(min=_EPS), 255.0)
    zp = torch.round(-128.0 - lo / scale).clamp(-128, 127)
    q = (torch.round(w / scale[:, None]) + zp[:, None]).clamp(-128, 127).to(torch.int8)
    return q, scale, zp.to(torch.int8)


def dequantize_per_channel_ref(q: torch.Tensor, scale: torch.Tensor,
                               zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """q [out, in] int8, scale [out] -> w [out, in] f32."""
    w = q.float()
    if zero_point is not None:
        w = w - zero_point.float()[:, None]
    return w * scale.float()[:, None]


def quantize_per_token_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [tokens, in] float -> (q [tokens, in] int8, scale [tokens] f32), symmetric per row."""
    x = x.float()
    scale = div_rn(x.abs().amax(dim=1).clamp(min=_EPS), 127.0)  # [tokens]
    q = torch.round(x / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def int8_linear_ref(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """x_q [M, K] int8, x_scale [M], w_q [N, K] int8, w_scale [N] -> y [M, N] f32 (exact int sums
    in float64: |sum| <= 127^2 K stays far below 2^53)."""
    acc = x_q.double() @ w_q.double().t()  # [M, N]
    y = (acc * x_scale.double()[:, None] * w_scale.double()[None, :]).float()
    return y if bias is None else y + bias.float()


# ---- host wrappers ---------------------------------------------------------------------------------


_CUDA_MIN_ROWS = 17  # cuBLAS int8 GEMM via torch._int_mm wants M > 16


def int8_mm(x_q: torch.Tensor, w_q_t: torch.Tensor) -> torch.Tensor:
    """x_q [M, K] int8 @ w_q_t [K, N] int8 -> [M, N] int32."""
    if x_q.dtype != torch.int8 or w_q_t.dtype != torch.int8:
        raise TypeError(f"int8_mm wants int8 operands, got {x_q.dtype} and {w_q_t.dtype}")
    if x_q.dim() != 2 or w_q_t.dim() != 2 or x_q.shape[1] != w_q_t.shape[0]:
        raise ValueError(f"int8_mm shapes {tuple(x_q.shape)} @ {tuple(w_q_t.shape)} do not chain")
    if not hasattr(torch, "_int_mm"):
        return (x_q.double() @ w_q_t.double()).to(torch.int32)
    rows = x_q.shape[0]
    if x_q.is_cuda and rows < _CUDA_MIN_ROWS:
        x_q = F.pad(x_q, (0, 0, 0, _CUDA_MIN_ROWS - rows))  # [17, K]
        return torch._int_mm(x_q, w_q_t)[:rows]
    return torch._int_mm(x_q.contiguous(), w_q_t)


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def _install_quantized(layer: nn.Module, symmetric: bool) -> None:
    """Replace layer.weight (float [out, in]) by int8 [out, in] whose transpose is contiguous, and
    add weight_scale [out] f32 (and weight_zero_point [out] f32). Already-quantised layers
    (int8 weight + weight_scale, e.g. installed from a quantised checkpoint) are kept as they are."""
    if layer.weight.dtype == torch.int8:
        if not hasattr(layer, "weight_scale"):
            raise ValueError("int8 weight without a weight_scale")
        return
    q, scale, zp = quantize_per_channel_ref(layer.weight.detach(), symmetric)
    layer.weight = _frozen(q.contiguous() if q.is_cuda else q.t().contiguous().t())  # see "Weight layout"
    layer.weight_scale = _frozen(scale.to(layer.weight.device))
    if zp is not None:
        layer.weight_zero_point = _frozen(zp.float())


class Int8W8A8Method(LinearMethod):
    """Dynamic W8A8: symmetric int8 weights per channel, activations per token at apply time."""

    symmetric = True

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Quantise the weight; a merged [gate | up] layer that feeds SiLU-and-mul (`silu_gate_up`, set by the
        dense MLPs) on CUDA, unbiased and served by this method itself (not wrapped: the Hadamard method's
        inner one), gets its weight and scales in the gated layout that `apply_gated` reads
        (kernels/int8_gemm_silu.py `to_gated_layout`); `layer.gated_inter` then holds I. The model-wide
        method makes the down projection int8 W8A8 too, which `apply_gated` needs (else `apply` un-permutes)."""
        _install_quantized(layer, symmetric=True)
        if self.takes_gated_layout(layer):
            put_in_gated_layout(layer)

    def takes_gated_layout(self, layer: nn.Module) -> bool:
        """A merged [gate | up] layer (two equal halves) feeding SiLU-and-mul, its int8 weight on an sm_90 /
        sm_100 GPU (where the gated kernel was measured, with TMA loads), no bias, served by this method
        itself (`layer.method is self`), not already in the layout, and wide enough that the gated GEMM's
        grid covers the GPU at any M: I / GATED_BLOCK blocks >= the SMs (I >= 8448 on an H200: qwen-7b's
        18944, llama-8b's 14336), and at most MAX_PARTS blocks (I <= 32768). Narrower, the unfused GEMM
        splits K over idle SMs and wins at decode sizes (run s8d, V2-Lite's shared experts, I = 2816, 256
        rows: 15.4 us unfused, 18.7 us gated at its best config)."""
        halves = getattr(layer, "output_sizes", ())
        if not (getattr(layer, "silu_gate_up", False) and len(halves) == 2 and halves[0] == halves[1]
                and layer.weight.is_cuda and layer.bias is None and getattr(layer, "method", None) is self
                and getattr(layer, "gated_inter", None) is None):
            return False
        from deepserve.kernels.int8_gemm import _tma_device, num_sms
        from deepserve.kernels.int8_gemm_silu import GATED_BLOCK, MAX_PARTS

        inter, device = layer.weight.shape[0] // 2, layer.weight.device
        return _tma_device(device.index or 0) and GATED_BLOCK * num_sms(device) <= inter <= GATED_BLOCK * MAX_PARTS

    def apply(self, layer: nn.Module, x: torch.Tensor | PerTokenQuant, bias: torch.Tensor | None) -> torch.Tensor:
        """x [..., in] float, or its per-token quantisation (`quantizes_input`) -> [..., out] in x's dtype.
        A gated-layout weight (`process_weights_after_loading`) gives its output back in [gate | up] order
        (a copy: the path `apply_gated` does not take, e.g. under calibration hooks)."""
        y = self._apply(layer, x, bias)
        inter = getattr(layer, "gated_inter", None)
        if inter is None:
            return y
        from deepserve.kernels.int8_gemm_silu import from_gated_layout

        return from_gated_layout(y, inter)

    def _apply(self, layer: nn.Module, x: torch.Tensor | PerTokenQuant, bias: torch.Tensor | None) -> torch.Tensor:
        if isinstance(x, PerTokenQuant):
            return self._apply_quantized(layer, x, bias)
        rows = x.reshape(-1, x.shape[-1])  # [tokens, in]
        if rows.is_cuda:
            from deepserve.quant.int8_cuda import w8a8_linear

            y = w8a8_linear(rows, layer.weight, layer.weight_scale, bias)
            return y.view(*x.shape[:-1], y.shape[-1])
        x_q, x_scale = quantize_per_token_ref(rows)
        quantized = PerTokenQuant(x_q.view(x.shape), x_scale.view(x.shape[:-1]), x.dtype)
        return self._apply_quantized(layer, quantized, bias)

    def quantizes_input(self, layer: nn.Module, x: torch.Tensor) -> bool:
        """On CUDA, for f16/bf16 x: `w8a8_linear` is int8_quant then `w8a8_gemm`, and the latter (every
        W8A8 backend) takes the quantised rows as they are. Rows wider than the fused RMSNorm kernel keeps
        whole (8192 columns) are not: its wide variant sums the squares in another order than rms_norm."""
        if not (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)):
            return False
        from deepserve.kernels.int8_quant import norm_matches_rms_norm

        return norm_matches_rms_norm(x.shape[-1])

    @staticmethod
    def _apply_quantized(layer: nn.Module, x: PerTokenQuant, bias: torch.Tensor | None) -> torch.Tensor:
        """x: q [..., in] int8, scale [...] f32 -> [..., out] x.dtype; on CUDA `int8_cuda.w8a8_gemm`."""
        if x.q.dtype != torch.int8:
            raise TypeError(f"Int8W8A8Method takes an int8 PerTokenQuant, got q of {x.q.dtype}")
        rows, scale = x.q.reshape(-1, x.q.shape[-1]), x.scale.reshape(-1)  # [tokens, in], [tokens]
        if rows.is_cuda:
            from deepserve.quant.int8_cuda import w8a8_gemm

            y = w8a8_gemm(rows, scale, layer.weight, layer.weight_scale, bias, x.dtype)
        else:
            acc = int8_mm(rows, layer.weight.t())  # [tokens, out] int32
            y = acc.float() * scale[:, None] * layer.weight_scale[None, :]
            if bias is not None:
                y = y + bias.float()
            y = y.to(x.dtype)
        return y.view(*x.q.shape[:-1], y.shape[-1])

    def apply_silu_and_mul(self, layer: nn.Module, gate_up: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """gate_up [..., 2 * in] -> apply(silu(gate) * up) [..., out], bit for bit; on CUDA SiLU-and-mul
        runs inside the per-token quantisation (`int8_cuda.w8a8_silu_and_mul_linear`)."""
        if not gate_up.is_cuda:
            return super().apply_silu_and_mul(layer, gate_up, bias)
        from deepserve.quant.int8_cuda import w8a8_silu_and_mul_linear

        rows = gate_up.reshape(-1, gate_up.shape[-1])  # [tokens, 2 * in]
        y = w8a8_silu_and_mul_linear(rows, layer.weight, layer.weight_scale, bias)
        return y.view(*gate_up.shape[:-1], y.shape[-1])

    def apply_gated(self, layer: nn.Module, x: torch.Tensor | PerTokenQuant,
                    consumer: nn.Module) -> PerTokenQuant | None:
        """x [..., in] (or its PerTokenQuant) through this merged [gate | up] layer, then SiLU-and-mul, as the
        per-token quantisation `consumer` (the down projection, also plain int8 W8A8) makes of its input
        on CUDA: PerTokenQuant of silu(gate) * up [..., out / 2], in x's dtype (`LinearMethod.apply_gated`).
        On CUDA, `int8_cuda.w8a8_gate_up_silu_quant` on the gated-layout weight: the gate_up output is never
        written. None (not fused) without that layout (off CUDA, a biased gate_up, a layer that does not
        feed SiLU-and-mul), and for a consumer with another method (one that transforms its input first,
        such as the Hadamard rotation, must see the tensor)."""
        inter = getattr(layer, "gated_inter", None)
        if inter is None or type(getattr(consumer, "method", None)) is not Int8W8A8Method:
            return None
        if not isinstance(x, PerTokenQuant):
            if not (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16, torch.float32)):
                return None
            from deepserve.kernels.int8_quant import int8_quant

            rows = x.reshape(-1, x.shape[-1])  # [T, in]
            q, scale, _ = int8_quant(rows if rows.stride(-1) == 1 else rows.contiguous())
            x = PerTokenQuant(q.view(x.shape), scale.view(x.shape[:-1]), x.dtype)
        if not x.q.is_cuda:
            return None
        from deepserve.quant.int8_cuda import w8a8_gate_up_silu_quant

        lead = x.q.shape[:-1]
        h = w8a8_gate_up_silu_quant(x.q.reshape(-1, x.q.shape[-1]), x.scale.reshape(-1), layer.weight,
                                    layer.weight_scale, inter, x.dtype)
        return PerTokenQuant(h.q.view(*lead, h.q.shape[-1]), h.scale.view(lead), x.dtype)


def put_in_gated_layout(layer: nn.Module) -> None:
    """layer.weight [2I, K] int8 and weight_scale [2I] ([gate | up]) -> the gated layout of
    kernels/int8_gemm_silu.py; layer.gated_inter = I."""
    from deepserve.kernels import int8_gemm_silu

    layer.gated_inter = layer.weight.shape[0] // 2
    layer.weight = _frozen(int8_gemm_silu.to_gated_layout(layer.weight.detach()))
    layer.weight_scale = _frozen(int8_gemm_silu.to_gated_layout(layer.weight_scale.detach()))


class Int8WeightOnlyMethod(LinearMethod):
    """W8A16: int8 weights per channel (symmetric, or asymmetric with zero points), float activations."""

    def __init__(self, symmetric: bool = True):
        self.symmetric = symmetric

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        _install_quantized(layer, self.symmetric)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [..., in] float -> [..., out] in x's dtype."""
        rows = x.reshape(-1, x.shape[-1])  # [tokens, in]
        zp = getattr(layer, "weight_zero_point", None)
        if rows.is_cuda:
            from deepserve.quant.int8_cuda import w8a16_linear

            y = w8a16_linear(rows, layer.weight, layer.weight_scale, zp, bias)
            return y.view(*x.shape[:-1], y.shape[-1])
        y = rows @ layer.weight.t().to(x.dtype)  # [tokens, out]
        if zp is not None:
            y = y - rows.sum(dim=-1, keepdim=True) * zp.to(x.dtype)[None, :]
        y = y * layer.weight_scale.to(x.dtype)[None, :]
        if bias is not None:
            y = y + bias
        return y.view(*x.shape[:-1], y.shape[-1])

    def apply_gated(self, layer: nn.Module, x: torch.Tensor | PerTokenQuant,
                    consumer: nn.Module) -> torch.Tensor | None:
        """Decode rows on CUDA (the "gemv" backend of `int8_cuda.W8A16_BACKENDS`, symmetric weights):
        silu(gate) * up [..., I] of this merged [gate | up] layer in one GEMV launch, the same bits as
        `consumer.method.apply_silu_and_mul(layer(x))` (`LinearMethod.apply_gated`); None otherwise."""
        if isinstance(x, PerTokenQuant) or not x.is_cuda or getattr(layer, "weight_zero_point", None) is not None:
            return None
        from deepserve.quant.int8_cuda import w8a16_gated_gemv

        rows = x.reshape(-1, x.shape[-1])  # [tokens, in]
        h = w8a16_gated_gemv(rows, layer.weight, layer.weight_scale, layer.bias)
        return None if h is None else h.view(*x.shape[:-1], h.shape[-1])


# ---- quantised checkpoints ------------------------------------------------------------------------

SCALE_SUFFIX, ZERO_POINT_SUFFIX = "_scale", "_zero_point"  # <prefix>.weight -> <prefix>.weight_scale


class DequantizingStream(StreamWrapper):
    """Wraps a WeightStream of a `deepserve quantize` checkpoint: each int8 `<p>.weight` is yielded
    as float32 `dequant(q, <p>.weight_scale, <p>.weight_zero_point)` once its companions have been
    read (in any order, across shards); the scale / zero-point tensors themselves are consumed. An e4m3
    `<p>.weight` (an fp8 checkpoint) is yielded as `q * <p>.weight_scale` per row in float32 (rounded: a 4-bit
    significand times a 24-bit scale), which fp8 quantises back to the same e4m3 bits.
    The layer's method then quantises the float weight again (exactly, for symmetric weights).
    `hadamard_block`: the checkpoint stores W H (quant/hadamard.py); the dequantised weight is
    rotated back to W (H is its own inverse) so that every method sees the original basis."""

    def __init__(self, inner, asymmetric: bool = False, hadamard_block: int | None = None):
        super().__init__(inner)
        self.asymmetric, self.hadamard_block = asymmetric, hadamard_block

    @classmethod
    def for_method(cls, inner, method: str) -> "DequantizingStream":
        """The stream for a checkpoint `deepserve quantize` wrote for the registered `method`."""
        from deepserve.quant import hadamard_block_of

        return cls(inner, asymmetric=method.endswith("-asym"), hadamard_block=hadamard_block_of(method))

    def _dequantize(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        if parts["q"].dtype == torch.float8_e4m3fn:
            from deepserve.quant.fp8 import dequantize_weight_fp8_ref

            return dequantize_weight_fp8_ref(parts["q"], parts[SCALE_SUFFIX])
        w = dequantize_per_channel_ref(parts["q"], parts[SCALE_SUFFIX], parts.get(ZERO_POINT_SUFFIX))
        if self.hadamard_block is None:
            return w
        from deepserve.quant.hadamard import block_size_for, rotate_blocks

        return rotate_blocks(w.double(), block_size_for(w.shape[1], self.hadamard_block)).float()

    def _needs(self) -> tuple[str, ...]:
        return ("q", SCALE_SUFFIX, ZERO_POINT_SUFFIX) if self.asymmetric else ("q", SCALE_SUFFIX)

    def __iter__(self):
        pending: dict[str, dict[str, torch.Tensor]] = {}  # weight name -> parts read so far
        for name, tensor in self.inner:
            base, part = _split(name)
            if part == "q" and tensor.dtype not in (torch.int8, torch.float8_e4m3fn):
                yield name, tensor  # an unquantised tensor (norms, embeddings, MoE experts)
                continue
            parts = pending.setdefault(base, {})
            parts[part] = tensor
            if all(k in parts for k in self._needs()):
                del pending[base]
                yield base, self._dequantize(parts)
        if pending:
            name, parts = next(iter(pending.items()))
            raise ValueError(f"quantised tensor {name!r} is incomplete: found {sorted(parts)}, "
                             f"needs {list(self._needs())} (q = the int8 / e4m3 {name})")


def _split(name: str) -> tuple[str, str]:
    """"a.weight_scale" -> ("a.weight", "_scale"); "a.weight" -> ("a.weight", "q")."""
    for suffix in (SCALE_SUFFIX, ZERO_POINT_SUFFIX):
        if name.endswith(".weight" + suffix):
            return name[: -len(suffix)], suffix
    return name, "q"
