"""The gate_up side of a SiLU-gated MLP under int8 W8A8: `Int8W8A8Method.takes_gated_layout` (which gate_ups
keep their weight in kernels/int8_gemm_silu.py's gated layout), `apply` of such a layer (its output back in
[gate | up] order), `apply_gated` (the down projection's input handed over quantised) and
`linear.silu_and_mul_mlp`, which the dense MLPs call. On CPU the layout is put in place by hand
(`process_weights_after_loading` does it on CUDA only) and the CUDA function runs through the Triton
interpreter; the GPU test at the end runs a qwen-7b MLP end to end.
"""

from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch

from deepserve.layers import fused
from deepserve.layers.linear import MergedColumnParallelLinear
from deepserve.layers.linear_method import CpuPackedLinearMethod, DenseLinearMethod, LinearMethod, PerTokenQuant
from deepserve.models.llama import LlamaMLP
from deepserve.quant import get_quant_method
from deepserve.quant.int8 import Int8W8A8Method, quantize_per_channel_ref, quantize_per_token_ref
from tests.kernels.interpret import device
from tests.unit.test_linear_silu_and_mul import DEFAULT, FUSED, SILU, _config, _down, _mlps


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def test_which_methods_gate():
    """int8 W8A8 (its GEMM's epilogue) and the decode-GEMV methods (float, W8A16, fp8: the GEMV's epilogue,
    kernels/gemv.py `gated`) override apply_gated; the others keep the default, which declines (None)."""
    methods = {name: get_quant_method(name) for name in [*FUSED, *DEFAULT]}
    methods.update(dense=DenseLinearMethod(), packed=CpuPackedLinearMethod())
    gating = ("int8", "int8-weight-only", "int8-weight-only-asym", "dense", "fp8", "fp8-per-tensor", "fp8-exact-accum")
    for name, method in methods.items():
        overrides = type(method).apply_gated is not LinearMethod.apply_gated
        assert overrides == (name in gating), name
        if not overrides:
            assert method.apply_gated(None, torch.randn(2, 8), None) is None


@pytest.mark.parametrize("name", ["dense", "int8-weight-only", "fp8"])
def test_decode_gemv_methods_decline_off_cuda(name):
    """Off CUDA (and for a PerTokenQuant input) the GEMV methods decline: silu_and_mul_mlp runs unfused."""
    layer = MergedColumnParallelLinear(32, [16, 16]).bfloat16()
    layer.process_weights_after_loading(None if name == "dense" else name)
    if name == "dense":
        layer.method = DenseLinearMethod()  # CPU bf16: F.linear (the packed method is float32 only)
    x = torch.randn(1, 32).bfloat16()
    assert layer.method.apply_gated(layer, x, None) is None
    assert layer.method.apply_gated(layer, PerTokenQuant(x.to(torch.int8), torch.ones(1), x.dtype), None) is None


def _gate_up(name, hidden=64, inter=96, bias=False, dev="cpu", dtype=torch.float32) -> MergedColumnParallelLinear:
    with torch.device(dev):
        layer = MergedColumnParallelLinear(hidden, [inter, inter], bias=bias)
    layer.silu_gate_up = True
    layer.weight.normal_(std=hidden ** -0.5)
    if bias:
        layer.bias.normal_()
    layer.to(dtype).process_weights_after_loading(name)
    return layer


def _gated_layer(plain: MergedColumnParallelLinear | None = None) -> MergedColumnParallelLinear:
    """A copy of an int8 gate_up (default: a new one) put in the gated layout by hand
    (process_weights_after_loading does it on CUDA only)."""
    from deepserve.quant.int8 import put_in_gated_layout

    layer = copy.deepcopy(plain if plain is not None else _gate_up("int8"))
    put_in_gated_layout(layer)
    return layer


def test_gated_layout_only_for_plain_int8_silu_gate_ups_on_cuda(monkeypatch):
    """takes_gated_layout: the MLP's flag, a CUDA weight, no bias, the layer's own method, not yet in it, and
    at least one GATED_BLOCK of h columns per SM."""
    from deepserve.kernels import int8_gemm

    int8 = Int8W8A8Method()
    monkeypatch.setattr(int8_gemm, "num_sms", lambda device: 132)
    tma = {0: True, 1: False}  # device index -> an sm_90 / sm_100 GPU
    monkeypatch.setattr(int8_gemm, "_tma_device", lambda index: tma[index])

    def weight(inter, cuda=True, index=0):
        return SimpleNamespace(is_cuda=cuda, shape=(2 * inter, 64), device=SimpleNamespace(index=index))

    layer = SimpleNamespace(silu_gate_up=True, output_sizes=(8448, 8448), weight=weight(8448), bias=None,
                            method=int8)  # 132 blocks of 64
    assert int8.takes_gated_layout(layer)
    assert int8.takes_gated_layout(SimpleNamespace(**{**vars(layer), "weight": weight(32768)}))  # 512 blocks
    for change in (dict(silu_gate_up=False), dict(weight=weight(8448, cuda=False)), dict(bias=torch.ones(2)),
                   dict(method=Int8W8A8Method()), dict(gated_inter=96), dict(weight=weight(8447)),
                   dict(weight=weight(32769)), dict(weight=weight(8448, index=1)),
                   dict(output_sizes=(8448, 8449)), dict(output_sizes=(8448,))):
        assert not int8.takes_gated_layout(SimpleNamespace(**{**vars(layer), **change})), change
    assert _gate_up("int8").gated_inter is None  # CPU: kept as loaded
    for mlp in _mlps().values():  # the MLPs flag a SiLU gate_up (SiLU is the only gated activation served)
        assert mlp.gate_up_proj.silu_gate_up and not mlp.down_proj.silu_gate_up


@pytest.mark.parametrize("quantized", [False, True])
def test_gated_layout_layer_applies_in_gate_up_order(quantized):
    """The path apply_gated does not take (hooks, CPU): apply of a gated-layout layer is the plain layer's,
    [gate | up] columns, from a tensor or a PerTokenQuant."""
    plain = _gate_up("int8", inter=70)
    gated = _gated_layer(plain)  # I = 70: padded to 128
    assert gated.weight.shape == (256, 64) and gated.gated_inter == 70
    x = torch.randn(5, 64)
    if quantized:
        x = PerTokenQuant(*quantize_per_token_ref(x), torch.float32)
    assert torch.equal(gated(x), plain(x))


def test_int8_apply_gated_declines_what_it_cannot_fuse():
    """Without the layout (CPU processing, a bias); CPU input; a consumer whose method is not plain int8 W8A8
    (the Hadamard method rotates its input first, fp8 / dense take tensors)."""
    int8 = Int8W8A8Method()
    cuda_like = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, shape=(3, 64))
    down = _down("int8")
    assert int8.apply_gated(_gate_up("int8"), cuda_like, down) is None  # not in the layout
    assert int8.apply_gated(_gate_up("int8", bias=True), cuda_like, down) is None
    gated = _gated_layer()
    assert int8.apply_gated(gated, torch.randn(3, 64), down) is None  # CPU rows
    for other in ("int8-hadamard", "fp8", None):
        assert int8.apply_gated(gated, cuda_like, _down(other)) is None, other


@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_cuda_gated_path_is_the_unfused_one(m, dtype):
    """int8_cuda.w8a8_gate_up_silu_quant on the gated layout: the quantised input the down projection would
    have made of silu_and_mul(gate_up's output), bit for bit (on CPU through the interpreter)."""
    from deepserve.kernels.int8_gemm_silu import to_gated_layout
    from deepserve.kernels.int8_quant import int8_quant
    from deepserve.quant.int8_cuda import w8a8_gate_up_silu_quant, w8a8_linear

    dev = device()
    x = (2 * torch.randn(m, 64, device=dev)).to(dtype)
    w_q, w_s, _ = quantize_per_channel_ref(torch.randn(2 * 96, 64, device=dev) / 8)
    x_q, x_s, _ = int8_quant(x)
    got = w8a8_gate_up_silu_quant(x_q, x_s, to_gated_layout(w_q), to_gated_layout(w_s), 96, dtype)
    want = int8_quant(SILU.silu_and_mul(w8a8_linear(x, w_q.contiguous(), w_s, None)))
    assert torch.equal(got.q, want.q) and torch.equal(got.scale, want.scale)


@pytest.mark.parametrize("kind", ["llama", "gated"])
def test_mlp_hands_down_what_apply_gated_gives(monkeypatch, kind):
    """Where gate_up's method gates, the MLP is down_proj(apply_gated(...)) and gate_up never runs alone;
    a forward hook on either layer (calibration) takes the unfused path."""
    mlp = _mlps()[kind]
    for module in mlp.modules():
        if hasattr(module, "quantizable"):
            module.process_weights_after_loading("int8")
    x = torch.randn(5, 64)
    gate_up = mlp.gate_up_proj(x)
    handed = PerTokenQuant(*quantize_per_token_ref(fused.silu_and_mul(gate_up)), torch.float32)
    calls = []
    monkeypatch.setattr(Int8W8A8Method, "apply_gated",
                        lambda self, layer, x_, consumer: calls.append((layer, x_, consumer)) or handed)
    assert torch.equal(mlp(x), mlp.down_proj(handed))
    assert [(c[0], c[2]) for c in calls] == [(mlp.gate_up_proj, mlp.down_proj)] and calls[0][1] is x
    unfused = mlp.down_proj(fused.silu_and_mul(gate_up))
    for layer in (mlp.gate_up_proj, mlp.down_proj):
        hook = layer.register_forward_hook(lambda *_: None)
        assert torch.equal(mlp(x), unfused) and len(calls) == 1
        hook.remove()


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 256, 8192])
@pytest.mark.parametrize("quantized_input", [False, True])
def test_gpu_mlp_gated_path_is_the_unfused_one(monkeypatch, m, quantized_input):
    """A qwen-7b MLP (hidden 3584, I = 18944) under int8 on CUDA: the gated path (the gate_up GEMM with
    SiLU-and-mul in its epilogue, Triton's or the warp-specialised one: one of them must be what ran) gives
    the bits of the same MLP never put in the gated layout (and of the gated layer's own fallback), from a
    tensor and from the norm-fused PerTokenQuant input."""
    import deepserve.kernels.int8_gemm_silu as gated
    import deepserve.kernels.int8_gemm_silu_ws as gated_ws
    from deepserve.kernels.int8_quant import int8_quant

    with torch.device("cuda"):
        mlp = LlamaMLP(dataclasses.replace(_config(), hidden_size=3584, intermediate_size=18944), bias=False)
    for p in mlp.parameters():
        p.normal_(std=p.shape[-1] ** -0.5)
    mlp.bfloat16()
    plain = copy.deepcopy(mlp)
    plain.gate_up_proj.silu_gate_up = False
    for net in (mlp, plain):
        for module in net.modules():
            if hasattr(module, "quantizable"):
                module.process_weights_after_loading("int8")
    assert mlp.gate_up_proj.gated_inter == 18944 and plain.gate_up_proj.gated_inter is None
    x = torch.randn(m, 3584, device="cuda").bfloat16()
    if quantized_input:
        x = PerTokenQuant(*int8_quant(x)[:2], torch.bfloat16)
    launched = []  # either gated kernel: the Triton one, or on sm_90 the warp-specialised one at its table's M
    for module, name in ((gated, "int8_gemm_silu"), (gated_ws, "int8_gemm_silu_ws")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, **k: launched.append(a) or real(*a, **k))
    got = mlp(x)
    assert len(launched) == 1
    want = plain(x)
    assert len(launched) == 1 and torch.equal(got, want)
    if not quantized_input:  # leading dims kept: [1, T, H] in, [1, T, H] out, through the gated path
        assert torch.equal(mlp(x[None]), want[None]) and len(launched) == 2
    monkeypatch.setattr(Int8W8A8Method, "apply_gated", lambda *a: None)
    assert torch.equal(mlp(x), want)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["none", "int8-weight-only"])
@pytest.mark.parametrize("m", [1, 2, 3])
def test_gpu_decode_gemv_gated_mlp(monkeypatch, name, m):
    """A qwen-7b MLP in bf16 / W8A16 on CUDA: at 1-2 rows the gate_up GEMV runs SiLU-and-mul in its epilogue
    (kernels/gemv.py `gated`: it must be what ran) with the bits of the unfused path (forced by a forward
    hook); at 3 rows (cuBLAS / the W8A16 GEMM) nothing is gated."""
    import deepserve.kernels.gemv as gemv_module

    with torch.device("cuda"):
        mlp = LlamaMLP(dataclasses.replace(_config(), hidden_size=3584, intermediate_size=18944), bias=False)
    for p in mlp.parameters():
        p.normal_(std=p.shape[-1] ** -0.5)
    mlp.bfloat16()
    for module in mlp.modules():
        if hasattr(module, "quantizable"):
            module.process_weights_after_loading(None if name == "none" else name)
    gated_calls = []
    real = gemv_module.gemv
    monkeypatch.setattr(gemv_module, "gemv", lambda *a, **k: gated_calls.append(k.get("gated")) or real(*a, **k))
    x = torch.randn(m, 3584, device="cuda").bfloat16()
    got = mlp(x)
    assert (True in gated_calls) == (m <= 2)
    hook = mlp.down_proj.register_forward_hook(lambda *_: None)
    want = mlp(x)
    hook.remove()
    assert torch.equal(got, want)
