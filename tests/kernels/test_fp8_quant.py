"""Per-token FP8 (e4m3) activation quantisation against its reference, bit for bit: the kernel
rounds onto the e4m3 grid itself (ties to even), so it must agree with torch's cast everywhere,
including the ties, the carries into the next binade and the subnormals tested below. Rows wider than
8192 columns go through the wide-row kernel (4096-column chunks); tests force it at small shapes
with WIDE and check from the recorded launches that it ran."""

import pytest
import torch

from tests.kernels.interpret import INTERPRET, device, load_kernel_module
from tests.kernels.launches import assert_one_launch, record_launches
from tests.kernels.quant_cases import near_tie_rows
from tests.kernels.triton36 import triton_3_6_semantics

K = load_kernel_module("fp8_quant")
WIDE = dict(whole_row_max=0, chunk=64)  # every row through the wide-row kernel, in 64-column chunks
KERNELS = ("_fp8_quant_kernel", "_fp8_quant_wide_kernel")
TILINGS = pytest.mark.parametrize("tiling", [{}, WIDE], ids=["whole", "wide"])


def _assert_exact(x, **tiling):
    got, want = K.fp8_quant(x, **tiling), K.fp8_quant_ref(x)
    assert got.q.dtype == torch.float8_e4m3fn and got.scale.dtype == torch.float32
    assert torch.equal(got.q.view(torch.uint8), want.q.view(torch.uint8))  # sign of zero included
    assert torch.equal(got.scale, want.scale)
    # the correctly rounded quotient amax / 448 on every device (float64 then float32 is exact for
    # a division); PyTorch's CUDA `tensor / 448.0` would multiply by float32(1 / 448) instead
    amax = x.float().abs().amax(dim=1).clamp(min=1e-8)
    assert torch.equal(want.scale, (amax.double() / 448.0).float())


@pytest.mark.parametrize("tokens,hidden", [(1, 64), (5, 100), (33, 96), (2, 1537)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference_exactly(tokens, hidden, dtype):
    # columns spanning six decades, so each row reaches the subnormal range of its scale
    x = torch.randn(tokens, hidden, device=device()) * torch.logspace(-4, 2, hidden, device=device())
    _assert_exact(x.to(dtype))


def _grid_cases() -> torch.Tensor:
    """Every positive finite e4m3 value, the midpoints between neighbours and one float32 ulp either
    side of each midpoint; both signs; then 448 so that the row's scale is exactly 1."""
    values = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448
    mids = (values[:-1] + values[1:]) / 2
    around = torch.cat([mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1), values])
    return torch.cat([around, -around, torch.tensor([-0.0, 448.0])])


@TILINGS
def test_ties_carries_and_subnormals(tiling):
    x = _grid_cases().to(device())[None, :]
    assert K.fp8_quant(x, **tiling).scale.item() == 1.0
    _assert_exact(x, **tiling)


@pytest.mark.skipif(not INTERPRET, reason="models Triton 3.6 in the interpreter")
@TILINGS
def test_sign_of_zero_with_triton_3_6_negation(monkeypatch, tiling):
    """Triton 3.6 compiles unary minus as 0 - x (so -(+0.0) = +0.0): the kernel must still give -0.0
    for -0.0 and for negatives that round to zero, as torch's cast does (a GPU run caught this)."""
    triton_3_6_semantics(monkeypatch)
    x = _grid_cases().to(device())[None, :]
    tiny = torch.tensor([[-1e-4, -2.0 ** -11, -2.0 ** -10, -0.0, 2.0 ** -11, 0.0, 448.0]], device=device())
    _assert_exact(x, **tiling)
    _assert_exact(tiny, **tiling)
    assert K.fp8_quant(tiny, **tiling).q.view(torch.uint8)[0, :5].tolist() == [128, 128, 128, 128, 0]


@TILINGS
def test_zero_rows_and_strided_rows(tiling):
    base = torch.randn(3, 160, device=device())
    base[1] = 0.0
    _assert_exact(base[:, :128], **tiling)


def _wide_rows(tokens, hidden, dtype):
    """Columns spanning six decades (so rows reach their scale's subnormals), one row of zeros, one
    whose max sits in the last (maybe ragged) chunk and one whose max is negative and in the first:
    a chunk left out of either pass changes q or the scale."""
    dev = device()
    x = torch.randn(tokens, hidden, device=dev) * torch.logspace(-4, 2, hidden, device=dev).flip(0)
    x[1] = 0.0
    x[2, -1] = 1000.0
    x[3, 0] = -1000.0
    return x.to(dtype)


# one chunk, one chunk + 1 element, less than a chunk, 4 chunks, a ragged tail of 44
@pytest.mark.parametrize("hidden", [64, 65, 17, 256, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_wide_rows_match_reference_exactly(monkeypatch, hidden, dtype):
    """The wide-row kernel (forced: WIDE) gives the reference's bits and the whole-row kernel's."""
    x = _wide_rows(5, hidden, dtype)
    recorders = record_launches(monkeypatch, K, *KERNELS)
    _assert_exact(x, **WIDE)
    assert_one_launch(recorders, "_fp8_quant_wide_kernel", CHUNK=64)
    assert torch.equal(K.fp8_quant(x, **WIDE).q.view(torch.uint8), K.fp8_quant(x).q.view(torch.uint8))


@pytest.mark.parametrize("hidden,wide", [(8192, False), (8193, True)])
def test_rows_wider_than_8192_take_the_wide_kernel(monkeypatch, hidden, wide):
    """The default threshold: up to 8192 columns the whole row in registers (BLOCK 8192, 16 warps),
    beyond it 4096-column chunks at 8 warps; both exact."""
    recorders = record_launches(monkeypatch, K, *KERNELS)
    _assert_exact(_wide_rows(4, hidden, torch.float32))
    blocks = dict(CHUNK=4096, BLOCK=None, num_warps=8) if wide else dict(CHUNK=None, BLOCK=8192, num_warps=16)
    assert_one_launch(recorders, "_fp8_quant_wide_kernel" if wide else "_fp8_quant_kernel", (4,), **blocks)


def test_empty_and_bad_inputs():
    out = K.fp8_quant(torch.randn(0, 32, device=device()))
    assert out.q.shape == (0, 32) and out.scale.shape == (0,)
    with pytest.raises(ValueError):
        K.fp8_quant(torch.randn(8, 4, device=device()).t())
    with pytest.raises(ValueError):
        K.fp8_quant(torch.randn(4, device=device()))


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 16, 256, 4096])
@pytest.mark.parametrize("hidden", [3584, 18944])
def test_gpu_real_shapes(tokens, hidden):
    _assert_exact((2 * torch.randn(tokens, hidden, device="cuda")).bfloat16())
    if tokens == 1:
        _assert_exact(_grid_cases().cuda()[None, :])


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [256, 8192])
def test_gpu_wide_rows(monkeypatch, tokens):
    """qwen-7b's down-projection input (K = 18944, 4.625 chunks of 4096) through the wide-row kernel:
    the reference's bits and the whole-row kernel's (whole_row_max=32768); the e4m3 grid cases too."""
    x = _wide_rows(tokens, 18944, torch.bfloat16)
    recorders = record_launches(monkeypatch, K, *KERNELS)
    _assert_exact(x)
    assert [kw["CHUNK"] for _, kw in recorders["_fp8_quant_wide_kernel"].launches] == [4096]
    whole = K.fp8_quant(x, whole_row_max=32768)
    assert len(recorders["_fp8_quant_kernel"].launches) == 1
    assert torch.equal(K.fp8_quant(x).q.view(torch.uint8), whole.q.view(torch.uint8))
    _assert_exact(_grid_cases().cuda()[None, :], **WIDE)


def test_hardware_cast_only_from_sm90(monkeypatch):
    """The GPU's e4m3 conversion rounds like torch's cast only from compute capability 9.0 (Triton
    converts through float16 with truncation below): sm_89 cards and the interpreter round in software."""
    from deepserve.kernels import fp8_quant as module

    assert not module.hardware_cast_rounds_like_torch(torch.device("cpu"))
    for capability, hardware in (((8, 9), False), ((9, 0), True), ((10, 0), True)):
        monkeypatch.setattr(module, "_capability", lambda index, c=capability: c)
        assert module.hardware_cast_rounds_like_torch(torch.device("cuda", 0)) is hardware


@pytest.mark.gpu
@pytest.mark.parametrize("cols", [3584, 18944])  # the whole-row and the wide-row kernel
def test_gpu_quotients_near_grid_midpoints_divide_exactly(cols):
    """The GPU divides by the row's reciprocal and two FMA corrections (int8_quant.divide_by_scale), not
    div.rn: at quotients within ulps of the midpoints between e4m3 neighbours, where a quotient 1 ulp off
    rounds to the other neighbour, the e4m3 bits of the CPU reference (an IEEE division), every element."""
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid) & (grid >= 0)].unique()  # 0 .. 448, sorted
    x = near_tie_rows(64, cols, 448.0, (grid[1:] + grid[:-1]) / 2)
    want = K.fp8_quant_ref(x)
    got = K.fp8_quant(x.cuda())
    assert torch.equal(got.scale.cpu(), want.scale)
    assert torch.equal(got.q.cpu().view(torch.uint8), want.q.view(torch.uint8))


# ---- RMSNorm fused with the e4m3 quantisation (rms_norm_fp8_quant) ------------------------------------------

Q8 = load_kernel_module("int8_quant")  # its row kernel runs the fused launch (interpreted on CPU)


def _assert_fused_fp8_is_composed(x, res, w, eps=1e-6, **tiling):
    """rms_norm_fp8_quant == fp8_quant(rms_norm(...).out) bit for bit (sign of zero included), the residual too;
    and the reference composition (rms_norm_ref, then the per-token e4m3 reference) where the norm is rms_norm's."""
    rms = load_kernel_module("rms_norm")
    normed, new_res = rms.rms_norm(x, res, w, eps)
    want, got = K.fp8_quant(normed), K.rms_norm_fp8_quant(x, res, w, eps, **tiling)
    assert got.q.dtype == torch.float8_e4m3fn
    assert torch.equal(got.q.view(torch.uint8), want.q.view(torch.uint8)) and torch.equal(got.scale, want.scale)
    assert (got.residual is None) if res is None else torch.equal(got.residual, new_res)


@pytest.mark.parametrize("hidden", [64, 100, 1536])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_norm_is_rms_norm_then_fp8_quant(hidden, residual, dtype):
    dev = device()
    x = (torch.randn(5, hidden, device=dev) * torch.logspace(-3, 1, hidden, device=dev)).to(dtype)
    res = torch.randn(5, hidden, device=dev).to(dtype) if residual else None
    _assert_fused_fp8_is_composed(x, res, (1 + 0.1 * torch.randn(hidden, device=dev)).to(dtype))


def test_fused_norm_reference_and_bad_inputs():
    """The pure-PyTorch reference agrees with the kernel in float32 (interpreter or GPU), the scale included;
    a wrong scale would move every q; bad shapes are refused."""
    dev = device()
    x, res, w = torch.randn(4, 96, device=dev), torch.randn(4, 96, device=dev), 1 + 0.1 * torch.randn(96, device=dev)
    got, want = K.rms_norm_fp8_quant(x, res, w, 1e-6), K.rms_norm_fp8_quant_ref(x, res, w, 1e-6)
    assert torch.equal(got.scale, want.scale) and torch.equal(got.residual, want.residual)
    assert (got.q.float() != want.q.float()).float().mean() < 0.01  # the sum-of-squares order may move a tie
    with pytest.raises(ValueError):
        K.rms_norm_fp8_quant(x, res[:, :8], w, 1e-6)


@pytest.mark.parametrize("hardware", [False, True])
def test_fused_norm_launches_the_row_kernel_with_fp8_and_the_e4m3_cast_rule(monkeypatch, hardware):
    """FP8 and NORM on, and HW_ROUND = hardware_cast_rounds_like_torch(device) (sm_90+), not `x.is_cuda`: on an
    sm_89 GPU the hardware cast would round unlike fp8_quant. Recorded, not run (the rule's value is forced)."""
    launches = []
    monkeypatch.setattr(Q8, "_int8_quant_kernel", {(3,): lambda *a, **kw: launches.append(kw)})
    monkeypatch.setattr(K, "hardware_cast_rounds_like_torch", lambda device: hardware)
    K.rms_norm_fp8_quant(torch.randn(3, 64, device=device()), None, torch.ones(64, device=device()), 1e-6)
    (kw,) = launches
    assert kw["FP8"] is True and kw["NORM"] is True and kw["HW_ROUND"] is hardware


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 256, 4096])
@pytest.mark.parametrize("hidden", [2048, 3584, 8192])
@pytest.mark.parametrize("residual", [True, False])
def test_gpu_fused_norm_is_rms_norm_then_fp8_quant(tokens, hidden, residual):
    x = (2 * torch.randn(tokens, hidden, device="cuda")).bfloat16()
    res = torch.randn_like(x) if residual else None
    _assert_fused_fp8_is_composed(x, res, (1 + 0.1 * torch.randn(hidden, device="cuda")).bfloat16())
