"""The gate_up GEMM with SiLU-and-mul epilogue on the warp-specialised Gluon kernel
(`kernels/int8_gemm_silu_ws.py`) against the Triton one (`kernels/int8_gemm_silu.py`): the same h and
part_max bits on an sm_90 GPU; on CPU the config checks, the shape table and the dispatch decisions of
`quant/int8_cuda.w8a8_gate_up_silu_quant` (with `ws_available` forced where the decision is the point).
"""

import pytest
import torch

from deepserve.kernels import int8_gemm_silu_ws as SW
from deepserve.kernels import int8_gemm_ws as WS
from deepserve.kernels.int8_gemm_ws import WsConfig
from tests.kernels.launches import record_launches
from tests.kernels.test_int8_gemm_ws import (OUT_DTYPES, _operands, compile_sm90, descriptor_types, needs_tested_triton,
                                             needs_ws)


def _gated(m, inter, k, dev):
    """Operands of a gated-layout gate_up: x_q [M, K], x_scale, w_g [2 I_pad, K], w_scale_g [2 I_pad]."""
    from deepserve.kernels.int8_gemm_silu import to_gated_layout

    x_q, x_s, w_q, w_s, _ = _operands(m, 2 * inter, k, dev, bias=False)
    return x_q, x_s, to_gated_layout(w_q), to_gated_layout(w_s)


def test_silu_config_checks():
    """One gated block per tile (block_n 128), no coalesced store, the scratch beside the ring in 227 KB:
    6 stages of 128 x 128 fit with a bf16 h (229,600 B with Triton's slack) and not with a float32 one
    (262,368 B)."""
    SW.check_silu_config(SW.SILU_WS_CONFIG, torch.float32)
    six = SW.SILU_WS_CONFIG._replace(num_stages=6)
    SW.check_silu_config(six, torch.bfloat16)
    assert SW.silu_smem_bytes(six, torch.bfloat16) == 6 * (256 * 128 + 16) + 128 * 128 * 2 + WS.SMEM_SLACK
    with pytest.raises(ValueError, match="more than"):
        SW.check_silu_config(six, torch.float32)
    wide = SW.SILU_WS_CONFIG._replace(block_n=256, num_warps=8, num_stages=3)
    for bad in (wide, SW.SILU_WS_CONFIG._replace(coalesced_store=True)):
        with pytest.raises(ValueError, match="one gated block"):
            SW.check_silu_config(bad, torch.bfloat16)


def test_silu_ws_checks_and_cpu():
    """Bad operands raise ValueError before any launch (int8_gemm_silu's checks); a CPU device RuntimeError;
    empty shapes need no launch."""
    x_q, x_s, w_g, w_sg = _gated(3, 64, 64, "cpu")
    with pytest.raises(ValueError, match="gated-layout weight"):
        SW.int8_gemm_silu_ws(x_q, x_s, w_g, w_sg, 65)
    with pytest.raises(ValueError, match="out_dtype"):
        SW.int8_gemm_silu_ws(x_q, x_s, w_g, w_sg, 64, torch.int32)
    with pytest.raises(RuntimeError, match="sm_90"):
        SW.int8_gemm_silu_ws(x_q, x_s, w_g, w_sg, 64)
    h, part = SW.int8_gemm_silu_ws(x_q[:0], x_s[:0], w_g, w_sg, 64)
    assert h.shape == (0, 64) and part.shape == (0, 1)
    h, part = SW.int8_gemm_silu_ws(x_q[:, :0], x_s, w_g[:, :0], w_sg, 64)
    assert not h.any() and not part.any()


@pytest.mark.gpu
@needs_ws
@pytest.mark.parametrize("m", [1, 17, 256, 300])
@pytest.mark.parametrize("inter, k", [(64, 144), (200, 2048), (2816, 2048)])
@pytest.mark.parametrize("cfg", [SW.SILU_WS_CONFIG, WsConfig(64, 128, 128, 6, 4, persistent=True),
                                 WsConfig(128, 128, 128, 4, 8)], ids=lambda c: "-".join(map(str, c)))
def test_gpu_silu_ws_bits_equal_int8_gemm_silu(m, inter, k, cfg):
    """h and part_max bit for bit those of int8_gemm_silu (the Triton kernel), each out_dtype that fits."""
    from deepserve.kernels.int8_gemm_silu import int8_gemm_silu

    ops = _gated(m, inter, k, "cuda")
    for dtype in OUT_DTYPES:
        if not SW.silu_config_fits(cfg, dtype):
            continue
        want_h, want_part = int8_gemm_silu(*ops, inter, dtype)
        got_h, got_part = SW.int8_gemm_silu_ws(*ops, inter, dtype, cfg)
        assert torch.equal(got_h, want_h), dtype
        assert torch.equal(got_part, want_part), dtype


@pytest.mark.gpu
@needs_ws
def test_gpu_silu_ws_cuda_graph_replay():
    """Captured and replayed with new activations: int8_gemm_silu's bits each time (the persistent default)."""
    from deepserve.kernels.int8_gemm_silu import int8_gemm_silu

    x_q, x_s, w_g, w_sg = _gated(256, 2816, 2048, "cuda")
    SW.int8_gemm_silu_ws(x_q, x_s, w_g, w_sg, 2816)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        h, part = SW.int8_gemm_silu_ws(x_q, x_s, w_g, w_sg, 2816)
    for i in range(2):
        x_q.copy_(torch.randint(-127, 128, x_q.shape, dtype=torch.int8, device="cuda"))
        x_s.mul_(1.5)
        h.fill_(float("nan"))
        graph.replay()
        want_h, want_part = int8_gemm_silu(x_q, x_s, w_g, w_sg, 2816)
        assert torch.equal(h, want_h) and torch.equal(part, want_part), i


def test_silu_shape_table_and_cpu_dispatch():
    """qwen-7b's gated gate_up (2 I_pad = 37888, K = 3584) takes int8_gemm_silu_ws in the measured buckets only;
    off sm_90 (a CPU tensor) and where a float32 h's scratch would not fit, int8_gemm_silu stays."""
    from deepserve.quant.int8_cuda import ws_gate_up_config

    table = SW.SILU_WS_SHAPE_CONFIGS[(37888, 3584)]
    assert [SW.silu_ws_shape_config(m, 37888, 3584) for m in (192, 193, 256, 257, 1024, 1025, 8192)] == \
        [None, table[256], table[256], None, None, table[1 << 62], table[1 << 62]]
    assert SW.silu_ws_shape_config(256, 5632, 2048) is None
    for cfg in filter(None, table.values()):
        SW.check_silu_config(cfg, torch.bfloat16)
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
        rec = record_launches(monkeypatch, SW, "_int8_gemm_silu_ws_kernel")["_int8_gemm_silu_ws_kernel"]
        got = w8a8_gate_up_silu_quant(*ops, 18944, dtype)
        assert len(rec.launches) == int(launched), dtype
        want = int8_quant_amax(*int8_gemm_silu(*ops, 18944, dtype))
        assert torch.equal(got.q, want.q) and torch.equal(got.scale, want.scale), dtype


def test_gate_up_dispatch_decisions(monkeypatch):
    """With the device taken as able (ws_available forced): the table's config for a bf16 h at M = 256, none
    for a float32 h (its scratch does not fit beside 6 stages), none for operands TMA cannot take."""
    from deepserve.quant.int8_cuda import ws_gate_up_config

    monkeypatch.setattr(WS, "ws_available", lambda device: True)
    w_g = torch.zeros(37888, 3584, dtype=torch.int8)
    x_q = torch.zeros(256, 3584, dtype=torch.int8)
    assert ws_gate_up_config(x_q, w_g, torch.bfloat16) == SW.SILU_WS_SHAPE_CONFIGS[(37888, 3584)][256]
    assert ws_gate_up_config(x_q, w_g, torch.float32) is None
    assert ws_gate_up_config(x_q[:192], w_g, torch.bfloat16) is None
    unaligned = torch.zeros(256 * 3584 + 1, dtype=torch.int8)[1:].view(256, 3584)
    assert ws_gate_up_config(unaligned, w_g, torch.bfloat16) is None


@pytest.mark.gpu
@needs_ws
@pytest.mark.parametrize("m, inter, k", [(300, 2816, 2048), (70, 200, 64)])
def test_gpu_silu_ws_persistent_walks_several_tiles(monkeypatch, m, inter, k):
    """With 7 SMs each persistent CTA walks many gated blocks, reusing the epilogue's scratch from tile to
    tile (the two barriers around its reads): int8_gemm_silu's bits, at most 7 CTAs (4 tiles at M = 70,
    I = 200: 4 CTAs)."""
    from deepserve.kernels.int8_gemm_silu import int8_gemm_silu

    monkeypatch.setattr(WS, "num_sms", lambda device: 7)
    rec = record_launches(monkeypatch, SW, "_int8_gemm_silu_ws_kernel")["_int8_gemm_silu_ws_kernel"]
    ops = _gated(m, inter, k, "cuda")
    for cfg in (SW.SILU_WS_SHAPE_CONFIGS[(37888, 3584)][256], SW.SILU_WS_CONFIG):
        got_h, got_part = SW.int8_gemm_silu_ws(*ops, inter, torch.bfloat16, cfg)
        want_h, want_part = int8_gemm_silu(*ops, inter, torch.bfloat16)
        assert torch.equal(got_h, want_h) and torch.equal(got_part, want_part), cfg
    assert {grid for grid, _ in rec.launches} == {(min(7, -(-m // 128) * -(-inter // 64)),)}


@needs_tested_triton
@pytest.mark.parametrize("cfg", sorted({c for t in SW.SILU_WS_SHAPE_CONFIGS.values() for c in t.values() if c}
                                       | {SW.SILU_WS_CONFIG}), ids=lambda c: "-".join(map(str, c)))
def test_table_configs_compile_for_sm90(cfg):
    """The configs the engine or the default launch compile for sm_90 (wgmma on s8 operands, setmaxnreg, TMA,
    16-byte stores of h, no FMA) in the shared memory `silu_smem_bytes` counts, for a bf16 h."""
    consts = SW.silu_kernel_constexprs(cfg, torch.bfloat16)
    sig = {**descriptor_types(cfg), "h_ptr": "*bf16", "part_ptr": "*fp32", "a_scale_ptr": "*fp32",
           "b_scale_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "inter": "i32", "stride_hm": "i32",
           **{name: "constexpr" for name in consts}}
    ptx = (kernel := compile_sm90(SW._int8_gemm_silu_ws_kernel, sig, consts, cfg.num_warps)).asm["ptx"]
    assert ".s32.s8.s8" in ptx and "setmaxnreg" in ptx and "cp.async.bulk.tensor" in ptx and "st.global.v4" in ptx
    assert "fma.rn.f32" not in ptx
    assert SW.silu_smem_bytes(cfg, torch.bfloat16) - WS.SMEM_SLACK <= kernel.metadata.shared \
        <= SW.silu_smem_bytes(cfg, torch.bfloat16) <= WS.SMEM_LIMIT
