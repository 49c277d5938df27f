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


@pytest.fixture
def fresh_sm90():
    """`_sm90`'s per-device cache emptied before and after the test (a failed assert leaves no stale entry)."""
    cached = WS._sm90  # the lru_cache itself, whatever a test patches in its place
    cached.cache_clear()
    yield
    cached.cache_clear()


def test_triton_version_gate(monkeypatch, fresh_sm90):
    """Only the Triton release the Gluon kernels are written against (3.6) runs them: 3.9 renamed two of its
    calls, older releases had another warp_specialize signature; elsewhere int8_gemm."""
    assert [WS.triton_tested(v) for v in ("3.6.0", "3.6.1+git0123abc", "3.9.0", "3.5.1", "4.6.0")] == \
        [True, True, False, False, False]
    if WS.gl is None:
        pytest.skip("this Triton has no Gluon: ws_available is False before the version matters")
    monkeypatch.setattr(WS, "_sm90", lambda index: True)
    for version, want in (("3.6.0", True), ("3.9.0", False)):
        monkeypatch.setattr(WS.triton, "__version__", version)
        assert ws_available("cuda:0") is want, version


def test_available_only_on_sm90_cuda(monkeypatch, fresh_sm90):
    """Compute capability exactly 9.0 (H100 / H200): not 9.x others, not Blackwell, not Ampere, not ROCm."""
    for capability, want in (((9, 0), True), ((10, 0), False), ((12, 0), False), ((8, 0), False), ((8, 9), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None, c=capability: c)
        WS._sm90.cache_clear()
        assert WS._sm90(0) is want, capability
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    monkeypatch.setattr(torch.version, "hip", "6.2")
    WS._sm90.cache_clear()
    assert WS._sm90(0) is False


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


def test_coalesced_store_scratch_counted():
    """The coalesced store's conversion scratch counts against shared memory: a 128 x 256 tile with 4 stages
    fits with a bf16 output (16 KB of scratch) and not with a float32 one (64 KB): ValueError, not a failed
    launch."""
    cfg = WsConfig(128, 256, 128, 4, num_warps=8, coalesced_store=True)
    WS.check_config(cfg, torch.bfloat16)
    assert WS.store_scratch_bytes(cfg, torch.bfloat16) == 16384 and WS.store_scratch_bytes(cfg, torch.float32) == 65536
    assert WS.store_scratch_bytes(cfg._replace(coalesced_store=False), torch.float32) == 0
    with pytest.raises(ValueError, match="shared memory"):
        WS.check_config(cfg, torch.float32)
    with pytest.raises(ValueError, match="shared memory"):
        int8_gemm_ws(*_operands(3, 32, 64, "cpu"), torch.float32, cfg)


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
    """The engine's path (w8a8_gemm at qwen-7b's down, which the table sends here at both M) captured in a
    CUDA graph (no host synchronisation in the launch), replayed with new activations and scales: the
    reference's bits each time."""
    from deepserve.quant.int8_cuda import w8a8_gemm

    x_q, x_s, w_q, w_s, _ = _operands(m, 3584, 18944, "cuda", bias=False)
    w8a8_gemm(x_q, x_s, w_q, w_s, None, torch.bfloat16)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = w8a8_gemm(x_q, x_s, w_q, w_s, None, torch.bfloat16)
    for i in range(2):
        x_q.copy_(torch.randint(-127, 128, x_q.shape, dtype=torch.int8, device="cuda"))
        x_s.mul_(1.5)
        out.fill_(float("nan"))
        graph.replay()
        assert torch.equal(out, int8_gemm_ref(x_q, x_s, w_q, w_s, None, torch.bfloat16)), i


MULTI_TILE = [*(c for t in WS.WS_SHAPE_CONFIGS.values() for c in t.values() if c is not None),
              WsConfig(128, 256, 128, 4, num_warps=8, persistent=True),
              WsConfig(128, 128, 128, 4, num_warps=4, persistent=True, coalesced_store=True)]


@pytest.mark.gpu
@needs_ws
@pytest.mark.parametrize("cfg", MULTI_TILE, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("m, n, k", [(300, 3584, 3584), (300, 1000, 144), (70, 500, 64)])
def test_gpu_persistent_walks_several_tiles(monkeypatch, cfg, m, n, k):
    """With 7 SMs a persistent CTA walks many tiles, carrying the ring's barrier phases from tile to tile
    (an H20 has 78 SMs, fewer than the 112 tiles of the table's down config at M = 256); K = 64 is one
    K step, fewer than the stages. The reference's bits, 7 CTAs at most."""
    monkeypatch.setattr(WS, "num_sms", lambda device: 7)
    rec = record_launches(monkeypatch, WS, "_int8_gemm_ws_kernel")["_int8_gemm_ws_kernel"]
    ops = _operands(m, n, k, "cuda", bias=False)
    _assert_bits(ops, cfg, (torch.bfloat16,))
    tiles = -(-m // cfg.block_m) * -(-n // cfg.block_n)
    assert {grid for grid, _ in rec.launches} == {(min(tiles, 7) if cfg.persistent else tiles,)}


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


def test_w8a8_gemm_dispatch_decisions(monkeypatch):
    """With the device taken as able (ws_available forced), ws_linear_config follows the table at its bucket
    edges, and falls back to int8_gemm (None) for shapes it lacks and for operands TMA cannot take."""
    from deepserve.quant.int8_cuda import ws_linear_config

    monkeypatch.setattr(WS, "ws_available", lambda device: True)
    down = WS.WS_SHAPE_CONFIGS[(3584, 18944)]
    w_q = torch.zeros(3584, 18944, dtype=torch.int8)
    got = [ws_linear_config(torch.zeros(m, 18944, dtype=torch.int8), w_q) for m in (192, 193, 256, 257, 1024, 1025)]
    assert got == [None, down[256], down[256], None, None, down[1 << 62]]
    assert ws_linear_config(torch.zeros(256, 3584, dtype=torch.int8), torch.zeros(4608, 3584, dtype=torch.int8)) \
        is None
    unaligned = torch.zeros(256 * 18944 + 1, dtype=torch.int8)[1:].view(256, 18944)  # base address off by 1 B
    assert ws_linear_config(unaligned, w_q) is None


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
    reference's bits there. Elsewhere only the launch count is the point (the output is compared with the
    same int8_gemm call: split-K may round partials once more than the reference)."""
    from deepserve.kernels import int8_gemm as G
    from deepserve.quant.int8_cuda import w8a8_gemm

    rec = record_launches(monkeypatch, WS, "_int8_gemm_ws_kernel")["_int8_gemm_ws_kernel"]
    ops = _operands(m, n, k, "cuda", bias=False)
    got = w8a8_gemm(*ops, torch.bfloat16)
    assert len(rec.launches) == (1 if ws else 0)
    want = int8_gemm_ref(*ops, torch.bfloat16) if ws else G.int8_gemm(*ops, torch.bfloat16)
    assert torch.equal(got, want)


# ---- offline sm_90 compiles of the table configs (no GPU needed) --------------------------------------

def compile_sm90(kernel, signature: dict, constexprs: dict, num_warps: int):
    """Compile a Gluon kernel for sm_90 without a device (Triton's own ptxas), with int8_gemm_ws's launch
    options; the pointer and integer arguments 16-divisible, as the JIT specialises aligned ones."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    aligned = {(i,): [["tt.divisibility", 16]] for i, kind in enumerate(signature.values()) if kind != "constexpr"
               and not kind.startswith("tensordesc")}
    src = GluonASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=aligned)
    return triton.compile(src, target=GPUTarget("cuda", 90, 64),
                          options=dict(num_warps=num_warps, maxnreg=WS.max_regs(num_warps), enable_fp_fusion=False))


def descriptor_types(cfg: WsConfig) -> dict:
    from triton.runtime.jit import mangle_type

    x = torch.zeros(256, 256, dtype=torch.int8)
    return {"a_desc": mangle_type(WS.descriptor(x, cfg.block_m, cfg.block_k)),
            "b_desc": mangle_type(WS.descriptor(x, cfg.block_n, cfg.block_k))}


def _tested_triton() -> bool:
    import triton

    from deepserve import envs

    return WS.gl is not None and WS.triton_tested(triton.__version__) and not envs.triton_interpret()


needs_tested_triton = pytest.mark.skipif(not _tested_triton(), reason="the offline sm_90 compile runs with the "
                                         "Triton release the Gluon kernels are written against (TESTED_TRITON) "
                                         "and outside its interpreter (which replaces the jit functions Gluon calls)")


@needs_tested_triton
@pytest.mark.parametrize("cfg", sorted({c for t in WS.WS_SHAPE_CONFIGS.values() for c in t.values() if c}
                                       | set(WS_CONFIGS.values())), ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("out", ["bf16", "fp32"])
def test_table_configs_compile_for_sm90(cfg, out):
    """Every config the engine or the defaults launch compiles for sm_90 (wgmma on s8 operands, warp
    specialisation's setmaxnreg, TMA loads, no FMA in the epilogue) and its shared memory is what
    `check_config` counts, within Triton's slack."""
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[out]
    consts = WS.kernel_constexprs(cfg, dtype, True)
    sig = {**descriptor_types(cfg), "c_ptr": "*" + out, "a_scale_ptr": "*fp32", "b_scale_ptr": "*fp32",
           "bias_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "stride_cm": "i32",
           **{name: "constexpr" for name in consts}}
    kernel = compile_sm90(WS._int8_gemm_ws_kernel, sig, consts, cfg.num_warps)
    ptx = kernel.asm["ptx"]
    assert ".s32.s8.s8" in ptx and "setmaxnreg" in ptx and "cp.async.bulk.tensor" in ptx
    assert "fma.rn.f32" not in ptx
    counted = WS.ws_smem_bytes(cfg) + WS.store_scratch_bytes(cfg, dtype)
    assert counted <= kernel.metadata.shared <= counted + WS.SMEM_SLACK <= WS.SMEM_LIMIT
