"""The warp-specialised Gluon W8A8 GEMM (`kernels/int8_gemm_ws.py`) against `int8_gemm_ref`: the same bits
(exact int32 sums, the reference's float32 epilogue order, one rounding to out_dtype), on an sm_90 GPU.

Gluon kernels have no CPU interpreter, so the CPU tests cover what runs before a launch: where the kernel
is available, the argument checks (ValueError before any launch), the config table and its checks, and
the host-side layouts and register budget.
"""

import pytest
import torch

from deepserve.kernels import int8_gemm_ws as WS
from deepserve.kernels.int8_gemm import int8_gemm_ref
from deepserve.kernels.int8_gemm_ws import WS_CONFIGS, WsConfig, int8_gemm_ws, ws_available, ws_config
from tests.kernels.launches import record_launches

HAS_WS = torch.cuda.is_available() and ws_available(torch.device("cuda"))
needs_ws = pytest.mark.skipif(not HAS_WS, reason="needs Gluon and an sm_90 (H100 / H200) GPU")
needs_gluon = pytest.mark.skipif(WS.gl is None, reason="this Triton has no Gluon")
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _operands(m, n, k, dev, bias=True):
    x_q = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=dev)
    w_q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=dev)
    x_s, w_s = torch.rand(m, device=dev) / 100 + 1e-4, torch.rand(n, device=dev) / 100 + 1e-4
    return x_q, x_s, w_q, w_s, (torch.randn(n, device=dev) if bias else None)


def _assert_bits(ops, cfg=None, out_dtypes=OUT_DTYPES):
    """int8_gemm_ws's output equals the reference's, bit for bit, for each out_dtype (the reference's float32
    values rounded once: `int8_gemm_ref` with out_dtype is exactly that)."""
    want = int8_gemm_ref(*ops, torch.float32)
    for dtype in out_dtypes:
        got = int8_gemm_ws(*ops, dtype, cfg)
        assert got.dtype == dtype and got.shape == want.shape
        assert torch.equal(got, want.to(dtype)), dtype


# ---- CPU: availability, checks, table ------------------------------------------------------------------

def test_not_available_on_cpu():
    assert ws_available(torch.device("cpu")) is False
    assert ws_available("cpu") is False


def test_available_only_on_sm90_cuda(monkeypatch):
    """Compute capability exactly 9.0 (H100 / H200): not 9.x others, not Blackwell, not Ampere, not ROCm."""
    for capability, want in (((9, 0), True), ((10, 0), False), ((12, 0), False), ((8, 0), False), ((8, 9), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None, c=capability: c)
        WS._sm90.cache_clear()
        assert WS._sm90(0) is want, capability
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    monkeypatch.setattr(torch.version, "hip", "6.2")
    WS._sm90.cache_clear()
    assert WS._sm90(0) is False
    WS._sm90.cache_clear()


@pytest.mark.parametrize("bad, match", [
    (lambda o: (o[0].float(), *o[1:]), "x must be"),
    (lambda o: (o[0], o[1], o[2][:, :16], *o[3:]), "weight must be"),
    (lambda o: (o[0], o[1], o[2].t().contiguous().t(), *o[3:]), "weight must be"),
    (lambda o: (o[0], o[1][:2], *o[2:]), "x_scale must be"),
    (lambda o: (o[0], o[1].double(), *o[2:]), "x_scale must be"),
    (lambda o: (*o[:3], o[3].double(), o[4]), "weight scale must be"),
    (lambda o: (*o[:4], o[4][:3]), "bias must be"),
], ids=["x-dtype", "w-k", "w-stride", "x-scale-shape", "x-scale-dtype", "w-scale-dtype", "bias-shape"])
def test_bad_operands_raise_before_launch(bad, match):
    ops = _operands(3, 32, 64, "cpu")
    with pytest.raises(ValueError, match=match):
        int8_gemm_ws(*bad(ops))


def test_unaligned_rows_raise():
    """TMA wants 16-byte row strides: K = 200 int8 rows are not (K = 144 are), nor a strided view."""
    with pytest.raises(ValueError, match="16-byte aligned"):
        int8_gemm_ws(*_operands(3, 32, 200, "cpu"))
    x_q, x_s, w_q, w_s, bias = _operands(3, 32, 64, "cpu")
    wide = torch.zeros(3, 72, dtype=torch.int8)
    with pytest.raises(ValueError, match="x_q's base address and row stride"):
        int8_gemm_ws(wide[:, :64], x_s, w_q, w_s, bias)


def test_bad_out_dtype_raises():
    with pytest.raises(ValueError, match="out_dtype"):
        int8_gemm_ws(*_operands(3, 32, 64, "cpu"), torch.int8)


@pytest.mark.parametrize("cfg, match", [
    (WsConfig(128, 128, 128, 4, num_warps=2), "num_warps 4 or 8"),
    (WsConfig(96, 128, 128, 4, num_warps=4), "block_m 64, 128 or 256"),
    (WsConfig(128, 100, 128, 4, num_warps=4), "block_n a multiple of 16"),
    (WsConfig(128, 128, 256, 4, num_warps=4), "block_k 32, 64 or 128"),
    (WsConfig(128, 256, 128, 4, num_warps=4), "at most 128 registers"),
    (WsConfig(128, 256, 128, 5, num_warps=8), "shared memory"),
    (WsConfig(128, 128, 128, 1, num_warps=4), "2 or more stages"),
], ids=["warps", "block-m", "block-n", "block-k", "accumulator", "smem", "stages"])
def test_bad_configs_raise(cfg, match):
    with pytest.raises(ValueError, match=match):
        int8_gemm_ws(*_operands(3, 32, 64, "cpu"), torch.bfloat16, cfg)


def test_not_available_raises_runtime_error_after_checks():
    with pytest.raises(RuntimeError, match="sm_90"):
        int8_gemm_ws(*_operands(3, 32, 64, "cpu"))


def test_empty_shapes_need_no_launch():
    x_q, x_s, w_q, w_s, bias = _operands(3, 5, 64, "cpu")
    assert int8_gemm_ws(x_q[:0], x_s[:0], w_q, w_s, bias).shape == (0, 5)
    got = int8_gemm_ws(x_q[:, :0], x_s, w_q[:, :0], w_s, bias, torch.float32)
    assert torch.equal(got, bias.expand(3, 5))


def test_config_table():
    """M <= 256 takes the first entry, larger M the last; every entry passes the checks and fits."""
    small, large = WS_CONFIGS[256], WS_CONFIGS[1 << 62]
    assert [ws_config(m) for m in (1, 17, 256, 257, 2048, 8192)] == [small] * 3 + [large] * 3
    for cfg in WS_CONFIGS.values():
        WS.check_config(cfg)
        assert WS.ws_smem_bytes(cfg) <= WS.SMEM_LIMIT
    assert WS.ws_smem_bytes(small) == 4 * (256 * 128 + 16) and WS.ws_smem_bytes(large) == 4 * (384 * 128 + 16)


def test_register_budget():
    """12 warps (8 consumers + the producer's warpgroup) share 64 K registers: 168 each at launch; 8 warps
    may take the 255 maximum."""
    assert WS.max_regs(8) == 168 and WS.max_regs(4) == 255


@needs_gluon
@pytest.mark.parametrize("bm, bn, warps, want_warps, want_n", [
    (128, 128, 4, [4, 1], 128), (128, 256, 8, [4, 2], 128), (128, 128, 8, [8, 1], 128),
    (64, 128, 8, [4, 2], 64), (64, 192, 4, [4, 1], 192), (256, 128, 8, [8, 1], 128), (128, 64, 4, [4, 1], 64)])
def test_acc_layout(bm, bn, warps, want_warps, want_n):
    layout = WS.acc_layout(bm, bn, warps)
    assert layout.warps_per_cta == want_warps and layout.instr_shape == [16, want_n, 32]


@needs_gluon
def test_store_layout():
    """Coalesced: 16-byte vectors, a warp along N first; otherwise the accumulator's layout (no conversion)."""
    cfg = WsConfig(128, 256, 128, 4, num_warps=8, coalesced_store=True)
    bf16, f32 = WS.store_layout(cfg, 2), WS.store_layout(cfg, 4)
    assert bf16.size_per_thread == [1, 8] and bf16.threads_per_warp == [1, 32] and bf16.warps_per_cta == [8, 1]
    assert f32.size_per_thread == [1, 4] and f32.threads_per_warp == [1, 32]
    assert WS.store_layout(cfg._replace(coalesced_store=False), 2) == WS.acc_layout(128, 256, 8)


# ---- GPU (sm_90) --------------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_ws
@pytest.mark.parametrize("k", [144, 3584])
@pytest.mark.parametrize("n", [64, 200, 4608])
@pytest.mark.parametrize("m", [1, 17, 128, 256, 300, 2048])
@pytest.mark.parametrize("bias", [True, False])
def test_gpu_bits_equal_reference(m, n, k, bias):
    """The table's config for M (128-row tiles past M, N and K at the edges), each out_dtype."""
    _assert_bits(_operands(m, n, k, "cuda", bias))


SWEEP = [WsConfig(64, 128, 128, 4, num_warps=4), WsConfig(64, 64, 64, 6, num_warps=4),
         WsConfig(128, 128, 64, 6, num_warps=8), WsConfig(64, 256, 128, 3, num_warps=8),
         WsConfig(128, 128, 128, 4, num_warps=4, persistent=True),
         WsConfig(128, 256, 128, 4, num_warps=8, persistent=True),
         WsConfig(128, 128, 128, 4, num_warps=4, coalesced_store=True),
         WsConfig(128, 256, 128, 4, num_warps=8, coalesced_store=True)]


@pytest.mark.gpu
@needs_ws
@pytest.mark.parametrize("cfg", list(WS_CONFIGS.values()) + SWEEP, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("m,n,k", [(300, 4608, 3584), (17, 200, 144)])
def test_gpu_every_config(monkeypatch, cfg, m, n, k):
    """Every table entry and a few others (narrow tiles, 64-deep K, 6 stages, persistent, coalesced stores):
    the reference's bits; a persistent launch has at most one CTA per SM. The coalesced store's f32 tile of
    128 x 256 does not fit beside 4 stages: that one runs bf16 and f16 only."""
    ops = _operands(m, n, k, "cuda")
    rec = record_launches(monkeypatch, WS, "_int8_gemm_ws_kernel")["_int8_gemm_ws_kernel"]
    wide_f32 = cfg.coalesced_store and cfg.block_n == 256
    _assert_bits(ops, cfg, OUT_DTYPES[:2] if wide_f32 else OUT_DTYPES)
    tiles = -(-m // cfg.block_m) * -(-n // cfg.block_n)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert {grid for grid, _ in rec.launches} == {(min(tiles, sms) if cfg.persistent else tiles,)}


@pytest.mark.gpu
@needs_ws
@pytest.mark.parametrize("m", [256, 2048])
def test_gpu_cuda_graph_replay(m):
    """Captured in a CUDA graph (no host synchronisation in the launch), replayed with new activations and
    scales: the reference's bits each time."""
    x_q, x_s, w_q, w_s, bias = _operands(m, 4608, 3584, "cuda")
    int8_gemm_ws(x_q, x_s, w_q, w_s, bias)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = int8_gemm_ws(x_q, x_s, w_q, w_s, bias)
    for i in range(2):
        x_q.copy_(torch.randint(-127, 128, x_q.shape, dtype=torch.int8, device="cuda"))
        x_s.mul_(1.5)
        out.fill_(float("nan"))
        graph.replay()
        assert torch.equal(out, int8_gemm_ref(x_q, x_s, w_q, w_s, bias, torch.bfloat16)), i


@pytest.mark.gpu
@needs_ws
def test_gpu_bits_equal_int8_gemm_at_qwen_shapes():
    """qwen-7b's four linears at M = 256: the same bits as the Triton kernel run unsplit."""
    from deepserve.kernels.int8_gemm import int8_gemm, int8_gemm_config

    for n, k in ((4608, 3584), (3584, 3584), (37888, 3584), (3584, 18944)):
        ops = _operands(256, n, k, "cuda", bias=n == 4608)
        cfg = int8_gemm_config(256, n, k, 132)._replace(split_k=1)
        assert torch.equal(int8_gemm_ws(*ops), int8_gemm(*ops, torch.bfloat16, cfg)), (n, k)


# ---- the shape table and w8a8_gemm's dispatch ----------------------------------------------------------

def test_shape_table_buckets():
    """qwen-7b's down and o take the warp-specialised kernel only in the measured buckets; other shapes never."""
    down, o = WS.WS_SHAPE_CONFIGS[(3584, 18944)], WS.WS_SHAPE_CONFIGS[(3584, 3584)]
    assert [WS.ws_shape_config(m, 3584, 18944) for m in (1, 192, 193, 256, 257, 1024, 1025, 8192)] == \
        [None, None, down[256], down[256], None, None, down[1 << 62], down[1 << 62]]
    assert [WS.ws_shape_config(m, 3584, 3584) for m in (64, 192, 200, 256, 257, 8192)] == \
        [None, None, o[256], o[256], None, None]
    assert WS.ws_shape_config(256, 4608, 3584) is None and WS.ws_shape_config(256, 37888, 3584) is None
    for table in WS.WS_SHAPE_CONFIGS.values():
        for cfg in filter(None, table.values()):
            WS.check_config(cfg)


def test_w8a8_gemm_keeps_int8_gemm_off_sm90():
    """Where the warp-specialised kernel cannot run (here: a CPU tensor), a table shape stays on int8_gemm."""
    from deepserve.quant.int8_cuda import ws_linear_config

    x_q, _, w_q, _, _ = _operands(256, 3584, 3584, "cpu")
    assert ws_linear_config(x_q, w_q) is None


@pytest.mark.gpu
@needs_ws
@pytest.mark.parametrize("m, n, k, ws", [(256, 3584, 18944, True), (2048, 3584, 18944, True),
                                         (256, 3584, 3584, True), (128, 3584, 3584, False),
                                         (256, 4608, 3584, False)])
def test_gpu_w8a8_gemm_dispatch(monkeypatch, m, n, k, ws):
    """w8a8_gemm launches the warp-specialised kernel exactly for the table's (shape, M) and gives the
    reference's bits there (int8_gemm's own bits elsewhere: split-K may round partials once more)."""
    from deepserve.kernels import int8_gemm as G
    from deepserve.quant.int8_cuda import w8a8_gemm

    rec = record_launches(monkeypatch, WS, "_int8_gemm_ws_kernel")["_int8_gemm_ws_kernel"]
    ops = _operands(m, n, k, "cuda", bias=False)
    got = w8a8_gemm(*ops, torch.bfloat16)
    assert len(rec.launches) == (1 if ws else 0)
    want = int8_gemm_ref(*ops, torch.bfloat16) if ws else G.int8_gemm(*ops, torch.bfloat16)
    assert torch.equal(got, want)


# ---- int8_gemm_silu_ws: the gate_up GEMM with SiLU-and-mul epilogue ------------------------------------

def _gated(m, inter, k, dev):
    """Operands of a gated-layout gate_up: x_q [M, K], x_scale, w_g [2 I_pad, K], w_scale_g [2 I_pad]."""
    from deepserve.kernels.int8_gemm_silu import to_gated_layout

    x_q, x_s, w_q, w_s, _ = _operands(m, 2 * inter, k, dev, bias=False)
    return x_q, x_s, to_gated_layout(w_q), to_gated_layout(w_s)


def test_silu_config_checks():
    """One gated block per tile (block_n 128), no coalesced store, the scratch beside the ring in 227 KB:
    6 stages of 128 x 128 fit with a bf16 h (229,472 B) and not with a float32 one (262,240 B)."""
    WS.check_silu_config(WS.SILU_WS_CONFIG, torch.float32)
    six = WS.SILU_WS_CONFIG._replace(num_stages=6)
    WS.check_silu_config(six, torch.bfloat16)
    assert WS.silu_smem_bytes(six, torch.bfloat16) == 6 * (256 * 128 + 16) + 128 * 128 * 2
    with pytest.raises(ValueError, match="more than"):
        WS.check_silu_config(six, torch.float32)
    wide = WS.SILU_WS_CONFIG._replace(block_n=256, num_warps=8, num_stages=3)
    for bad in (wide, WS.SILU_WS_CONFIG._replace(coalesced_store=True)):
        with pytest.raises(ValueError, match="one gated block"):
            WS.check_silu_config(bad, torch.bfloat16)


def test_silu_ws_checks_and_cpu():
    """Bad operands raise ValueError before any launch (int8_gemm_silu's checks); a CPU device RuntimeError;
    empty shapes need no launch."""
    x_q, x_s, w_g, w_sg = _gated(3, 64, 64, "cpu")
    with pytest.raises(ValueError, match="gated-layout weight"):
        WS.int8_gemm_silu_ws(x_q, x_s, w_g, w_sg, 65)
    with pytest.raises(ValueError, match="out_dtype"):
        WS.int8_gemm_silu_ws(x_q, x_s, w_g, w_sg, 64, torch.int32)
    with pytest.raises(RuntimeError, match="sm_90"):
        WS.int8_gemm_silu_ws(x_q, x_s, w_g, w_sg, 64)
    h, part = WS.int8_gemm_silu_ws(x_q[:0], x_s[:0], w_g, w_sg, 64)
    assert h.shape == (0, 64) and part.shape == (0, 1)
    h, part = WS.int8_gemm_silu_ws(x_q[:, :0], x_s, w_g[:, :0], w_sg, 64)
    assert not h.any() and not part.any()


@pytest.mark.gpu
@needs_ws
@pytest.mark.parametrize("m", [1, 17, 256, 300])
@pytest.mark.parametrize("inter, k", [(64, 144), (200, 2048), (2816, 2048)])
@pytest.mark.parametrize("cfg", [WS.SILU_WS_CONFIG, WsConfig(64, 128, 128, 6, 4, persistent=True),
                                 WsConfig(128, 128, 128, 4, 8)], ids=lambda c: "-".join(map(str, c)))
def test_gpu_silu_ws_bits_equal_int8_gemm_silu(m, inter, k, cfg):
    """h and part_max bit for bit those of int8_gemm_silu (the Triton kernel), each out_dtype that fits."""
    from deepserve.kernels.int8_gemm_silu import int8_gemm_silu

    ops = _gated(m, inter, k, "cuda")
    for dtype in OUT_DTYPES:
        if WS.silu_smem_bytes(cfg, dtype) > WS.SMEM_LIMIT:
            continue
        want_h, want_part = int8_gemm_silu(*ops, inter, dtype)
        got_h, got_part = WS.int8_gemm_silu_ws(*ops, inter, dtype, cfg)
        assert torch.equal(got_h, want_h), dtype
        assert torch.equal(got_part, want_part), dtype


@pytest.mark.gpu
@needs_ws
def test_gpu_silu_ws_cuda_graph_replay():
    """Captured and replayed with new activations: int8_gemm_silu's bits each time (the persistent default)."""
    from deepserve.kernels.int8_gemm_silu import int8_gemm_silu

    x_q, x_s, w_g, w_sg = _gated(256, 2816, 2048, "cuda")
    WS.int8_gemm_silu_ws(x_q, x_s, w_g, w_sg, 2816)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        h, part = WS.int8_gemm_silu_ws(x_q, x_s, w_g, w_sg, 2816)
    for i in range(2):
        x_q.copy_(torch.randint(-127, 128, x_q.shape, dtype=torch.int8, device="cuda"))
        h.fill_(float("nan"))
        graph.replay()
        want_h, want_part = int8_gemm_silu(x_q, x_s, w_g, w_sg, 2816)
        assert torch.equal(h, want_h) and torch.equal(part, want_part), i


def test_silu_shape_table_and_cpu_dispatch():
    """qwen-7b's gated gate_up (2 I_pad = 37888, K = 3584) takes int8_gemm_silu_ws in the measured buckets only;
    off sm_90 (a CPU tensor) and where a float32 h's scratch would not fit, int8_gemm_silu stays."""
    from deepserve.quant.int8_cuda import ws_gate_up_config

    table = WS.SILU_WS_SHAPE_CONFIGS[(37888, 3584)]
    assert [WS.silu_ws_shape_config(m, 37888, 3584) for m in (192, 193, 256, 257, 1024, 1025, 8192)] == \
        [None, table[256], table[256], None, None, table[1 << 62], table[1 << 62]]
    assert WS.silu_ws_shape_config(256, 5632, 2048) is None
    for cfg in filter(None, table.values()):
        WS.check_silu_config(cfg, torch.bfloat16)
    x_q = torch.zeros(256, 3584, dtype=torch.int8)
    assert ws_gate_up_config(x_q, torch.zeros(37888, 3584, dtype=torch.int8), torch.bfloat16) is None


@pytest.mark.gpu
@needs_ws
@pytest.mark.parametrize("m, ws", [(256, True), (2048, True), (128, False)])
def test_gpu_gate_up_dispatch(monkeypatch, m, ws):
    """w8a8_gate_up_silu_quant at qwen-7b's gate_up launches the warp-specialised SiLU kernel exactly in the
    table's buckets (a float32 h never: its scratch does not fit beside 6 stages), with int8_gemm_silu's bits."""
    from deepserve.kernels.int8_gemm_silu import int8_gemm_silu, int8_quant_amax
    from deepserve.quant.int8_cuda import w8a8_gate_up_silu_quant

    ops = _gated(m, 18944, 3584, "cuda")
    for dtype, launched in ((torch.bfloat16, ws), (torch.float32, False)):
        rec = record_launches(monkeypatch, WS, "_int8_gemm_silu_ws_kernel")["_int8_gemm_silu_ws_kernel"]
        got = w8a8_gate_up_silu_quant(*ops, 18944, dtype)
        assert len(rec.launches) == int(launched), dtype
        want = int8_quant_amax(*int8_gemm_silu(*ops, 18944, dtype))
        assert torch.equal(got.q, want.q) and torch.equal(got.scale, want.scale), dtype
