"""DenseLinearMethod's choice between the Triton GEMV (kernels/gemv.py) and F.linear, on CPU.

`gemv_applies` is the shape/dtype/layout rule, `use_gemv` adds "CUDA tensors only"; the kernel path
itself is tested in tests/kernels/test_gemv.py (interpreter and GPU).
"""

import torch

from deepserve.layers import linear_method
from deepserve.layers.linear_method import DenseLinearMethod, gemv_applies, use_gemv


def test_gemv_applies_to_decode_rows():
    w, x = torch.randn(64, 32).bfloat16(), torch.randn(2, 32).bfloat16()
    assert linear_method.GEMV_MAX_M == 2  # measured: the gemv loses to cuBLAS at 4 rows on an H200
    assert gemv_applies(x, w) and gemv_applies(x[:1], w)
    assert gemv_applies(x.view(1, 2, 32), w)  # leading dims flattened: 2 rows
    assert gemv_applies(torch.randn(2, 40)[:, :32].bfloat16(), w)  # strided rows
    assert gemv_applies(x.half(), w.half())
    assert gemv_applies(torch.randn(4, 32).bfloat16(), w, max_m=4)


def test_gemv_does_not_apply():
    w, x = torch.randn(64, 32).bfloat16(), torch.randn(2, 32).bfloat16()
    assert not gemv_applies(torch.randn(3, 32).bfloat16(), w)  # more rows than GEMV_MAX_M
    assert not gemv_applies(torch.randn(2, 2, 32).bfloat16(), w)  # 4 rows once flattened
    assert not gemv_applies(x[:0], w)  # no rows
    assert not gemv_applies(x, w, max_m=0) and not gemv_applies(torch.randn(3, 32).bfloat16(), w, max_m=2)
    assert not gemv_applies(x.float(), w.float())  # float32 stays with cuBLAS / oneDNN
    assert not gemv_applies(x.half(), w)  # dtypes differ
    assert not gemv_applies(x[:, :30], w[:, :30].contiguous())  # K % 8 != 0
    assert not gemv_applies(x, w.t().contiguous().t())  # weight not contiguous
    assert not gemv_applies(torch.randn(32, 4).bfloat16().t(), w)  # x not unit-stride in K
    assert not gemv_applies(x, w[:0])  # empty weight (a shared expert folded into the MoE)
    assert not gemv_applies(x, w.view(2, 32, 32))  # not 2-D
    assert not gemv_applies(x[:, :16], w)  # K mismatch: F.linear raises


def test_never_on_cpu_and_switch_off(monkeypatch):
    w, x = torch.randn(64, 32).bfloat16(), torch.randn(1, 32).bfloat16()
    assert gemv_applies(x, w) and not use_gemv(x, w)
    monkeypatch.setattr(linear_method, "GEMV_MAX_M", 0)
    assert not gemv_applies(x, w)


def test_dense_method_on_cpu_is_f_linear():
    layer = torch.nn.Linear(64, 24).bfloat16()
    x = torch.randn(2, 64).bfloat16()
    got = DenseLinearMethod().apply(layer, x, layer.bias)
    assert torch.equal(got, torch.nn.functional.linear(x, layer.weight, layer.bias))
