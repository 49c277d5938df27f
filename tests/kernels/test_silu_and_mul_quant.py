"""SiLU-and-mul fused with the per-token INT8 / FP8 activation quantisation, against the unfused kernels
(`int8_quant(silu_and_mul(x))`, `fp8_quant(silu_and_mul(x))`) bit for bit, and against the references.

The unfused composition is the contract (the W8A8 linear methods swap one for the other): equal q bits
(the sign of an fp8 zero included) and equal scales, at widths below, at and above one segment, with the
segment forced small so that a row is split many ways. On CPU the kernel runs as two launches (publish the
segments' maxima, then quantise); on the GPU as one (the segments wait for each other), and both forms are
compared there. The references differ from the kernels where
silu_and_mul's kernel differs from its eager reference (its exp; under the interpreter also its float32
-> bf16 cast, which truncates: tests/kernels/test_silu_and_mul.py), so they are compared within one step
of q and two ulps of the scale, in float32 / float16 on CPU.
"""

import pytest
import torch

from tests.kernels.interpret import INTERPRET, device, load_kernel_module

S = load_kernel_module("silu_and_mul")
I8 = load_kernel_module("int8_quant")
F8 = load_kernel_module("fp8_quant")
K = load_kernel_module("silu_and_mul_quant")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ULP = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def _gate_up(tokens: int, inter: int, dtype: torch.dtype, dev=None) -> torch.Tensor:
    """[tokens, 2 * inter]: gates over a few decades (so the fp8 rows reach their subnormals), up ~ N(0, 1)."""
    dev = dev or device()
    gate = 3 * torch.randn(tokens, inter, device=dev) * torch.logspace(-2, 0.5, inter, device=dev)
    return torch.cat([gate, torch.randn(tokens, inter, device=dev)], dim=1).to(dtype)


def _assert_same(got, want):
    assert got.q.dtype == want.q.dtype and got.q.shape == want.q.shape and got.scale.dtype == torch.float32
    assert torch.equal(got.q.view(torch.uint8), want.q.view(torch.uint8))  # int8 / e4m3 bits, -0.0 included
    assert torch.equal(got.scale, want.scale)


def _assert_unfused(x, block=None):
    act = S.silu_and_mul(x)
    int8 = K.silu_and_mul_int8_quant(x, block)
    assert int8.residual is None
    _assert_same(int8, I8.int8_quant(act))
    _assert_same(K.silu_and_mul_fp8_quant(x, block), F8.fp8_quant(act))


@pytest.mark.parametrize("inter", [1, 7, 64, 65, 100, 2048, 2049, 3000])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_unfused_kernels_exactly(inter, dtype):
    """Default segment (1024 columns): one segment, exactly one, one + 1 column, ragged segments."""
    _assert_unfused(_gate_up(3, inter, dtype))


@pytest.mark.parametrize("inter,block", [(64, 16), (65, 16), (100, 32), (1000, 64)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_small_segments_split_the_row(inter, block, dtype):
    """Segments of 16-64 columns: up to 16 programs per row, ragged last segments; the row max is the
    same in any order, so the bits are too."""
    x = _gate_up(4, inter, dtype)
    _assert_unfused(x, block)
    _assert_same(K.silu_and_mul_int8_quant(x, block), K.silu_and_mul_int8_quant(x))


def test_row_max_in_the_last_segment_and_ties():
    """silu(64) = 64 exactly, so v = 64 * up: quotients k + 1/2 (int8 ties go to even) and the row max
    127 (scale exactly 1) in the ragged last segment, which every other segment of the row must wait for."""
    ties = (torch.arange(-126, 126, dtype=torch.float32) + 0.5) / 64
    up = torch.cat([ties, torch.tensor([127 / 64])])  # 253 columns: 15 segments of 16, then 13
    x = torch.cat([torch.full_like(up, 64.0), up])[None].to(device())  # [1, 2 * 253]
    got = K.silu_and_mul_int8_quant(x, block=16)
    assert got.scale.item() == 1.0
    assert torch.equal(got.q[0, :-1].cpu(), torch.round(ties * 64).to(torch.int8))
    _assert_unfused(x, block=16)


def test_zero_rows_strided_rows_and_empty():
    dev = device()
    base = _gate_up(5, 96, torch.float32)
    base[2] = 0.0  # zero row: scale 1e-8 / qmax, q 0 (+0.0 in e4m3)
    strided = torch.cat([base, torch.randn(5, 16, device=dev)], dim=1)[:, :192]  # row stride 208
    _assert_unfused(base, block=32)
    _assert_unfused(strided, block=32)
    _assert_same(K.silu_and_mul_int8_quant(strided), K.silu_and_mul_int8_quant(base))
    assert K.silu_and_mul_int8_quant(base).q[2].abs().sum() == 0
    for fused in (K.silu_and_mul_int8_quant, K.silu_and_mul_fp8_quant):
        empty = fused(torch.randn(0, 64, device=dev))
        assert empty.q.shape == (0, 32) and empty.scale.shape == (0,)
        for bad in (torch.randn(2, 7, device=dev), torch.randn(4, 64, device=dev).t(),
                    torch.randn(2, 8, device=dev).double(), torch.randn(8, device=dev)):
            with pytest.raises(ValueError):
                fused(bad)
        for block in (0, 48, -16):  # a segment must be a positive power of two (0 is not "the default")
            with pytest.raises(ValueError, match="power of two"):
                fused(torch.randn(2, 64, device=dev), block=block)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_segments_are_skipped_like_the_unfused_max(dtype):
    """A segment whose v are all NaN publishes 0.0 (its max's bits + 1 would overflow in float32), one with
    some NaNs its finite max: the unfused kernels' row max skips NaNs the same way, so the bits agree."""
    x = _gate_up(3, 100, dtype)
    x[0, :32] = float("nan")  # row 0: its first 32-column segment all NaN
    x[1, 40] = float("nan")  # row 1: one NaN
    x[2, :100] = float("nan")  # row 2: every gate NaN
    _assert_unfused(x, block=32)


def test_one_launch_needs_an_nvidia_gpu():
    """Off NVIDIA GPUs (here: the interpreter) a waiting program could keep its row's others from running."""
    if not INTERPRET:
        pytest.skip("checks the refusal on CPU tensors; the GPU form is compared in test_gpu_one_launch_...")
    with pytest.raises(ValueError, match="one-launch"):
        K._launch(_gate_up(2, 64, torch.float32), torch.int8, 32, one_launch=True)


@pytest.mark.parametrize("inter", [7, 100, 2049])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([] if INTERPRET else [torch.bfloat16]))
def test_near_references(inter, dtype):
    """Within one quantisation step of the pure-PyTorch references (see the module docstring)."""
    x = _gate_up(4, inter, dtype)
    got, want = K.silu_and_mul_int8_quant(x), K.silu_and_mul_int8_quant_ref(x)
    assert (got.q.int() - want.q.int()).abs().max() <= 1
    torch.testing.assert_close(got.scale, want.scale, rtol=2 * ULP[dtype], atol=0)
    got, want = K.silu_and_mul_fp8_quant(x), K.silu_and_mul_fp8_quant_ref(x)
    torch.testing.assert_close(got.scale, want.scale, rtol=2 * ULP[dtype], atol=0)
    step = torch.maximum(want.q.float().abs() / 4, torch.full_like(got.scale[:, None], 2.0 ** -9))
    assert ((got.q.float() - want.q.float()).abs() <= step).all()  # one e4m3 step (1/8 .. 1/4 relative)
    assert (got.q.float() == want.q.float()).float().mean() > 0.99


# ---- GPU, qwen-7b's down-projection input (I = 18944) ---------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 256, 8192])
def test_gpu_qwen7b_matches_unfused_kernels(tokens):
    x = _gate_up(tokens, 18944, torch.bfloat16, "cuda")
    _assert_unfused(x)
    _assert_unfused(_gate_up(tokens, 2816, torch.bfloat16, "cuda"))  # V2-Lite's 2 shared experts: ragged segment


@pytest.mark.gpu
@pytest.mark.parametrize("tokens,inter,block", [(8192, 18944, None), (300, 18944, 256), (70000, 64, 16)])
def test_gpu_one_launch_equals_two_launches(tokens, inter, block):
    """The waiting form (one launch) against the publish-then-quantise form (two launches), bit for bit, at
    8192 rows of 19 segments, 300 rows of 74, and 70,000 rows of 4 (more rows than a grid's second axis
    takes); and the waiting form is the GPU default. More segments than SMs: two launches."""
    x = _gate_up(tokens, inter, torch.bfloat16, "cuda")
    for q_dtype in (torch.int8, torch.float8_e4m3fn):
        one, two = K._launch(x, q_dtype, block, one_launch=True), K._launch(x, q_dtype, block, one_launch=False)
        assert torch.equal(one[0].view(torch.uint8), two[0].view(torch.uint8)) and torch.equal(one[1], two[1])
        default = K._launch(x, q_dtype, block)
        assert torch.equal(default[0].view(torch.uint8), one[0].view(torch.uint8)) and torch.equal(default[1], one[1])
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    with pytest.raises(ValueError, match="one-launch"):
        K._launch(_gate_up(2, 16 * (sms + 1), torch.bfloat16, "cuda"), torch.int8, 16, one_launch=True)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay():
    """No host synchronisation: captured once, replayed on new inputs."""
    x = _gate_up(256, 18944, torch.bfloat16, "cuda")
    K.silu_and_mul_int8_quant(x), K.silu_and_mul_fp8_quant(x)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        int8, fp8 = K.silu_and_mul_int8_quant(x), K.silu_and_mul_fp8_quant(x)
    x.copy_(_gate_up(256, 18944, torch.bfloat16, "cuda"))
    graph.replay()
    torch.cuda.synchronize()
    act = S.silu_and_mul(x)
    _assert_same(int8, I8.int8_quant(act))
    _assert_same(fp8, F8.fp8_quant(act))
