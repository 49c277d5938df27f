"""The down projection of a SiLU-gated MLP: `LinearMethod.apply_silu_and_mul` (default: apply of
silu_and_mul) and `RowParallelLinear.forward_silu_and_mul`, which the dense MLPs call.

The W8A8 methods (int8, fp8) override it on CUDA with SiLU-and-mul fused into the activation
quantisation (kernels/silu_and_mul_quant.py); the result must be the unfused one bit for bit. Their CUDA
functions run here on `device()`: the GPU when there is one, else CPU tensors through the Triton
interpreter (as tests/kernels/test_int8_gemm.py runs int8_cuda.w8a8_linear). On CPU the methods
themselves take the default (their CPU math, unchanged); at the layer level the fused CUDA branch runs
in the GPU tests at the end.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepserve.config import ModelConfig
from deepserve.layers import fused
from deepserve.layers.linear import RowParallelLinear
from deepserve.layers.linear_method import CpuPackedLinearMethod, DenseLinearMethod, LinearMethod
from deepserve.layers.moe import GatedMLP
from deepserve.models.llama import LlamaMLP
from deepserve.quant import get_quant_method
from deepserve.quant.fp8 import quantize_weight_fp8_ref
from deepserve.quant.int8 import Int8W8A8Method, quantize_per_channel_ref
from tests.kernels.interpret import device, load_kernel_module

SILU = load_kernel_module("silu_and_mul")
FUSED = ["int8", "fp8", "fp8-per-tensor", "fp8-exact-accum"]
DEFAULT = ["int8-weight-only", "int8-weight-only-asym", "int8-hadamard", "block-fp8"]


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _down(name: str | None, inter: int = 96, out: int = 64, dtype=torch.float32, dev="cpu",
          **kwargs) -> RowParallelLinear:
    """A RowParallelLinear [out, inter] with bias, random weights, processed for `name` (None: float)."""
    with torch.device(dev):
        layer = RowParallelLinear(inter, out, bias=True, **kwargs)
    layer.weight.normal_(std=inter ** -0.5)
    layer.bias.normal_()
    layer.to(dtype).process_weights_after_loading(name)
    return layer


def test_which_methods_fuse():
    """int8 W8A8 and fp8 override apply_silu_and_mul; every other method inherits the default."""
    methods = {name: get_quant_method(name) for name in [*FUSED, *DEFAULT]}
    methods.update(dense=DenseLinearMethod(), packed=CpuPackedLinearMethod())
    for name, method in methods.items():
        assert LinearMethod in type(method).__mro__, name  # subclassed: the default is inherited
        fused_here = type(method).apply_silu_and_mul is not LinearMethod.apply_silu_and_mul
        assert fused_here == (name in FUSED), name


@pytest.mark.parametrize("name", [None, *FUSED, *DEFAULT])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_forward_silu_and_mul_is_forward_of_silu_and_mul(name, dtype):
    """On CPU every method (float: packed float32 / F.linear bf16) keeps today's math exactly."""
    layer = _down(name, dtype=dtype)
    gate_up = torch.randn(3, 5, 2 * 96).to(dtype)  # [batch, tokens, 2I]: leading dims kept
    got = layer.forward_silu_and_mul(gate_up)
    assert got.shape == (3, 5, 64) and got.dtype == dtype
    assert torch.equal(got, layer(_silu_and_mul(gate_up)))


@pytest.mark.parametrize("name", [None, "int8-weight-only"])
def test_default_calls_apply_on_silu_and_mul(monkeypatch, name):
    """bf16 and W8A16: apply_silu_and_mul is one apply of silu_and_mul(gate_up), nothing else."""
    layer = _down(name, dtype=torch.bfloat16)
    seen = []
    apply = type(layer.method).apply
    monkeypatch.setattr(type(layer.method), "apply",
                        lambda self, lay, x, bias: seen.append(x) or apply(self, lay, x, bias))
    gate_up = torch.randn(4, 2 * 96).bfloat16()
    layer.forward_silu_and_mul(gate_up)
    assert len(seen) == 1 and torch.equal(seen[0], _silu_and_mul(gate_up))


def test_tensor_parallel_reduce_and_bias():
    """forward_silu_and_mul does what forward does after apply: all-reduce, then the bias once."""
    reduced = []
    layer = _down("int8", inter=192, tp_size=2, all_reduce=lambda t: reduced.append(t) or 2 * t)
    assert layer.in_features == 96
    gate_up = torch.randn(5, 2 * 96)
    got = layer.forward_silu_and_mul(gate_up)
    assert len(reduced) == 1
    assert torch.equal(got, 2 * reduced[0] + layer.bias)
    assert torch.equal(got, layer(_silu_and_mul(gate_up)))


def test_protocol_method_without_the_default_takes_the_unfused_path():
    """A method that follows the LinearMethod protocol without subclassing it (no apply_silu_and_mul, e.g. a
    plugin's) still serves forward_silu_and_mul: the layer runs on silu(gate) * up."""

    class PlainMethod:  # apply only
        def process_weights_after_loading(self, layer):
            return None

        def apply(self, layer, x, bias):
            return F.linear(x, layer.weight, bias)

    layer = RowParallelLinear(64, 32, bias=True)
    layer.weight.data.normal_(std=0.125)
    layer.bias.data.normal_()
    layer.method = PlainMethod()
    gate_up = torch.randn(3, 128)
    assert torch.equal(layer.forward_silu_and_mul(gate_up), layer(_silu_and_mul(gate_up)))


# ---- the CUDA paths of the W8A8 methods, against their unfused composition ------------------------


@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("backend", ["triton", "int_mm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_cuda_path_is_the_unfused_one(m, backend, dtype):
    from deepserve.quant.int8_cuda import w8a8_linear, w8a8_silu_and_mul_linear

    dev = device()
    gate_up = (2 * torch.randn(m, 2 * 96, device=dev)).to(dtype)
    w_q, w_s, _ = quantize_per_channel_ref(torch.randn(64, 96, device=dev))
    bias = torch.randn(64, device=dev).to(dtype)
    want = w8a8_linear(SILU.silu_and_mul(gate_up), w_q.contiguous(), w_s, bias, backend=backend)
    got = w8a8_silu_and_mul_linear(gate_up, w_q.contiguous(), w_s, bias, backend=backend)
    assert got.dtype == dtype and torch.equal(got, want)


@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_cuda_path_is_the_unfused_one(monkeypatch, m, dtype):
    """Same _scaled_mm operands (recorded) and output; CPU torch runs _scaled_mm too."""
    from deepserve.quant.fp8 import fp8_scaled_mm, fp8_silu_and_mul_scaled_mm

    dev = device()
    gate_up = (2 * torch.randn(m, 2 * 96, device=dev)).to(dtype)
    w_q, w_s = quantize_weight_fp8_ref(torch.randn(64, 96, device=dev))
    bias = torch.randn(64, device=dev).to(dtype)
    calls, scaled_mm = [], torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm",
                        lambda a, b, **kw: calls.append((a, kw["scale_a"])) or scaled_mm(a, b, **kw))
    want = fp8_scaled_mm(SILU.silu_and_mul(gate_up), w_q.contiguous(), w_s, bias, fast_accum=False)
    got = fp8_silu_and_mul_scaled_mm(gate_up, w_q.contiguous(), w_s, bias, fast_accum=False)
    assert got.dtype == dtype and torch.equal(got, want)
    (a0, s0), (a1, s1) = calls
    assert torch.equal(a0.view(torch.uint8), a1.view(torch.uint8)) and torch.equal(s0, s1)


# ---- the MLPs call the fused entry for SiLU and only then -------------------------------------------


def _config(**kw) -> ModelConfig:
    return ModelConfig(architecture="LlamaForCausalLM", vocab_size=16, hidden_size=64, num_hidden_layers=1,
                       num_attention_heads=1, num_key_value_heads=1, intermediate_size=96,
                       max_position_embeddings=64, **kw)


def _mlps() -> dict[str, nn.Module]:
    mlps = {"llama": LlamaMLP(_config(), bias=False), "gated": GatedMLP(64, 96)}
    for mlp in mlps.values():
        for p in mlp.parameters():
            p.normal_(std=p.shape[-1] ** -0.5)
    return mlps


class _GeluAndMul(nn.Module):
    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.gelu(gate) * up


@pytest.mark.parametrize("kind", ["llama", "gated"])
def test_mlp_calls_the_fused_entry_for_silu_only(monkeypatch, kind):
    mlp = _mlps()[kind]
    for module in mlp.modules():
        if hasattr(module, "quantizable"):
            module.process_weights_after_loading("int8")
    calls = []
    fused_entry = Int8W8A8Method.apply_silu_and_mul
    monkeypatch.setattr(Int8W8A8Method, "apply_silu_and_mul",
                        lambda self, *a: calls.append(a[1]) or fused_entry(self, *a))
    x = torch.randn(5, 64)
    gate_up = mlp.gate_up_proj(x)
    y = mlp(x)
    assert len(calls) == 1 and torch.equal(calls[0], gate_up)
    assert torch.equal(y, mlp.down_proj(fused.silu_and_mul(gate_up)))
    seen = []  # a forward hook on down_proj (calibration: quant/smooth.py) sees its real input
    hook = mlp.down_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    assert torch.equal(mlp(x), y) and len(seen) == 1 and torch.equal(seen[0], fused.silu_and_mul(gate_up))
    hook.remove()
    act = _GeluAndMul()  # another gated activation: the plain path, no fused entry
    setattr(mlp, "act_fn" if kind == "llama" else "act", act)
    assert torch.equal(mlp(x), mlp.down_proj(act(gate_up))) and len(calls) == 1


# ---- GPU: the methods' fused branch at qwen-7b's down projection (I = 18944, hidden 3584) ----------


@pytest.mark.gpu
@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("m", [1, 256, 8192])
def test_gpu_methods_fuse_bit_exactly(monkeypatch, name, m):
    """The fused SiLU-and-mul quantisation (one launch) gives the unfused bits; fp8's decode rows (at most
    DECODE_GEMV_ROWS: quant/fp8.py) take the decode GEMV on unquantised rows instead, launching none."""
    import deepserve.kernels.silu_and_mul_quant as kernels
    from deepserve.quant.fp8 import DECODE_GEMV_ROWS

    layer = _down(name, inter=18944, out=3584, dtype=torch.bfloat16, dev="cuda")
    gate_up = torch.randn(m, 2 * 18944, device="cuda").bfloat16()
    want = layer(SILU.silu_and_mul(gate_up))
    launched = []
    for fn in ("silu_and_mul_int8_quant", "silu_and_mul_fp8_quant"):
        real = getattr(kernels, fn)
        monkeypatch.setattr(kernels, fn, lambda x, real=real: launched.append(x) or real(x))
    got = layer.forward_silu_and_mul(gate_up)
    decode_gemv = name.startswith("fp8") and m <= DECODE_GEMV_ROWS
    assert len(launched) == (0 if decode_gemv else 1) and torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("name", FUSED)
def test_gpu_fused_branch_in_a_cuda_graph(name):
    layer = _down(name, inter=18944, out=3584, dtype=torch.bfloat16, dev="cuda")
    gate_up = torch.randn(256, 2 * 18944, device="cuda").bfloat16()
    layer.forward_silu_and_mul(gate_up)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer.forward_silu_and_mul(gate_up)
    gate_up.copy_(torch.randn_like(gate_up))
    graph.replay()
    torch.cuda.synchronize()
    want = layer(SILU.silu_and_mul(gate_up))
    if name == "int8":  # Triton launches only: the same bits
        assert torch.equal(out, want)
    else:  # cuBLASLt may pick another algorithm under capture: one bf16 ulp (tests/unit/test_quant_gpu.py)
        torch.testing.assert_close(out, want, rtol=2.0 ** -7, atol=1e-6 * want.abs().max().item())
