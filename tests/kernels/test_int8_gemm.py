"""W8A8 GEMM (Triton, epilogue fused) and the int32 epilogue of the torch._int_mm path, against
their references; the CUDA dispatch `deepserve.quant.int8_cuda.w8a8_linear` with both backends.

Accumulation is exact in int32 on both sides, and the float32 epilogue runs in the reference's
order, so without split-K the result is bit-exact; split-K sums float32 partials (one rounding per
split, relative 2^-24 of the partials), and a 16-bit output can then differ by one ulp where that
moves a value across a rounding boundary (relative 2^-7 for bf16, 2^-10 for f16, at most).
"""

import pytest
import torch

from deepserve.kernels.int8_gemm import CONFIGS, GemmConfig, int8_gemm_config, pick_split_k
from deepserve.quant.int8 import quantize_per_channel_ref, quantize_per_token_ref
from tests.kernels.interpret import INTERPRET, device, load_kernel_module
from tests.kernels.launches import record_launches
from tests.kernels.triton36 import triton_3_6_semantics

G = load_kernel_module("int8_gemm")
E = load_kernel_module("int8_epilogue")
TINY = [GemmConfig(16, 32, 32, group_m=1, num_stages=1), GemmConfig(16, 16, 32, split_k=3, num_stages=1),
        GemmConfig(32, 64, 64, group_m=2, num_stages=1)]


def _operands(m, n, k, dev, bias=True):
    x_q = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=dev)
    w_q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=dev)
    x_s, w_s = torch.rand(m, device=dev) / 100 + 1e-4, torch.rand(n, device=dev) / 100 + 1e-4
    return x_q, x_s, w_q, w_s, (torch.randn(n, device=dev) if bias else None)


def _assert_close(got, want, split):
    if split == 1 and got.dtype == torch.float32:
        assert torch.equal(got, want)
        return
    rtol = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 2.0 ** -20}[got.dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize("m,n,k", [(1, 40, 96), (5, 33, 70), (33, 70, 200)])
@pytest.mark.parametrize("cfg", TINY, ids=["plain", "split3", "grouped"])
@pytest.mark.parametrize("bias", [True, False])
def test_triton_gemm_matches_reference(m, n, k, cfg, bias):
    ops = _operands(m, n, k, device(), bias)
    _assert_close(G.int8_gemm(*ops, torch.float32, cfg), G.int8_gemm_ref(*ops, torch.float32), cfg.split_k)


@pytest.mark.skipif(not INTERPRET, reason="models Triton 3.6 in the interpreter")
@pytest.mark.parametrize("m", [1, 17, 300])  # one per entry of the tile table
def test_triton_gemm_builds_with_triton_3_6_dot(monkeypatch, m):
    """Triton 3.6's tl.dot defaults out_dtype to float32 and asserts the accumulator has it: the
    int32 accumulator must be named (a GPU run failed to compile at every M without it)."""
    triton_3_6_semantics(monkeypatch)
    ops = _operands(m, 24, 64, device())
    cfg = int8_gemm_config(m, 24, 64, 132)._replace(block_k=32, num_stages=1)  # small K tile: fast
    _assert_close(G.int8_gemm(*ops, torch.float32, cfg), G.int8_gemm_ref(*ops, torch.float32), cfg.split_k)


@pytest.mark.parametrize("m,n,k", [(1, 40, 96), (5, 33, 160), (33, 70, 192), (7, 24, 208)])  # K % 16 == 0: TMA
# rows; 208 with split3's 32-column boxes: splits of 96, 96, 16 columns, the last box 16 past K
@pytest.mark.parametrize("cfg", TINY, ids=["plain", "split3", "grouped"])
@pytest.mark.parametrize("bias", [True, False])
def test_tma_gemm_matches_pointer_kernel_and_reference(monkeypatch, m, n, k, cfg, bias):
    """The TMA variant takes the same configs and gives the pointer kernel's bits (same int32 sums,
    same epilogue), also where boxes run past M, N and the last split's K."""
    ops = _operands(m, n, k, device(), bias)
    spy = record_launches(monkeypatch, G, "_int8_gemm_tma_kernel")["_int8_gemm_tma_kernel"]
    got = G.int8_gemm(*ops, torch.float32, cfg._replace(tma=True))
    assert len(spy.launches) == 1
    assert torch.equal(got, G.int8_gemm(*ops, torch.float32, cfg))
    _assert_close(got, G.int8_gemm_ref(*ops, torch.float32), cfg.split_k)


@pytest.mark.parametrize("bias", [True, False])
def test_empty_k_gives_the_bias(bias):
    """K = 0: every product is 0, so the output is the bias (or zeros) in out_dtype, any config."""
    x_q, x_s, w_q, w_s, b = _operands(3, 5, 0, device(), bias)
    for cfg in (None, TINY[1]):
        got = G.int8_gemm(x_q, x_s, w_q, w_s, b, torch.float32, cfg)
        assert torch.equal(got, (b if bias else torch.zeros(5, device=device())).expand(3, 5))


def _split_partials_sum(ops, cfg, out_dtype):
    """The split-K result built by hand: each split's K range as its own unsplit float32 GEMM (bias on
    split 0 only: the kernel's partials, bit for bit), summed in split order in float32, rounded once."""
    x_q, x_s, w_q, w_s, bias = ops
    k = x_q.shape[1]
    step = -(-(-(-k // cfg.split_k)) // cfg.block_k) * cfg.block_k  # the launch's k_per_split
    one = cfg._replace(split_k=1, persistent=False)
    total = None
    for start in range(0, k, step):
        part = G.int8_gemm(x_q[:, start:start + step], x_s, w_q[:, start:start + step], w_s,
                           bias if start == 0 else None, torch.float32, one)
        total = part if total is None else total + part
    return total.to(out_dtype)


@pytest.mark.parametrize("tma", [False, True], ids=["pointer", "tma"])
@pytest.mark.parametrize("out_dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    INTERPRET, reason="the Triton interpreter rounds float32 -> bf16 by truncation, the GPU to nearest"))])
@pytest.mark.parametrize("m,n,k,splits", [(20, 48, 224, 3), (3, 40, 96, 3), (9, 40, 64, 2)])  # 64: 3 asked, 2 fit
def test_split_k_sums_partials_in_the_kernel(monkeypatch, tma, out_dtype, m, n, k, splits):
    """Split-K finishes in the GEMM: the last split of each tile stores ws[0] + ws[1] + ... in split
    order (bits of the hand-built sum), one launch and no sum or cast kernel after it, and every tile's
    arrival counter is back at 0 after the launch."""
    ops = _operands(m, n, k, device())
    cfg = GemmConfig(16, 16, 32, split_k=3, group_m=2, num_stages=1, tma=tma)
    workspaces = []
    real = G.split_k_workspace
    monkeypatch.setattr(G, "split_k_workspace", lambda *a: workspaces.append(real(*a)) or workspaces[-1])
    kernel = "_int8_gemm_tma_kernel" if tma else "_int8_gemm_kernel"
    spy = record_launches(monkeypatch, G, kernel)[kernel]
    got = G.int8_gemm(*ops, out_dtype, cfg)
    (ws, locks), = workspaces
    assert len(spy.launches) == 1 and ws.shape[0] == splits and locks.numel() == -(-n // 16) * -(-m // 16)
    assert torch.equal(locks, torch.zeros_like(locks))
    assert got.dtype == out_dtype and torch.equal(got, _split_partials_sum(ops, cfg, out_dtype))


@pytest.mark.parametrize("m,n,k", [(1, 40, 96), (33, 70, 208), (40, 96, 64)])
@pytest.mark.parametrize("programs", [1, 3, 132])
def test_persistent_tma_gemm_matches_reference(monkeypatch, m, n, k, programs):
    """The persistent launch (at most `programs` programs walking the tiles: 1 walks them all, 3 leaves a
    ragged last round) gives the one-tile-per-program kernel's bits; a split-K config runs unsplit."""
    monkeypatch.setattr(G, "num_sms", lambda device: programs)
    ops = _operands(m, n, k, device())
    rec = record_launches(monkeypatch, G, "_int8_gemm_tma_kernel")["_int8_gemm_tma_kernel"]
    cfg = GemmConfig(16, 32, 32, split_k=3, group_m=2, num_stages=1, tma=True, persistent=True)
    got = G.int8_gemm(*ops, torch.float32, cfg)
    tiles = -(-m // 16) * -(-n // 32)
    assert [(grid, kw["PERSISTENT"]) for grid, kw in rec.launches] == [((min(tiles, programs), 1), True)]
    assert torch.equal(got, G.int8_gemm(*ops, torch.float32, cfg._replace(tma=False, persistent=False, split_k=1)))
    assert torch.equal(got, G.int8_gemm_ref(*ops, torch.float32))


def test_tma_gemm_strided_rows(monkeypatch):
    """x_q rows strided (a view into wider rows, stride 96): the descriptor takes the stride."""
    x_q, x_s, w_q, w_s, bias = _operands(9, 40, 64, device())
    wide = torch.zeros(9, 96, dtype=torch.int8, device=device())
    wide[:, :64] = x_q
    spy = record_launches(monkeypatch, G, "_int8_gemm_tma_kernel")["_int8_gemm_tma_kernel"]
    got = G.int8_gemm(wide[:, :64], x_s, w_q, w_s, bias, torch.float32, TINY[0]._replace(tma=True))
    assert len(spy.launches) == 1
    assert torch.equal(got, G.int8_gemm_ref(x_q, x_s, w_q, w_s, bias, torch.float32))


def test_tma_only_on_sm90_and_sm100_families(monkeypatch):
    """The shipped TMA tiles need ~192 KB of shared memory: H100/H200 (9.0), B200 (10.0) have it, consumer
    Blackwell (12.0) and Ampere (8.x) do not, and ROCm has no TMA."""
    for capability, want in (((9, 0), True), ((10, 0), True), ((12, 0), False), ((8, 0), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None, c=capability: c)
        G._tma_device.cache_clear()
        assert G._tma_device(0) is want, capability
    monkeypatch.setattr(torch.version, "hip", "6.2")
    G._tma_device.cache_clear()
    assert G._tma_device(0) is False
    G._tma_device.cache_clear()


def test_tma_gemm_falls_back_on_unaligned_rows(monkeypatch):
    """K = 70 int8 rows are not 16-byte strided: TMA cannot describe them, the pointer kernel runs."""
    ops = _operands(5, 33, 70, device())
    spy = record_launches(monkeypatch, G, "_int8_gemm_tma_kernel")["_int8_gemm_tma_kernel"]
    got = G.int8_gemm(*ops, torch.float32, TINY[0]._replace(tma=True))
    assert not spy.launches
    assert torch.equal(got, G.int8_gemm_ref(*ops, torch.float32))


@pytest.mark.skipif(not INTERPRET, reason="models Triton 3.6 in the interpreter")
def test_tma_gemm_builds_with_triton_3_6_dot(monkeypatch):
    triton_3_6_semantics(monkeypatch)
    ops = _operands(17, 24, 64, device())
    got = G.int8_gemm(*ops, torch.float32, GemmConfig(16, 16, 32, num_stages=1, tma=True))
    assert torch.equal(got, G.int8_gemm_ref(*ops, torch.float32))


def test_triton_gemm_strided_rows_and_default_config():
    x_q, x_s, w_q, w_s, bias = _operands(5, 48, 64, device())
    wide = torch.zeros(5, 80, dtype=torch.int8, device=device())
    wide[:, :64] = x_q
    want = G.int8_gemm_ref(x_q, x_s, w_q, w_s, bias, torch.float16)
    _assert_close(G.int8_gemm(wide[:, :64], x_s, w_q, w_s, bias, torch.float16), want, 4)


@pytest.mark.parametrize("m,n", [(1, 40), (33, 70)])
def test_epilogue_matches_reference(m, n):
    acc = torch.randint(-2 ** 20, 2 ** 20, (m + 2, n), dtype=torch.int32, device=device())[1:-1]  # strided view
    x_s, w_s, bias = torch.rand(m, device=device()), torch.rand(n, device=device()), torch.randn(n, device=device())
    for b in (bias, None):
        assert torch.equal(E.int8_epilogue(acc, x_s, w_s, b, torch.float32),
                           E.int8_epilogue_ref(acc, x_s, w_s, b, torch.float32))


@pytest.mark.parametrize("backend", ["triton", "int_mm"])
@pytest.mark.parametrize("m", [1, 5, 33])
def test_w8a8_linear_backends_match_float(backend, m):
    from deepserve.quant.int8_cuda import w8a8_linear

    dev = device()
    x, w, bias = torch.randn(m, 96, device=dev), torch.randn(64, 96, device=dev), torch.randn(64, device=dev)
    w_q, w_s, _ = quantize_per_channel_ref(w)
    got = w8a8_linear(x, w_q.contiguous(), w_s, bias, backend=backend)
    x_q, x_s = quantize_per_token_ref(x)
    torch.testing.assert_close(got, G.int8_gemm_ref(x_q, x_s, w_q, w_s, bias, torch.float32),
                               rtol=2.0 ** -20, atol=1e-6)
    assert (got - torch.nn.functional.linear(x, w, bias)).norm() / got.norm() < 2e-2


def test_bad_inputs():
    x_q, x_s, w_q, w_s, bias = _operands(3, 16, 32, device())
    for args in [(x_q.float(), x_s, w_q, w_s), (x_q, x_s, w_q[:, :16], w_s), (x_q, x_s[:2], w_q, w_s),
                 (x_q, x_s, w_q, w_s.double()), (x_q, x_s, w_q.t().contiguous().t(), w_s)]:
        with pytest.raises(ValueError):
            G.int8_gemm(*args)
    with pytest.raises(ValueError):
        E.int8_epilogue(torch.zeros(2, 3, device=device()), x_s[:2], w_s[:3], None, torch.float32)
    from deepserve.quant.int8_cuda import w8a8_linear
    with pytest.raises(ValueError, match="backend"):
        w8a8_linear(torch.randn(2, 32, device=device()), w_q, w_s, None, backend="cutlass")
    assert G.int8_gemm(x_q[:0], x_s[:0], w_q, w_s).shape == (0, 16)


def test_config_table():
    assert int8_gemm_config(1, 3584, 3584, 132).block_m == CONFIGS[16].block_m
    assert int8_gemm_config(4096, 3584, 3584, 132) == CONFIGS[1 << 62]
    decode = CONFIGS[16]
    assert pick_split_k(decode, 1, 37888, 3584, 132) == 1  # 592 tiles cover the SMs
    assert 1 < pick_split_k(decode, 1, 3584, 18944, 132) <= decode.split_k  # 56 tiles, long K


def test_shape_table_overrides_only_its_shape_and_bucket():
    """SHAPE_CONFIGS' entry runs its (N, K) in its M bucket; other buckets and shapes keep CONFIGS."""
    from deepserve.kernels.int8_gemm import SHAPE_CONFIGS

    (n, k), table = next(iter(SHAPE_CONFIGS.items()))
    bound = min(table)
    below = max(b for b in CONFIGS if b < bound)
    assert int8_gemm_config(bound, n, k, 132)[:3] == table[bound][:3]
    assert int8_gemm_config(below + 1, n, k, 132)[:3] == table[bound][:3]
    assert int8_gemm_config(below, n, k, 132)[:3] == CONFIGS[below][:3]  # the smaller bucket: the M table
    assert int8_gemm_config(bound + 1, n, k, 132)[:3] == CONFIGS[min(b for b in CONFIGS if b > bound)][:3]
    assert int8_gemm_config(bound, n + 16, k, 132)[:3] == CONFIGS[bound][:3]  # another shape


# ---- GPU, qwen-7b linear shapes -------------------------------------------------------------------

SHAPES = [(3584, 4608), (3584, 37888), (3584, 3584), (18944, 3584)]  # (K, N): qkv, gate_up, o, down


@pytest.mark.gpu
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("m", [256, 8192])
@pytest.mark.parametrize("cfg", [GemmConfig(128, 128, 128, num_warps=8, num_stages=4, tma=True),
                                 GemmConfig(128, 64, 128, split_k=4, num_warps=8, num_stages=4, tma=True),
                                 GemmConfig(256, 128, 128, num_warps=8, num_stages=3, tma=True),
                                 GemmConfig(64, 128, 128, num_warps=4, num_stages=4, tma=True, persistent=True)],
                         ids=["128x128", "128x64-split", "256x128", "64x128-persistent"])
def test_gpu_tma_gemm_real_shapes(monkeypatch, k, n, m, cfg):
    """The TMA kernel at qwen-7b's shapes (it must be the kernel that ran): bit-equal to the pointer kernel
    with the same blocks."""
    x_q, x_s, w_q, w_s, bias = _operands(m, n, k, "cuda")
    spy = record_launches(monkeypatch, G, "_int8_gemm_tma_kernel")["_int8_gemm_tma_kernel"]
    got = G.int8_gemm(x_q, x_s, w_q, w_s, bias, torch.bfloat16, cfg)
    assert len(spy.launches) == 1
    monkeypatch.undo()
    pointer = cfg._replace(tma=False, persistent=False, split_k=1 if cfg.persistent else cfg.split_k)
    assert torch.equal(got, G.int8_gemm(x_q, x_s, w_q, w_s, bias, torch.bfloat16, pointer))
    _assert_close(got, G.int8_gemm_ref(x_q, x_s, w_q, w_s, bias, torch.bfloat16), pointer.split_k)


@pytest.mark.gpu
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("m", [1, 16, 256, 4096])
@pytest.mark.parametrize("backend", ["triton", "int_mm"])
def test_gpu_real_shapes(k, n, m, backend):
    from deepserve.quant.int8_cuda import w8a8_linear

    x = torch.randn(m, k, device="cuda").bfloat16()
    w_q, w_s, _ = quantize_per_channel_ref(torch.randn(n, k, device="cuda") / k ** 0.5)
    bias = torch.randn(n, device="cuda").bfloat16()
    got = w8a8_linear(x, w_q.contiguous(), w_s, bias, backend=backend)
    x_q, x_s = quantize_per_token_ref(x)
    _assert_close(got, G.int8_gemm_ref(x_q, x_s, w_q, w_s, bias, torch.bfloat16), split=2)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [CONFIGS[256], GemmConfig(64, 128, 128, split_k=4, num_warps=4, num_stages=4, tma=True),
                                 GemmConfig(64, 64, 128, split_k=2, num_warps=4, num_stages=4)],
                         ids=["table-256", "split4-tma", "split2-pointer"])
def test_gpu_split_k_in_kernel_is_race_free(monkeypatch, cfg):
    """qwen-7b's o and down projections at M = 256 (the decode step's split linears), 30 launches with new
    activation scales each time into NaN-filled workspaces and outputs: each gives the bits of the
    hand-built sum of its splits. A split that summed before another's partial was stored would read
    NaN (or an old scale's partial), a tile never stored would stay NaN."""
    real = G.split_k_workspace

    def poisoned(*args):
        ws, locks = real(*args)
        return ws.fill_(float("nan")), locks

    for k, n in ((3584, 3584), (18944, 3584)):
        x_q, x_s, w_q, w_s, bias = _operands(256, n, k, "cuda")
        for i in range(30):
            ops = (x_q, x_s * (1 + i / 64), w_q, w_s, bias)
            want = _split_partials_sum(ops, cfg, torch.bfloat16)
            monkeypatch.setattr(G, "split_k_workspace", poisoned)
            got = G.int8_gemm(*ops, torch.bfloat16, cfg)
            monkeypatch.setattr(G, "split_k_workspace", real)
            assert torch.equal(got, want), i
            got.fill_(float("nan"))  # the next launch's output block, if the allocator hands it back


@pytest.mark.gpu
def test_gpu_split_k_in_a_cuda_graph():
    """A split launch captured in a CUDA graph (counters zeroed and reset inside it) replays with new
    inputs to the hand-built sum, twice."""
    cfg = CONFIGS[256]
    x_q, x_s, w_q, w_s, bias = _operands(256, 3584, 18944, "cuda")
    G.int8_gemm(x_q, x_s, w_q, w_s, bias, torch.bfloat16, cfg)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = G.int8_gemm(x_q, x_s, w_q, w_s, bias, torch.bfloat16, cfg)
    for i in range(2):
        x_q.copy_(torch.randint(-127, 128, x_q.shape, dtype=torch.int8, device="cuda"))
        x_s.mul_(1.5)
        graph.replay()
        assert torch.equal(out, _split_partials_sum((x_q, x_s, w_q, w_s, bias), cfg, torch.bfloat16)), i
