"""gemv (kernels/gemv.py) against the exact sum and its float32 reference; the dense-linear dispatch.

Tolerance, from float32 accumulation and one output rounding. Let s = sum_k x[k] w[k] + b be exact
(float64: bf16 and f16 products are exact, float64 sums of them err by ~K 2^-53, negligible) and
B = sum_k |x[k] w[k]| + |b|. Every product reaches the kernel's float32 value a through at most
    D = VEC (in-thread column group) + chunks (loop) + BLOCK_K / VEC (reduction over the lanes)
        + splits + 1 (bias)
float32 roundings (one more for float32 products), whatever the order inside each stage, so
    |a - s| <= E = gamma_D * B,   gamma_n = n u / (1 - n u),  u = 2^-24.
The output is a rounded once to the output dtype (precision p): |y - a| <= r 2^(1-p) |a| (+ r 2^-24
for f16 subnormals), r = 1/2 for round-to-nearest (GPU) and r = 1 on CPU, where the interpreter
truncates float32 -> bf16. Hence
    |y - s| <= r 2^(1-p) (|s| + E) + E                                          (`allowed`)
and `gemv_ref` (a float32 matmul, any order: D = K + 2, r = 1/2) obeys the same bound with its own
D; the kernel and the reference differ by at most the sum of the two. An indexing error (a chunk,
row or split lost or read twice) moves outputs by ~|y| ~ B / sqrt(K), far above E at these
shapes (`test_bound_rejects_wrong_results` checks that the bound sees such errors).

CPU (interpreter): small shapes, N and K not multiples of the blocks, M = 1..4, strided x rows,
bias / no bias, bf16 / f16 / f32, split-K; the config table. GPU: qwen-7b and V2-Lite decode shapes,
CUDA-graph capture and replay. Last section: DenseLinearMethod's gemv branch (its dispatch rule is
tested in tests/unit/test_linear_method_gemv.py).
"""

import contextlib

import pytest
import torch

from deepserve.layers import linear_method
from deepserve.layers.linear_method import DenseLinearMethod, gemv_applies, use_gemv
from tests.kernels.interpret import INTERPRET, device, load_kernel_module

G = load_kernel_module("gemv")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
U = 2.0 ** -24
EPS = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 0.0}  # 2^(1-p); f32: no rounding
TINY = {torch.float16: 2.0 ** -24}  # f16 subnormal spacing


def gamma(n: int) -> float:
    return n * U / (1 - n * U)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def kernel_depth(cfg, k: int, dtype) -> int:
    """D of the module docstring for one gemv launch with `cfg` (+1 for float32 products)."""
    vec = 16 // dtype.itemsize
    chunks = cdiv(cdiv(k, cfg.split_k), cfg.block_k)  # per split
    return vec + chunks + cfg.block_k // vec + cfg.split_k + 1 + (dtype == torch.float32)


def scaled_depth(cfg, k: int, rounded_products: bool = False) -> int:
    """`kernel_depth` for 1-byte weights (int8, e4m3: VEC = 16) with their row scale, one multiply more;
    rounded_products: float32 x, whose products with the weights may round (+1)."""
    chunks = cdiv(cdiv(k, cfg.split_k), cfg.block_k)  # per split
    return 16 + chunks + cfg.block_k // 16 + cfg.split_k + 2 + rounded_products


def allowed(exact, mags, depth: int, dtype, rounding: float) -> torch.Tensor:
    err = gamma(depth) * mags
    return rounding * EPS[dtype] * (exact.abs() + err) + err + rounding * TINY.get(dtype, 0.0)


def exact_and_magnitudes(x, w, bias):
    """(s, B) of the module docstring, float64 [M, N]."""
    s = x.double() @ w.double().t()
    mags = x.double().abs() @ w.double().abs().t()
    if bias is not None:
        s, mags = s + bias.double(), mags + bias.double().abs()
    return s, mags


def within(got, x, w, bias, cfg) -> torch.Tensor:
    """[M, N] bool: the kernel's output within its bound of the exact result."""
    exact, mags = exact_and_magnitudes(x, w, bias)
    r = 1.0 if INTERPRET and got.dtype == torch.bfloat16 else 0.5
    return (got.double() - exact).abs() <= allowed(exact, mags, kernel_depth(cfg, x.shape[1], x.dtype), got.dtype, r)


def assert_gemv_close(got, x, w, bias, cfg):
    assert got.dtype == x.dtype and got.shape == (x.shape[0], w.shape[0])
    ok = within(got, x, w, bias, cfg)
    assert bool(ok.all()), f"{int((~ok).sum())} of {ok.numel()} outputs outside the bound"
    with _no_tf32():
        ref = G.gemv_ref(x, w, bias)
    exact, mags = exact_and_magnitudes(x, w, bias)
    d = kernel_depth(cfg, x.shape[1], x.dtype)
    r = 1.0 if INTERPRET and got.dtype == torch.bfloat16 else 0.5
    both = allowed(exact, mags, d, got.dtype, r) + allowed(exact, mags, x.shape[1] + 2, got.dtype, 0.5)
    assert bool(((got.double() - ref.double()).abs() <= both).all()), "kernel and gemv_ref differ beyond the bound"


@contextlib.contextmanager
def _no_tf32():
    """gemv_ref's bound assumes float32 products: no TF32 in its matmul on a GPU."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def operands(m, n, k, dtype, row_pad=0, bias=True, dev=None):
    """x [m, k] (row stride k + row_pad), w [n, k] contiguous, bias [n] or None."""
    dev = dev or device()
    x = torch.randn(m, k + row_pad, device=dev).to(dtype)[:, :k]
    w = (torch.randn(n, k, device=dev) / k ** 0.5).to(dtype)
    b = torch.randn(n, device=dev).to(dtype) if bias else None
    return x, w, b


# block_n, block_k, split_k, num_warps: one K chunk per split, several chunks, splits, a masked tail
CONFIGS = [None, G.GemvConfig(4, 32, 1, 1), G.GemvConfig(8, 64, 3, 2), G.GemvConfig(2, 128, 2, 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("n,k", [(37, 200), (9, 24), (70, 1000)])
@pytest.mark.parametrize("cfg", CONFIGS, ids=["table", "4x32", "8x64-split3", "2x128-split2"])
def test_matches_reference(dtype, m, n, k, cfg):
    x, w, b = operands(m, n, k, dtype, row_pad=8)
    got = G.gemv(x, w, b, cfg)
    assert_gemv_close(got, x, w, b, cfg or G.gemv_config(m, n, k, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_bias_odd_k_unaligned_rows(dtype):
    """K not a multiple of 8 (no vector-load hints), x rows at an odd stride, no bias."""
    x, w, _ = operands(3, 21, 37, dtype, row_pad=3, bias=False)
    cfg = G.GemvConfig(8, 16, 2, 1)
    assert_gemv_close(G.gemv(x, w, None, cfg), x, w, None, cfg)


def test_float32_bias_with_half_operands():
    x, w, _ = operands(2, 19, 48, torch.float16)
    b = torch.randn(19, device=device())
    cfg = G.gemv_config(2, 19, 48, torch.float16)
    assert_gemv_close(G.gemv(x, w, b), x, w, b, cfg)


def test_bound_rejects_wrong_results():
    """The bound is tight enough to see a lost K chunk, a shifted row or a doubled split."""
    x, w, b = operands(2, 40, 256, torch.float16)
    cfg = G.GemvConfig(8, 64, 1, 1)
    good = G.gemv(x, w, b, cfg)
    assert bool(within(good, x, w, b, cfg).all())
    lost_chunk = w.clone()
    lost_chunk[:, -64:] = 0
    shifted = torch.roll(w, 1, dims=0)
    x8, w8 = x[:, :8].contiguous(), w[:, :8].contiguous()
    for bad in (G.gemv(x, lost_chunk, b, cfg), G.gemv(x, shifted, b, cfg), good + G.gemv(x8, w8)):
        assert within(bad, x, w, b, cfg).float().mean() < 0.5


def test_empty_shapes_and_bad_inputs():
    dev = device()
    x, w, b = operands(2, 16, 32, torch.float16)
    assert G.gemv(x[:0], w, b).shape == (0, 16)
    assert G.gemv(x, w[:0], b[:0]).shape == (2, 0)
    assert torch.equal(G.gemv(x[:, :0], w[:, :0], b), b.expand(2, 16))
    bad = [(x.float(), w, b), (x, w.t().contiguous().t(), b), (x, w[:, :16], b), (x, w, b[:8]),
           (torch.randn(5, 32, device=dev).half(), w, b), (x.t().contiguous().t()[:, :32], w, b),
           (x, w, b.view(2, 8))]
    for args in bad:
        with pytest.raises(ValueError):
            G.gemv(*args)
    with pytest.raises(ValueError):
        G.gemv(x, w, b, G.GemvConfig(4, 4, 1, 1))  # block_k below one 16-byte vector of f16
    with pytest.raises(ValueError):
        G.gemv(x, w, b, G.GemvConfig(3, 64, 1, 1))


def test_deterministic():
    x, w, b = operands(4, 50, 300, torch.bfloat16)
    cfg = G.GemvConfig(8, 64, 3, 2)
    assert torch.equal(G.gemv(x, w, b, cfg), G.gemv(x, w, b, cfg))


# ---- the config table -----------------------------------------------------------------------------

REAL = [(3584, 4608), (3584, 3584), (3584, 37888), (18944, 3584), (3584, 152064),  # qwen-7b (K, N)
        (2048, 3648), (2048, 2048), (2048, 21888), (10944, 2048), (2048, 102400)]  # V2-Lite


@pytest.mark.parametrize("k,n", REAL)
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_config_table(k, n, m, dtype):
    cfg = G.gemv_config(m, n, k, dtype)
    vec = 16 // dtype.itemsize
    block_m = 1 << (m - 1).bit_length()
    assert cfg.block_k % (vec * 32) == 0 and cfg.block_k <= max(vec * 32, 1 << (k - 1).bit_length())
    assert block_m * cfg.block_n <= 32  # accumulators per thread and column group
    assert cfg.block_k // (vec * 32 * cfg.num_warps) >= 1  # every thread holds whole 16-byte vectors
    assert -(-n // cfg.block_n) * cfg.split_k >= 264  # >= 2 programs per SM of an H200
    assert cfg == G.gemv_config(m, n, k, dtype)  # a function of the shape alone


@pytest.mark.parametrize("k,n", REAL)
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_int8_register_limit_only_where_measured(k, n, m):
    """The int8 table's register limits hold at M = 1 with the entry's full chunk (what run s16c measured); more
    rows of x or a narrower chunk need more registers a thread, so the fitted config drops the limit."""
    cfg = G.gemv_config(m, n, k, torch.int8)
    entry = next(c for max_n, max_k, c in G.INT8_TABLE if n <= max_n and k <= max_k)
    full = m == 1 and cfg.block_k == 2 * entry.block_k
    assert cfg.maxnreg == (entry.maxnreg if full else None)
    assert -(-n // cfg.block_n) * cfg.split_k >= 264  # >= 2 programs per SM of an H200
    if (k, n) == (3584, 4608) and m == 1:
        assert cfg.maxnreg == 96  # qwen-7b's qkv: 5 programs an SM instead of 4 (one wave)


def test_table_register_limit_only_for_two_byte_rows_ungated(monkeypatch):
    """The table's limits were measured with bf16 rows and ungated launches: float32 rows or gated=True launch
    without one (a config passed by the caller keeps its own)."""
    launched = []
    real = G._gemv_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append(kwargs.pop("maxnreg", None))
                return real[grid](*args, **{**kwargs, "PTX": False})  # the portable int8 conversion here
            return launch

    dev = device()
    monkeypatch.setattr(G, "_gemv_kernel", Spy())
    monkeypatch.setattr(G, "nvidia_ptx", lambda d: True)  # as on an NVIDIA GPU: the limit would be passed
    monkeypatch.setattr(G, "_dp4a_applies", lambda x, w, s: False)  # this float32 kernel, not gemv_dp4a
    monkeypatch.setattr(G, "INT8_TABLE", ((1 << 62, 1 << 62, G.GemvConfig(2, 256, 1, 1, 96)),))  # fits whole
    w, scale = torch.randint(-127, 128, (8, 64), dtype=torch.int8, device=dev), torch.rand(8, device=dev)
    x = torch.randn(1, 64, device=dev)
    G.gemv(x.bfloat16(), w, w_scale=scale)
    G.gemv(x, w, w_scale=scale)
    G.gemv(x.bfloat16(), w, w_scale=scale, gated=True)
    G.gemv(x, w, None, G.GemvConfig(2, 32, 1, 1, 96), w_scale=scale)
    assert launched == [96, None, None, 96]


@pytest.mark.parametrize("maxnreg", [0, 16, 256])
def test_register_limit_out_of_range_is_refused(maxnreg):
    x, w = torch.randn(1, 64), torch.randn(8, 64)
    with pytest.raises(ValueError, match="maxnreg"):
        G.gemv(x, w, config=G.GemvConfig(2, 64, 1, 1, maxnreg))


# ---- GPU: real decode shapes ----------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("k,n", REAL)
@pytest.mark.parametrize("m", [1, 2, 4])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gpu_real_shapes(k, n, m, with_bias):
    x, w, b = operands(m, n, k, torch.bfloat16, row_pad=64, bias=with_bias, dev="cuda")
    got = G.gemv(x, w, b)
    assert_gemv_close(got, x, w, b, G.gemv_config(m, n, k, x.dtype))
    assert torch.equal(got, G.gemv(x, w, b))  # deterministic


@pytest.mark.gpu
@pytest.mark.parametrize("k,n", [(3584, 4608), (18944, 3584), (2048, 3648)])
def test_gpu_split_and_f16(k, n):
    x, w, b = operands(2, n, k, torch.float16, dev="cuda")
    cfg = G.GemvConfig(4, 2048, 3, 8)
    assert_gemv_close(G.gemv(x, w, b, cfg), x, w, b, cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("k,n", [(3584, 4608), (18944, 3584), (2048, 3648), (2048, 2048)])
@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("split_k", [1, 2])
def test_gpu_cuda_graph_replay(k, n, m, split_k):
    """Captured once, replayed on new inputs: the same bits as eager calls (split partials included)."""
    x, w, b = operands(m, n, k, torch.bfloat16, dev="cuda")
    cfg = G.gemv_config(m, n, k, x.dtype)._replace(split_k=split_k)
    G.gemv(x, w, b, cfg)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = G.gemv(x, w, b, cfg)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, G.gemv(x, w, b, cfg))
        assert_gemv_close(out, x, w, b, cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("k,n", [(3584, 4608), (3584, 37888), (18944, 3584), (2048, 2048)])
@pytest.mark.parametrize("int8", [False, True])
def test_gpu_static_weight_prefetch_same_bits(k, n, int8):
    """static_weight=True (the first weight chunk read before the PDL wait) gives the bits of the default,
    eager and replayed in a CUDA graph behind a kernel that writes x (the weights are built first)."""
    w = (torch.randint(-128, 128, (n, k), dtype=torch.int8, device="cuda") if int8
         else (torch.randn(n, k, device="cuda") / k ** 0.5).bfloat16())
    scale = torch.rand(n, device="cuda") / 50 + 1e-3 if int8 else None
    x = torch.randn(1, k, device="cuda").bfloat16()
    want = G.gemv(x, w, None, w_scale=scale)
    assert torch.equal(G.gemv(x, w, None, w_scale=scale, static_weight=True), want)
    src = x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x.copy_(src * 1.0)  # the kernel just before writes x, which the GEMV reads after its wait
        out = G.gemv(x, w, None, w_scale=scale, static_weight=True)
    for sign in (1.0, -1.0, 1.0):
        src.copy_(sign * x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, G.gemv(src, w, None, w_scale=scale))


# ---- the dense-linear dispatch (layers/linear_method.py) ----------------------------------------

def test_dispatch_switch_within_kernel_limit():
    assert 0 <= linear_method.GEMV_MAX_M <= G.GEMV_MAX_M


class _Layer(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.weight = torch.nn.Parameter(w, requires_grad=False)


@pytest.mark.parametrize("shape", [(1, 64), (3, 64), (2, 2, 64)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_dense_method_routes_to_gemv(monkeypatch, shape, with_bias):
    """DenseLinearMethod.apply's gemv branch (forced on here, CUDA-only in service): leading dims
    flattened and restored, bias passed, results within the kernel's bound."""
    dev = device()
    layer = _Layer((torch.randn(24, 64, device=dev) / 8).half())
    x = torch.randn(*shape, device=dev).half()
    bias = torch.randn(24, device=dev).half() if with_bias else None
    calls = []
    monkeypatch.setattr(linear_method, "use_gemv", lambda x_, w_: calls.append(x_.shape) or gemv_applies(x_, w_))
    got = DenseLinearMethod().apply(layer, x, bias)
    assert calls and got.shape == (*shape[:-1], 24)
    rows = x.reshape(-1, 64)
    cfg = G.gemv_config(rows.shape[0], 24, 64, x.dtype)
    assert_gemv_close(got.reshape(-1, 24), rows, layer.weight, bias, cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 3584), (2, 3584), (2, 1, 3584)])
def test_gpu_dense_method_uses_gemv(shape):
    """On CUDA, decode-sized inputs of a bf16 layer take the kernel (the same bits as calling it); 4 rows
    (above linear_method.GEMV_MAX_M = 2, where cuBLAS was faster on an H200) do not."""
    layer = _Layer((torch.randn(4608, 3584, device="cuda") / 60).bfloat16())
    bias = torch.randn(4608, device="cuda").bfloat16()
    x = torch.randn(*shape, device="cuda").bfloat16()
    assert use_gemv(x, layer.weight) and not use_gemv(torch.randn(4, 3584, device="cuda").bfloat16(), layer.weight)
    got = DenseLinearMethod().apply(layer, x, bias)
    assert torch.equal(got.reshape(-1, 4608), G.gemv(x.reshape(-1, 3584), layer.weight, bias))


# ------------------------------------------------------------------------------- int8 weights (W8A16)


@pytest.mark.parametrize("m,n,k", [(1, 37, 300), (2, 70, 512), (1, 9, 40)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_int8_weights_with_row_scales(m, n, k, dtype, bias):
    """w int8 [N, K] with w_scale [N]: y = (x @ w^T) * scale + b. Same bound as above with the int8
    load width (VEC = 16) and one rounding more (the scale multiply); bf16 / f16 x int8 products are
    exact in float32 (<= 11 + 7 significant bits)."""
    dev = device()
    gen = torch.Generator().manual_seed(m * 100 + n + k)
    x = torch.randn(m, k, generator=gen).to(dev, dtype)
    w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8).to(dev)
    scale = (torch.rand(n, generator=gen) / 50 + 1e-3).to(dev)
    b = torch.randn(n, generator=gen).to(dev) if bias else None
    got = G.gemv(x, w, b, w_scale=scale)
    assert got.dtype == dtype and got.shape == (m, n)
    s = (x.double() @ w.double().t()) * scale.double()
    mags = (x.double().abs() @ w.double().abs().t()) * scale.double()
    if b is not None:
        s, mags = s + b.double(), mags + b.double().abs()
    cfg = G.gemv_config(m, n, k, torch.int8)
    depth = scaled_depth(cfg, k, dtype == torch.float32)
    r = 1.0 if INTERPRET and dtype == torch.bfloat16 else 0.5
    ok = (got.double() - s).abs() <= allowed(s, mags, depth, dtype, r)
    assert bool(ok.all()), f"{int((~ok).sum())} of {ok.numel()} outputs outside the bound"
    wrong = G.gemv(x, w, b, w_scale=scale * 1.01)  # a 1% scale error is far outside the bound
    assert not bool(((wrong.double() - s).abs() <= allowed(s, mags, depth, dtype, r)).all())


@pytest.mark.parametrize("k", [16, 300, 512])
@pytest.mark.parametrize("cfg", [None, G.GemvConfig(2, 64, 1, 1), G.GemvConfig(4, 32, 3, 1)],
                         ids=["table", "2x64", "4x32-split3"])
def test_int8_weights_every_value_exact(k, cfg):
    """Every int8 value, -128 included, reaches the float32 sum exactly, at its own column (the kernel
    converts with integer arithmetic, not a conversion instruction). Row i holds i - 128 in every column
    (x = 1); then rows hold all 256 values in shuffled orders against integer x. Products and sums are
    integers below 2^24 and scale = 1, so the float32 outputs are exact: one value off by one, or read
    from another column, changes its row. The small configs walk the K loop, a masked tail and splits."""
    dev = device()
    values = torch.arange(-128, 128, dtype=torch.int32)
    w = values[:, None].expand(256, k).to(torch.int8).contiguous()
    got = G.gemv(torch.ones(1, k, device=dev), w.to(dev), None, cfg, w_scale=torch.ones(256, device=dev))
    assert torch.equal(got.cpu(), (values * k).float()[None, :])
    gen = torch.Generator().manual_seed(k)
    shuffled = torch.stack([(values[torch.randperm(256, generator=gen)]).repeat(-(-k // 256))[:k]
                            for _ in range(64)]).to(torch.int8)  # [64, K]
    x = (torch.randint(-3, 4, (2, k), generator=gen)).float()
    want = x.double() @ shuffled.double().t()
    got = G.gemv(x.to(dev), shuffled.to(dev), None, cfg, w_scale=torch.ones(64, device=dev))
    assert torch.equal(got.cpu().double(), want)


def test_int8_weights_need_their_scales():
    dev = device()
    x, w = torch.randn(1, 32).to(dev), torch.zeros(4, 32, dtype=torch.int8, device=dev)
    with pytest.raises(ValueError, match="torch.float32 contiguous|float32"):
        G.gemv(x, w)
    with pytest.raises(ValueError, match="w_scale"):
        G.gemv(x, w, w_scale=torch.ones(3, device=dev))


@pytest.mark.gpu
@pytest.mark.parametrize("k,n", [(3584, 4608), (3584, 37888), (18944, 3584), (2048, 3648)])
def test_gpu_int8_weights_real_shapes(k, n):
    """This float32 kernel's int8 path at real shapes (its config passed: without one, gemv hands bf16 rows to
    kernels/gemv_dp4a.py, tested in test_gemv_dp4a.py; this one still runs float32 x, e4m3 and K % 16 != 0)."""
    x = torch.randn(1, k, device="cuda").bfloat16()
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
    scale = torch.rand(n, device="cuda") / 50 + 1e-3
    got = G.gemv(x, w, None, G.gemv_config(1, n, k, torch.int8), w_scale=scale)
    s = (x.double() @ w.double().t()) * scale.double()
    mags = (x.double().abs() @ w.double().abs().t()) * scale.double()
    depth = scaled_depth(G.gemv_config(1, n, k, torch.int8), k)
    assert bool(((got.double() - s).abs() <= allowed(s, mags, depth, torch.bfloat16, 0.5)).all())


E4M3 = torch.float8_e4m3fn


def _e4m3_values() -> torch.Tensor:
    """The 254 finite e4m3fn values (the two NaN encodings left out), [254] e4m3."""
    bits = torch.arange(256, dtype=torch.int32)
    return bits[(bits & 0x7F) != 0x7F].to(torch.uint8).view(E4M3)


@pytest.mark.parametrize("k", [16, 300])
@pytest.mark.parametrize("cfg", [None, G.GemvConfig(2, 64, 1, 1), G.GemvConfig(4, 32, 3, 1)],
                         ids=["table", "2x64", "4x32-split3"])
def test_e4m3_weights_every_value_exact(k, cfg):
    """Every finite e4m3 value (the fp8 method's decode rows, quant/fp8.py) reaches the float32 sum exactly: row
    i holds value i in every column, x = 1, so the sum is value * K, exact in float32 (4 significant bits times
    K < 2^9); then shuffled rows against integer x, within the kernel's float32 bound. A value converted wrong, or
    read from another column, changes its row."""
    dev = device()
    values = _e4m3_values()
    w = values[:, None].expand(-1, k).contiguous()
    got = G.gemv(torch.ones(1, k, device=dev), w.to(dev), None, cfg, w_scale=torch.ones(len(values), device=dev))
    assert torch.equal(got.cpu(), (values.float() * k)[None, :])
    gen = torch.Generator().manual_seed(k)
    order = torch.stack([torch.randperm(len(values), generator=gen).repeat(-(-k // len(values)))[:k]
                         for _ in range(32)])
    shuffled = values[order]  # [32, K]
    x = torch.randint(-3, 4, (2, k), generator=gen).float()
    got = G.gemv(x.to(dev), shuffled.to(dev), None, cfg, w_scale=torch.ones(32, device=dev)).cpu()
    s, mags = x.double() @ shuffled.double().t(), x.double().abs() @ shuffled.double().abs().t()
    depth = scaled_depth(cfg or G.gemv_config(2, 32, k, E4M3), k)  # integer x: exact products
    assert bool(((got.double() - s).abs() <= allowed(s, mags, depth, torch.float32, 0.5)).all())


@pytest.mark.parametrize("m", [1, 2, 4])
@pytest.mark.parametrize("gated", [False, True])
def test_e4m3_weights_scaled_bias_and_gated(m, gated):
    """bf16 rows times e4m3 weights with row scales and a bias, within the kernel's bound of the exact product;
    gated: the same bits as gemv then silu_and_mul; a weight dtype other than int8 / e4m3 with a scale is
    refused."""
    dev = device()
    gen = torch.Generator().manual_seed(m)
    k, n = 96, 48
    x = torch.randn(m, k, generator=gen).bfloat16().to(dev)
    w = (torch.randn(n, k, generator=gen) * 64).to(E4M3).to(dev)
    scale = (torch.rand(n, generator=gen) / 50 + 1e-3).to(dev)
    b = torch.randn(n, generator=gen).bfloat16().to(dev)
    if gated:
        assert torch.equal(G.gemv(x, w, b, w_scale=scale, gated=True), _unfused(x, w, b, None, scale))
        return
    got = G.gemv(x, w, b, w_scale=scale)
    s = (x.double() @ w.double().t()) * scale.double() + b.double()
    mags = (x.double().abs() @ w.double().abs().t()) * scale.double() + b.double().abs()
    depth = scaled_depth(G.gemv_config(m, n, k, E4M3), k)
    r = 1.0 if INTERPRET else 0.5
    assert bool(((got.double() - s).abs() <= allowed(s, mags, depth, torch.bfloat16, r)).all())
    with pytest.raises(ValueError, match="contiguous"):
        G.gemv(x, w.to(torch.bfloat16), b, w_scale=scale)


# ------------------------------------------------------------------------------- gated: SiLU-and-mul epilogue

S = load_kernel_module("silu_and_mul")
GATED_CONFIGS = [None, G.GemvConfig(2, 32, 1, 1), G.GemvConfig(8, 64, 1, 2), G.GemvConfig(1, 128, 1, 1)]


def _unfused(x, w, b, cfg, scale=None):
    """gemv (at the config gated=True runs: block_n >= 2) then the silu_and_mul kernel. Without a config, where
    gemv hands the call to kernels/gemv_dp4a.py (int8 weights, 2-byte rows, NVIDIA), that kernel's own output."""
    if cfg is None and G._dp4a_applies(x, w, scale):
        return S.silu_and_mul(G.gemv(x, w, b, w_scale=scale))
    cfg = (cfg or G.gemv_config(x.shape[0], w.shape[0], x.shape[1], w.dtype))
    cfg = cfg._replace(block_n=max(2, cfg.block_n))
    return S.silu_and_mul(G.gemv(x, w, b, cfg, w_scale=scale))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,inter,k", [(1, 37, 200), (3, 9, 24), (2, 64, 136)])
@pytest.mark.parametrize("cfg", GATED_CONFIGS, ids=["table", "2x32", "8x64", "1x128"])
def test_gated_is_gemv_then_silu_and_mul(dtype, m, inter, k, cfg):
    """gated=True: [M, I] = silu_and_mul(gemv(x, [gate | up])) bit for bit (same sums, same roundings), for I
    not a multiple of the program's columns (the last program's clamped rows), bias and strided x rows.
    A gate row swapped with an up row changes the result."""
    x, w, b = operands(m, 2 * inter, k, dtype, row_pad=8)
    got = G.gemv(x, w, b, cfg, gated=True)
    assert got.shape == (m, inter) and got.dtype == dtype
    assert torch.equal(got, _unfused(x, w, b, cfg))
    swapped = torch.cat([w[inter:inter + 1], w[1:inter], w[:1], w[inter + 1:]])  # gate row 0 <-> up row 0
    assert not torch.equal(G.gemv(x, swapped.contiguous(), b, cfg, gated=True)[:, 0], got[:, 0])


@pytest.mark.parametrize("m,inter,k,bias", [(1, 37, 320, True), (2, 70, 512, False)])
def test_gated_int8_weights(m, inter, k, bias):
    """int8 weights with row scales (W8A16): the scale of each gate / up row applies before the epilogue."""
    dev = device()
    gen = torch.Generator().manual_seed(m + inter + k)
    x = torch.randn(m, k, generator=gen).to(dev, torch.bfloat16)
    w = torch.randint(-127, 128, (2 * inter, k), generator=gen, dtype=torch.int8).to(dev)
    scale = (torch.rand(2 * inter, generator=gen) / 50 + 1e-3).to(dev)
    b = torch.randn(2 * inter, generator=gen).to(dev, torch.bfloat16) if bias else None
    got = G.gemv(x, w, b, w_scale=scale, gated=True)
    assert torch.equal(got, _unfused(x, w, b, None, scale))
    flipped = torch.cat([scale[inter:], scale[:inter]])  # gate and up scales exchanged
    assert not torch.equal(G.gemv(x, w, b, w_scale=flipped, gated=True), got)


def test_gated_rejects_odd_rows_split_configs_and_empty_shapes(monkeypatch):
    """Odd N and a K-split config are refused (the callers ask `gated_applies` first: a table entry that splits
    K makes them run gemv then silu_and_mul); empty shapes give silu_and_mul of the bias."""
    dev = device()
    x, w, _ = operands(1, 9, 32, torch.bfloat16, bias=False)
    with pytest.raises(ValueError, match="even number of rows"):
        G.gemv(x, w, gated=True)
    with pytest.raises(ValueError, match="one K split"):
        G.gemv(x, w[:8], None, G.GemvConfig(4, 16, 2, 1), gated=True)
    assert G.gated_applies(1, 8, 32, torch.bfloat16) and not G.gated_applies(1, 9, 32, torch.bfloat16)
    monkeypatch.setattr(G, "TABLE", ((1 << 62, 1 << 62, G.GemvConfig(4, 16, 2, 1)),))
    assert not G.gated_applies(1, 8, 32, torch.bfloat16)
    out = G.gemv(x[:0], torch.zeros(8, 32, dtype=torch.bfloat16, device=dev), gated=True)
    assert out.shape == (0, 4)
    b = torch.tensor([1.0, -2.0, 3.0, 0.5], device=dev).bfloat16()  # K = 0: y = bias
    got = G.gemv(x[:, :0], torch.zeros(4, 0, dtype=torch.bfloat16, device=dev), b, gated=True)
    want = (torch.nn.functional.silu(b[:2].float()).bfloat16().float() * b[2:].float()).bfloat16()
    assert torch.equal(got, want[None, :])


@pytest.mark.gpu
@pytest.mark.parametrize("k,n", [(3584, 37888), (2048, 21888), (2048, 2816)])
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("m", [1, 2])
def test_gpu_gated_real_shapes(k, n, int8, m):
    """qwen-7b's and V2-Lite's gate_up shapes at the table configs, in a CUDA graph: the same bits as gemv then
    silu_and_mul."""
    x = torch.randn(m, k, device="cuda").bfloat16()
    if int8:
        w, scale = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda"), torch.rand(n, device="cuda") / 50
    else:
        w, scale = (torch.randn(n, k, device="cuda") / k ** 0.5).bfloat16(), None
    want = _unfused(x, w, None, None, scale)
    G.gemv(x, w, None, w_scale=scale, static_weight=True, gated=True)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = G.gemv(x, w, None, w_scale=scale, static_weight=True, gated=True)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)


@pytest.mark.parametrize("shape", [(1, 64), (2, 1, 64)])
def test_dense_method_gated_routes_to_gemv(monkeypatch, shape):
    """DenseLinearMethod.apply_gated's gemv branch (forced on here, CUDA-only in service): [..., I] with the
    leading dims kept, the gated kernel's bits; declined where the gemv does not apply (3 rows)."""
    dev = device()
    layer = _Layer((torch.randn(48, 64, device=dev) / 8).bfloat16())
    layer.bias = None
    monkeypatch.setattr(linear_method, "use_gemv", gemv_applies)
    x = torch.randn(*shape, device=dev).bfloat16()
    got = DenseLinearMethod().apply_gated(layer, x, None)
    assert got.shape == (*shape[:-1], 24)
    assert torch.equal(got.reshape(-1, 24), _unfused(x.reshape(-1, 64), layer.weight, None, None))
    assert DenseLinearMethod().apply_gated(layer, torch.randn(3, 64, device=dev).bfloat16(), None) is None


def test_w8a16_gated_gemv_routes_like_w8a16_linear():
    """int8_cuda.w8a16_gated_gemv (Int8WeightOnlyMethod.apply_gated's kernel call) takes the rows the "gemv"
    backend takes: 1-2 rows of bf16 / f16 with K % 16 == 0, the gated kernel's bits; None otherwise."""
    from deepserve.quant import int8_cuda

    dev = device()
    w = torch.randint(-127, 128, (48, 64), dtype=torch.int8, device=dev)
    scale = torch.rand(48, device=dev) / 50 + 1e-3
    x = torch.randn(2, 64, device=dev).bfloat16()
    got = int8_cuda.w8a16_gated_gemv(x, w, scale, None)
    assert torch.equal(got, _unfused(x, w, None, None, scale))
    assert int8_cuda.w8a16_gated_gemv(torch.randn(3, 64, device=dev).bfloat16(), w, scale, None) is None
    assert int8_cuda.w8a16_gated_gemv(x.float(), w, scale, None) is None
    assert int8_cuda.w8a16_gated_gemv(x[:, :40], w[:, :40].contiguous(), scale, None) is None
