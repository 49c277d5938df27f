"""Per-token INT8 activation quantisation (plain and fused with residual add + RMSNorm) against the
references. The plain kernel is bit-exact (IEEE divisions, ties-to-even rounding); the fused one
may differ from the reference by one step of q where the kernel's rsqrt (not correctly rounded on
either backend) moves a normalised value across a rounding boundary: see `_assert_fused`.
CPU (interpreter): float32/float16 for the fused kernel (the interpreter truncates float32 -> bf16
where a GPU rounds, which the rms_norm test also notes); bfloat16 inputs are fine for the plain one.
"""

import pytest
import torch

from tests.kernels.interpret import INTERPRET, device, load_kernel_module

K = load_kernel_module("int8_quant")
ULP = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def _assert_exact(x):
    got, want = K.int8_quant(x), K.int8_quant_ref(x)
    assert got.q.dtype == torch.int8 and got.scale.dtype == torch.float32 and got.residual is None
    assert torch.equal(got.q, want.q)
    assert torch.equal(got.scale, want.scale)
    # the correctly rounded quotient amax / 127 on every device (float64 then float32 is exact for
    # a division); PyTorch's CUDA `tensor / 127.0` would multiply by float32(1 / 127) instead, and
    # the kernel's q then differed from such a reference in a few elements (GPU run, M >= 256)
    amax = x.float().abs().amax(dim=1).clamp(min=1e-8)
    assert torch.equal(want.scale, (amax.double() / 127.0).float())


@pytest.mark.parametrize("tokens,hidden", [(1, 64), (5, 100), (33, 96), (3, 1537)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference_exactly(tokens, hidden, dtype):
    _assert_exact((3 * torch.randn(tokens, hidden, device=device())).to(dtype))


def test_ties_round_to_even_and_zero_rows():
    """Row max 127 -> scale exactly 1, so x / scale = x: halves must go to the even neighbour."""
    ties = torch.arange(-127, 127, dtype=torch.float32) + 0.5  # -126.5 .. 126.5
    near = torch.tensor([0.49999997, -0.49999997, 2.5000002, 126.49999, 127.0])
    x = torch.cat([ties, near]).to(device())[None, :].repeat(2, 1)
    x[1] = 0.0  # zero row: scale = 1e-8 / 127, q = 0
    _assert_exact(x)
    q = K.int8_quant(x).q[0, : ties.numel()].cpu()
    assert torch.equal(q, torch.round(ties).to(torch.int8))


def test_strided_rows():
    base = torch.randn(4, 96 + 32, device=device())
    _assert_exact(base[:, :96])


def _assert_fused(x, res, w, eps=1e-6):
    got, want = K.rms_norm_int8_quant(x, res, w, eps), K.rms_norm_int8_quant_ref(x, res, w, eps)
    if res is None:
        assert got.residual is None
    else:
        assert torch.equal(got.residual, want.residual)  # same rounded add as the eager path
    # rsqrt may differ by an ulp of float32 between kernel and torch; after rounding the normalised
    # row to its dtype that is at most one ulp of that dtype per element, hence at most one step of
    # q (|v| / scale <= 127 and an ulp is < 127 * 2^-7 < 1 step) and a relative ulp on the scale.
    ulp = ULP[torch.promote_types(x.dtype, w.dtype)]
    assert (got.q.int() - want.q.int()).abs().max() <= 1
    torch.testing.assert_close(got.scale, want.scale, rtol=2 * ulp, atol=0)
    same_scale = got.scale == want.scale  # rows whose max element did not move
    mismatched = (got.q != want.q)[same_scale].float().mean().item() if same_scale.any() else 0.0
    assert mismatched < 0.01, f"{mismatched:.2%} of q differ in rows of equal scale: more than boundary cases"


FUSED_DTYPES = [torch.float32, torch.float16] + ([] if INTERPRET else [torch.bfloat16])


@pytest.mark.parametrize("tokens,hidden", [(1, 64), (5, 100), (33, 96)])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
def test_fused_rms_norm_matches_reference(tokens, hidden, residual, dtype):
    dev = device()
    x = torch.randn(tokens, hidden, device=dev).to(dtype)
    res = torch.randn(tokens, hidden, device=dev).to(dtype) if residual else None
    _assert_fused(x, res, (1 + 0.1 * torch.randn(hidden, device=dev)).to(dtype))


def test_fused_float32_weight_promotes_and_inputs_untouched():
    dev = device()
    x, res = torch.randn(3, 64, device=dev).half(), torch.randn(3, 64, device=dev).half()
    before = (x.clone(), res.clone())
    _assert_fused(x, res, torch.rand(64, device=dev))  # f16 x, f32 weight: normalised row in f32
    assert torch.equal(x, before[0]) and torch.equal(res, before[1])


def test_empty_and_bad_inputs():
    dev = device()
    out = K.int8_quant(torch.randn(0, 64, device=dev))
    assert out.q.shape == (0, 64) and out.scale.shape == (0,)
    with pytest.raises(ValueError):
        K.int8_quant(torch.randn(4, 64, device=dev).t())  # hidden not unit-stride
    with pytest.raises(ValueError):
        K.int8_quant(torch.randint(0, 5, (2, 8), device=dev))  # not float
    with pytest.raises(ValueError):
        K.rms_norm_int8_quant(torch.randn(2, 64, device=dev), None, torch.ones(63, device=dev), 1e-6)
    with pytest.raises(ValueError):
        K.rms_norm_int8_quant(torch.randn(2, 64, device=dev), torch.randn(2, 64, device=dev).double(),
                              torch.ones(64, device=dev), 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 16, 256, 4096])
@pytest.mark.parametrize("hidden", [3584, 18944])
def test_gpu_real_shapes(tokens, hidden):
    x = (2 * torch.randn(tokens, hidden, device="cuda")).bfloat16()
    _assert_exact(x)
    if hidden == 3584:
        _assert_fused(x, torch.randn_like(x), (1 + 0.1 * torch.randn(hidden, device="cuda")).bfloat16())
