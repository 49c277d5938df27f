"""W8A16 GEMM (int8 weights dequantised in the kernel, symmetric or with zero points), the weight
dequantisation kernel of the large-M path, and the CUDA dispatch `int8_cuda.w8a16_linear`.

Tolerances: the kernel's products x * (q - zp) are exact in float32 (|q - zp| <= 255 is exact in
every activation dtype) and only the float32 sums and the final rounding differ from the float64
reference. Elementwise: |y - ref| <= 1 ulp of the output dtype * |ref| + 2^-14 * B, with
B = |x| @ |w|^T the sum of the magnitudes of the products. Float32 sums of K terms in any order
(blocked, on tensor cores or not) err by about sqrt(K) * 2^-24 * B in practice (independent
rounding errors), <= 2^-17 * B for K <= 18944: the bound leaves a factor 8. An indexing or scaling
bug gives errors of the order of |y| ~ B / sqrt(K), far above it. On CPU the interpreter truncates
float32 -> bf16 where a GPU rounds, so bf16 outputs are checked on GPU only.
"""

import pytest
import torch

from deepserve.kernels.int8_gemm import GemmConfig
from deepserve.kernels.w8a16_gemm import CONFIGS, SHAPE_CONFIGS, X_LEFT_MAX_M, w8a16_gemm_config, weight_left
from deepserve.quant.int8 import dequantize_per_channel_ref, quantize_per_channel_ref
from tests.kernels.interpret import INTERPRET, device, load_kernel_module

G = load_kernel_module("w8a16_gemm")
D = load_kernel_module("w8a16_dequant")
TINY = [GemmConfig(16, 32, 32, group_m=1, num_stages=1), GemmConfig(16, 16, 32, split_k=3, num_stages=1),
        GemmConfig(32, 64, 64, group_m=2, num_stages=1)]
ULP = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def _weights(n, k, symmetric, dev):
    w = torch.randn(n, k, device=dev) * (torch.rand(n, 1, device=dev) + 0.1)
    w[0] = w[0].abs()  # an all-positive row: the zero point sits at the end of the range
    q, scale, zp = quantize_per_channel_ref(w, symmetric)
    return q.contiguous(), scale, (None if zp is None else zp.float())


def _assert_close(got, ref, x, w_deq):
    bound = x.float().abs() @ w_deq.float().abs().t()  # [M, N]
    err = (got.double() - ref.double()).abs()
    allowed = ULP[got.dtype] * ref.double().abs() + 2.0 ** -14 * bound.double() + 1e-30
    assert got.dtype == x.dtype and (err <= allowed).all(), f"max excess {(err / allowed).max().item():.3g}"


@pytest.mark.parametrize("m,n,k", [(1, 40, 96), (5, 33, 70), (33, 70, 200)])
@pytest.mark.parametrize("cfg", TINY, ids=["plain", "split3", "grouped"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("w_left", [False, True], ids=["x-left", "w-left"])
def test_matches_reference(m, n, k, cfg, symmetric, dtype, w_left):
    dev = device()
    q, scale, zp = _weights(n, k, symmetric, dev)
    x, bias = torch.randn(m, k, device=dev).to(dtype), torch.randn(n, device=dev).to(dtype)
    got = G.w8a16_gemm(x, q, scale, zp, bias, cfg, w_left=w_left)
    _assert_close(got, G.w8a16_gemm_ref(x, q, scale, zp, bias), x, dequantize_per_channel_ref(q, scale, zp))


@pytest.mark.parametrize("m", [16, 17])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_default_kernel_by_rows(m, dtype, monkeypatch):
    """16-bit x: M <= X_LEFT_MAX_M takes the x-left kernel, larger M the w-left one; float32 x always x-left on
    FLOAT32_CONFIG (the tables' tiles would not fit the shared memory of every card in float32). All within the
    bound."""
    launched = []
    for name in ("_x_left_kernel", "_w_left_kernel"):
        kernel = getattr(G, name)
        monkeypatch.setattr(G, name, _Spy(kernel, name, launched))
    configs = []
    real_config = G.config_for
    monkeypatch.setattr(G, "config_for", lambda table, *a: configs.append(table) or real_config(table, *a))
    dev = device()
    q, scale, zp = _weights(24, 64, True, dev)
    x = torch.randn(m, 64, device=dev).to(dtype)
    got = G.w8a16_gemm(x, q, scale, zp)
    w_left = m > G.X_LEFT_MAX_M and dtype != torch.float32
    assert launched == ["_w_left_kernel" if w_left else "_x_left_kernel"]
    assert (configs == [{1 << 62: G.FLOAT32_CONFIG}]) == (dtype == torch.float32)
    _assert_close(got, G.w8a16_gemm_ref(x, q, scale, zp), x, dequantize_per_channel_ref(q, scale, zp))


class _Spy:
    """Records `kernel[grid](...)` launches by name, then launches."""

    def __init__(self, kernel, name, launched):
        self.kernel, self.name, self.launched = kernel, name, launched

    def __getitem__(self, grid):
        self.launched.append(self.name)
        return self.kernel[grid]


def test_strided_rows_default_config_no_bias():
    dev = device()
    q, scale, zp = _weights(24, 64, False, dev)
    x = torch.randn(3, 100, device=dev)[:, :64]
    got = G.w8a16_gemm(x, q, scale, zp)
    _assert_close(got, G.w8a16_gemm_ref(x, q, scale, zp), x, dequantize_per_channel_ref(q, scale, zp))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([] if INTERPRET else [torch.bfloat16]))
def test_dequant_matches_reference_exactly(symmetric, dtype):
    q, scale, zp = _weights(33, 300, symmetric, device())
    assert torch.equal(D.w8a16_dequant(q, scale, zp, dtype), D.w8a16_dequant_ref(q, scale, zp, dtype))


@pytest.mark.parametrize("backend", ["triton", "dequant"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("m", [1, 5, 33])
def test_w8a16_linear_backends(backend, symmetric, m):
    from deepserve.quant.int8_cuda import w8a16_linear

    dev = device()
    w, x, bias = torch.randn(64, 96, device=dev), torch.randn(m, 96, device=dev), torch.randn(64, device=dev)
    q, scale, zp = quantize_per_channel_ref(w, symmetric)
    zp = None if zp is None else zp.float()
    got = w8a16_linear(x, q.contiguous(), scale, zp, bias, backend=backend)
    w_deq = dequantize_per_channel_ref(q, scale, zp)
    _assert_close(got, G.w8a16_gemm_ref(x, q, scale, zp, bias), x, w_deq)
    assert (got - torch.nn.functional.linear(x, w, bias)).norm() / got.norm() < 1e-2


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("m", [1, 2])
def test_w8a16_linear_gemv_backend(symmetric, m, monkeypatch):
    """The decode rows' "gemv" backend (kernels/gemv with int8 weights) for half x and symmetric weights;
    zero points fall back to the Triton GEMM. Both within the reference's bound."""
    from deepserve.kernels import gemv as gemv_module
    from deepserve.quant.int8_cuda import w8a16_linear

    dev = device()
    w, x, bias = torch.randn(64, 96, device=dev), torch.randn(m, 96, device=dev).half(), torch.randn(64, device=dev)
    q, scale, zp = quantize_per_channel_ref(w, symmetric)
    zp = None if zp is None else zp.float()
    calls = []
    real = gemv_module.gemv
    monkeypatch.setattr(gemv_module, "gemv", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = w8a16_linear(x, q.contiguous(), scale, zp, bias, backend="gemv")
    assert len(calls) == (1 if symmetric else 0)
    _assert_close(got, G.w8a16_gemm_ref(x, q, scale, zp, bias), x, dequantize_per_channel_ref(q, scale, zp))


def test_bad_inputs():
    dev = device()
    q, scale, zp = _weights(16, 32, False, dev)
    x = torch.randn(2, 32, device=dev)
    for args in [(x.double(), q, scale), (x, q.float(), scale), (x, q, scale[:8]), (x, q, scale, zp[:3]),
                 (x, q, scale, zp.double()), (x[:, :16], q, scale)]:
        with pytest.raises(ValueError):
            G.w8a16_gemm(*args)
    with pytest.raises(ValueError):
        D.w8a16_dequant(q.t(), scale, None, torch.float32)
    assert G.w8a16_gemm(x[:0], q, scale).shape == (0, 16)


def test_config_table():
    assert w8a16_gemm_config(1, 3584, 3584, 132).block_m == CONFIGS[16].block_m
    assert w8a16_gemm_config(8192, 3584, 3584, 132) == CONFIGS[1 << 62]
    assert w8a16_gemm_config(100, 3000, 3584, 132).block_m == CONFIGS[128].block_m  # no shape entry
    for (n, k), table in SHAPE_CONFIGS.items():  # a tuned shape's entry, its split_k as tuned on 132 SMs
        for max_m, cfg in table.items():
            assert w8a16_gemm_config(max_m, n, k, 132) == cfg
    assert not weight_left(X_LEFT_MAX_M) and weight_left(X_LEFT_MAX_M + 1)
    assert not weight_left(4096, torch.float32)


# ---- GPU, qwen-7b linear shapes -------------------------------------------------------------------

SHAPES = [(3584, 4608), (3584, 37888), (3584, 3584), (18944, 3584)]  # (K, N): qkv, gate_up, o, down


@pytest.mark.gpu
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("m", [1, 16, 17, 128, 256, 4096])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("backend", ["gemv", "triton", "dequant"])
def test_gpu_real_shapes(k, n, m, symmetric, backend):
    from deepserve.quant.int8_cuda import w8a16_linear

    q, scale, zp = _weights(n, k, symmetric, "cuda")
    x, bias = torch.randn(m, k, device="cuda").bfloat16(), torch.randn(n, device="cuda").bfloat16()
    got = w8a16_linear(x, q, scale, zp, bias, backend=backend)
    if backend == "dequant":  # cuBLAS multiplies the weight rounded to bf16: the reference does too
        w_deq = D.w8a16_dequant_ref(q, scale, zp, torch.bfloat16)
        ref = (x.double() @ w_deq.double().t() + bias.double()).bfloat16()
    else:
        w_deq = dequantize_per_channel_ref(q, scale, zp)
        ref = G.w8a16_gemm_ref(x, q, scale, zp, bias)
    _assert_close(got, ref, x, w_deq)
