"""Per-token INT8 activation quantisation (plain and fused with residual add + RMSNorm) against the
references. The plain kernel is bit-exact (IEEE divisions, ties-to-even rounding); the fused one
may differ from the reference by one step of q where the kernel's rsqrt (not correctly rounded on
either backend) moves a normalised value across a rounding boundary: see `_assert_fused`.
CPU (interpreter): float32/float16 for the fused kernel (the interpreter truncates float32 -> bf16
where a GPU rounds, which the rms_norm test also notes); bfloat16 inputs are fine for the plain one.
Rows wider than 8192 columns go through the wide-row kernel (a loop over 4096-column chunks); the
tests force it at small shapes with `whole_row_max=0, chunk=64` (WIDE) and check, by recording the
launches, that it is the kernel that ran.
"""

import pytest
import torch
import triton
import triton.language as tl

from tests.kernels.interpret import INTERPRET, device, load_kernel_module
from tests.kernels.launches import assert_one_launch, record_launches
from tests.kernels.quant_cases import near_tie_rows

K = load_kernel_module("int8_quant")
ULP = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
WIDE = dict(whole_row_max=0, chunk=64)  # every row through the wide-row kernel, in 64-column chunks
KERNELS = ("_int8_quant_kernel", "_int8_quant_wide_kernel")


def _assert_exact(x, **tiling):
    got, want = K.int8_quant(x, **tiling), K.int8_quant_ref(x)
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


@pytest.mark.parametrize("tiling", [{}, WIDE], ids=["whole", "wide"])
def test_ties_round_to_even_and_zero_rows(tiling):
    """Row max 127 -> scale exactly 1, so x / scale = x: halves must go to the even neighbour."""
    ties = torch.arange(-127, 127, dtype=torch.float32) + 0.5  # -126.5 .. 126.5
    near = torch.tensor([0.49999997, -0.49999997, 2.5000002, 126.49999, 127.0])
    x = torch.cat([ties, near]).to(device())[None, :].repeat(2, 1)
    x[1] = 0.0  # zero row: scale = 1e-8 / 127, q = 0
    _assert_exact(x, **tiling)
    q = K.int8_quant(x, **tiling).q[0, : ties.numel()].cpu()
    assert torch.equal(q, torch.round(ties).to(torch.int8))


@pytest.mark.parametrize("tiling", [{}, WIDE], ids=["whole", "wide"])
def test_strided_rows(tiling):
    base = torch.randn(4, 96 + 32, device=device())
    _assert_exact(base[:, :96], **tiling)


def _wide_rows(tokens, hidden, dtype):
    """Random rows (3 sigma), one of zeros, one whose max sits in the last (maybe ragged) chunk and one
    whose max is negative and in the first: a chunk left out of either pass changes q or the scale."""
    x = 3 * torch.randn(tokens, hidden, device=device())
    x[1] = 0.0
    x[2, -1] = 40.0
    x[3, 0] = -40.0
    return x.to(dtype)


# one chunk, one chunk + 1 element, less than a chunk, 4 chunks, a ragged tail of 44
@pytest.mark.parametrize("hidden", [64, 65, 17, 256, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_wide_rows_match_reference_exactly(monkeypatch, hidden, dtype):
    """The wide-row kernel (forced: WIDE) gives the reference's bits and the whole-row kernel's."""
    x = _wide_rows(5, hidden, dtype)
    recorders = record_launches(monkeypatch, K, *KERNELS)
    _assert_exact(x, **WIDE)
    assert_one_launch(recorders, "_int8_quant_wide_kernel", CHUNK=64)
    assert torch.equal(K.int8_quant(x, **WIDE).q, K.int8_quant(x).q)


@pytest.mark.parametrize("hidden,wide", [(8192, False), (8193, True)])
def test_rows_wider_than_8192_take_the_wide_kernel(monkeypatch, hidden, wide):
    """The default threshold: up to 8192 columns the whole row in registers (BLOCK 8192, 16 warps),
    beyond it 4096-column chunks at 8 warps; both exact."""
    recorders = record_launches(monkeypatch, K, *KERNELS)
    _assert_exact(_wide_rows(4, hidden, torch.float32))
    blocks = dict(CHUNK=4096, BLOCK=None, num_warps=8) if wide else dict(CHUNK=None, BLOCK=8192, num_warps=16)
    assert_one_launch(recorders, "_int8_quant_wide_kernel" if wide else "_int8_quant_kernel", (4,), **blocks)


def test_row_tiling():
    assert K.row_tiling(18944) == K.RowTiling(True, 4096, 8)  # qwen-7b's down-projection input
    assert K.row_tiling(3584) == K.RowTiling(False, 4096, 8)
    assert K.row_tiling(8192) == K.RowTiling(False, 8192, 16)
    assert K.row_tiling(100, whole_row_max=64, chunk=64) == K.RowTiling(True, 64, 1)
    assert K.row_tiling(100, whole_row_max=100) == K.RowTiling(False, 128, 4)
    for chunk in (48, 8, 0):
        with pytest.raises(ValueError):
            K.row_tiling(100, whole_row_max=0, chunk=chunk)


def _assert_fused(x, res, w, eps=1e-6, **tiling):
    got, want = K.rms_norm_int8_quant(x, res, w, eps, **tiling), K.rms_norm_int8_quant_ref(x, res, w, eps)
    if res is None:
        assert got.residual is None
    else:
        assert torch.equal(got.residual, want.residual)  # same rounded add as the eager path
    # rsqrt may differ by an ulp of float32 between kernel and torch; after rounding the normalised
    # row to its dtype that is at most one ulp of that dtype per element, hence at most one step of
    # q (|v| / scale <= 127 and an ulp is < 127 * 2^-7 < 1 step) and a relative ulp on the scale.
    # In float32 nothing absorbs rstd's error (the kernels also sum the squares in another order than
    # torch): it reaches the scale with the roundings of x * rstd, * w and / 127, up to 3 ulps in 200
    # random seeds under the interpreter for both kernels (hidden 65 to 1000), so 8 ulps there.
    ulp = ULP[torch.promote_types(x.dtype, w.dtype)]
    assert (got.q.int() - want.q.int()).abs().max() <= 1
    torch.testing.assert_close(got.scale, want.scale, rtol=max(2 * ulp, 8 * ULP[torch.float32]), atol=0)
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


@pytest.mark.parametrize("hidden", [65, 300])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
def test_fused_wide_rows_match_reference(monkeypatch, hidden, residual, dtype):
    """The wide-row kernel's three passes (rstd with the residual stored once, max, quantise): the
    reference within `_assert_fused`'s bound, the residual exact, and the launch the wide one."""
    dev = device()
    x = _wide_rows(5, hidden, dtype)
    res = torch.randn(5, hidden, device=dev).to(dtype) if residual else None
    recorders = record_launches(monkeypatch, K, *KERNELS)
    _assert_fused(x, res, (1 + 0.1 * torch.randn(hidden, device=dev)).to(dtype), **WIDE)
    assert len(recorders["_int8_quant_wide_kernel"].launches) == 1
    assert not recorders["_int8_quant_kernel"].launches


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


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [256, 8192])
def test_gpu_wide_rows(monkeypatch, tokens):
    """qwen-7b's down-projection input (K = 18944, 4.625 chunks of 4096) through the wide-row kernel:
    the reference's bits and the whole-row kernel's (whole_row_max=32768); the fused variant too."""
    hidden = 18944
    x = (2 * torch.randn(tokens, hidden, device="cuda")).bfloat16()
    x[1], x[2, -1], x[3, 0] = 0.0, 30.0, -30.0  # a zero row, maxima in the ragged last and the first chunk
    recorders = record_launches(monkeypatch, K, *KERNELS)
    _assert_exact(x)
    assert [kw["CHUNK"] for _, kw in recorders["_int8_quant_wide_kernel"].launches] == [4096]
    assert torch.equal(K.int8_quant(x).q, K.int8_quant(x, whole_row_max=32768).q)
    assert len(recorders["_int8_quant_kernel"].launches) == 1  # that comparison's whole-row launch
    _assert_fused(x, torch.randn_like(x), (1 + 0.1 * torch.randn(hidden, device="cuda")).bfloat16())


def _assert_fused_is_composed(x, res, w, eps=1e-6):
    """rms_norm_int8_quant == int8_quant(rms_norm(...).out) bit for bit, the residual too."""
    rms = load_kernel_module("rms_norm")
    normed, new_res = rms.rms_norm(x, res, w, eps)
    want, got = K.int8_quant(normed), K.rms_norm_int8_quant(x, res, w, eps)
    assert torch.equal(got.q, want.q) and torch.equal(got.scale, want.scale)
    assert (got.residual is None) if res is None else torch.equal(got.residual, new_res)


@pytest.mark.parametrize("hidden", [64, 100, 1536])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_is_rms_norm_then_int8_quant(hidden, residual, dtype):
    """The composition the fused path of a decoder layer replaces (layers/decoder.py); under the
    interpreter both kernels cast alike, so bf16 is compared too."""
    dev = device()
    x = torch.randn(5, hidden, device=dev).to(dtype)
    res = torch.randn(5, hidden, device=dev).to(dtype) if residual else None
    _assert_fused_is_composed(x, res, (1 + 0.1 * torch.randn(hidden, device=dev)).to(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 256, 4096])
@pytest.mark.parametrize("hidden", [896, 1536, 2048, 3584, 4096, 5120, 7168, 8192])
@pytest.mark.parametrize("residual", [True, False])
def test_gpu_fused_is_rms_norm_then_int8_quant(tokens, hidden, residual):
    """Served hidden sizes up to 8192 (the whole-row kernel): the same sum-of-squares order as rms_norm
    (its warps and register layout, see kernels/int8_quant.py), hence the same bits."""
    x = (2 * torch.randn(tokens, hidden, device="cuda")).bfloat16()
    res = torch.randn_like(x) if residual else None
    _assert_fused_is_composed(x, res, (1 + 0.1 * torch.randn(hidden, device="cuda")).bfloat16())


@pytest.mark.gpu
@pytest.mark.parametrize("cols", [3584, 18944])  # the whole-row and the wide-row kernel
def test_gpu_quotients_near_ties_divide_exactly(cols):
    """The GPU divides by the row's reciprocal and two FMA corrections (`divide_by_scale`), not div.rn: at
    quotients within ulps of k + 1/2, where a quotient 1 ulp off rounds to the other integer, the q of the
    CPU reference (an IEEE division), every element."""
    x = near_tie_rows(64, cols, 127.0, torch.arange(0, 127) + 0.5)
    want = K.int8_quant_ref(x)
    got = K.int8_quant(x.cuda())
    assert torch.equal(got.scale.cpu(), want.scale) and torch.equal(got.q.cpu(), want.q)


@triton.jit
def _divide_rows(x_ptr, scale_ptr, out_ptr, N, FAST: tl.constexpr, BLOCK: tl.constexpr):
    """out[row] = divide_by_scale(x[row], scale[row], FAST)."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    v = tl.load(x_ptr + row * N + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * N + cols, K.divide_by_scale(v, tl.load(scale_ptr + row), FAST), mask=mask)


def _divided(x, scale, fast):
    out = torch.empty_like(x)
    _divide_rows[(x.shape[0],)](x, scale, out, x.shape[1], FAST=fast, BLOCK=triton.next_power_of_2(x.shape[1]))
    return out


def test_fast_division_is_the_ieee_quotient():
    """divide_by_scale's GPU path (reciprocal + two FMA corrections) against tl.div_rn, bit for bit, on the
    device at hand (the interpreter's float32 FMA on CPU): quotients within ulps of k + 1/2 and of the e4m3
    midpoints, scales over 2^-20..2^20, +-0.0 (sign kept), and a row whose scale is +inf (a row holding an
    inf: its max is inf), which gives +-0 as div.rn does, not NaN."""
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid) & (grid >= 0)].unique()
    x = torch.cat([near_tie_rows(16, 96, 127.0, torch.arange(0, 127) + 0.5),
                   near_tie_rows(16, 96, 448.0, (grid[1:] + grid[:-1]) / 2, seed=1)])
    x = x * torch.logspace(-6, 6, 32, base=10.0)[:, None]  # scales 1e-6 .. 1e6 times the built ones
    x[:, 1], x[:, 2] = 0.0, -0.0
    scale = (x.double().abs().amax(dim=1) / 127.0).float()
    x, scale = x.to(device()), scale.to(device())
    scale[3] = float("inf")
    fast, exact = _divided(x, scale, True), _divided(x, scale, False)
    assert torch.equal(fast.view(torch.int32), exact.view(torch.int32))  # bits: the sign of zero included
    assert not fast.isnan().any() and (fast[3] == 0).all() and torch.signbit(fast[:, 2]).all()
