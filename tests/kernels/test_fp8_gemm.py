"""FP8 W8A8 GEMM (Triton, `kernels/fp8_gemm.py`: the int8 GEMM kernel with e4m3 operands and a
float32 accumulator) against its reference.

Each e4m3 x e4m3 product is exact in float32 (4 + 4 significant bits); the kernel and the reference
differ only in the order of the float32 sum over K. Bound per output: K * 2^-24 * sum_k |x_k w_k|
(before the scales), plus one ulp of the output (the two sums may round to neighbouring values: 2^-7
relative for bf16, 2^-23 for float32)
and, with split-K, one float32 rounding per split partial.
"""

import pytest
import torch

from deepserve.kernels.int8_gemm import GemmConfig
from tests.kernels.interpret import device, load_kernel_module

G = load_kernel_module("fp8_gemm")
FP8 = torch.float8_e4m3fn
TINY = [GemmConfig(16, 32, 32, group_m=1, num_stages=1), GemmConfig(16, 16, 32, split_k=3, num_stages=1),
        GemmConfig(32, 64, 64, group_m=2, num_stages=1)]


def _operands(m, n, k, dev, bias=True):
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    x_q = (torch.randn(m, k, generator=gen) * 40).clamp(-448, 448).to(FP8).to(dev)
    w_q = (torch.randn(n, k, generator=gen) * 40).clamp(-448, 448).to(FP8).to(dev)
    x_s, w_s = torch.rand(m, generator=gen) / 100 + 1e-4, torch.rand(n, generator=gen) / 100 + 1e-4
    return x_q, x_s.to(dev), w_q, w_s.to(dev), (torch.randn(n, generator=gen).to(dev) if bias else None)


def _bound(x_q, x_s, w_q, w_s, want, splits):
    """The docstring's bound, elementwise [M, N]."""
    k = x_q.shape[1]
    mag = (x_q.double().abs() @ w_q.double().abs().t()) * x_s.double()[:, None] * w_s.double()[None, :]
    out_ulp = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 2.0 ** -23}[want.dtype]
    return (k + 2 * splits) * 2.0 ** -24 * mag + out_ulp * want.double().abs() + 1e-30


@pytest.mark.parametrize("m,n,k", [(1, 40, 96), (5, 33, 70), (33, 70, 200)])
@pytest.mark.parametrize("cfg", TINY, ids=["plain", "split3", "grouped"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_fp8_gemm_matches_reference(m, n, k, cfg, out_dtype):
    ops = _operands(m, n, k, device())
    got, want = G.fp8_gemm(*ops, out_dtype, cfg), G.fp8_gemm_ref(*ops, out_dtype)
    assert got.dtype == out_dtype and got.shape == (m, n)
    bound = _bound(ops[0].cpu(), ops[1].cpu(), ops[2].cpu(), ops[3].cpu(), want.cpu(), cfg.split_k)
    err = (got.cpu().double() - want.cpu().double()).abs()
    assert bool((err <= bound).all()), f"max excess {float((err - bound).max())}"


def test_fp8_gemm_rejects_int8_weights():
    x_q, x_s, w_q, w_s, _ = _operands(2, 16, 32, device(), bias=False)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        G.fp8_gemm(x_q, x_s, w_q.view(torch.int8), w_s)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 256, 4096])
@pytest.mark.parametrize("k,n", [(3584, 4608), (18944, 3584)])
def test_gpu_real_shapes(m, k, n):
    ops = _operands(m, n, k, "cuda")
    got, want = G.fp8_gemm(*ops, torch.bfloat16), G.fp8_gemm_ref(*ops, torch.bfloat16)
    bound = _bound(*(t.cpu() for t in ops[:4]), want.cpu(), 8)
    assert bool(((got.cpu().double() - want.cpu().double()).abs() <= bound).all())
