"""The gate_up W8A8 GEMM with SiLU-and-mul in its epilogue, and the quantisation of its output with the row
max given, against the unfused kernels they replace, bit for bit:

    int8_gemm_silu(x_q, x_s, gated(w_q), gated(w_s), I) == silu_and_mul(int8_gemm(x_q, x_s, w_q, w_s)) (h),
                                                           and each block's max |h|
    int8_quant_amax(h, part_max)        == int8_quant(h)
    the two in a row                    == silu_and_mul_int8_quant(int8_gemm(...))       (the path they replace)

Both sides are exact in int32 and run the same float32 epilogue and the same SiLU-and-mul arithmetic, so the
bits must agree: with TMA and pointer loads, where boxes run past M and K, and where I is not a multiple of
the layout's block (padded rows). `to_gated_layout` / `from_gated_layout` are inverses.
"""

import pytest
import torch

from tests.kernels.interpret import device, load_kernel_module
from tests.kernels.launches import record_launches
from tests.kernels.triton36 import triton_3_6_semantics

G = load_kernel_module("int8_gemm")
S = load_kernel_module("silu_and_mul")
Q = load_kernel_module("int8_quant")
SQ = load_kernel_module("silu_and_mul_quant")
K = load_kernel_module("int8_gemm_silu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TINY = [K.SiluGemmConfig(16, 32, group_m=1, num_warps=4, num_stages=1),
        K.SiluGemmConfig(32, 64, group_m=2, num_warps=4, num_stages=1)]


def _operands(m, inter, k, dev=None):
    dev = dev or device()
    x_q = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=dev)
    w_q = torch.randint(-127, 128, (2 * inter, k), dtype=torch.int8, device=dev)
    x_s = torch.rand(m, device=dev) / 100 + 1e-4
    w_s = torch.rand(2 * inter, device=dev) / 400 + 1e-5  # gate values around +-5: SiLU's curved part
    return x_q, x_s, w_q, w_s


def _unfused(ops, dtype):
    return S.silu_and_mul(G.int8_gemm(*ops, None, dtype))


def _gated(x_q, x_s, w_q, w_s, dtype=torch.bfloat16, cfg=None, tma=None):
    return K.int8_gemm_silu(x_q, x_s, K.to_gated_layout(w_q), K.to_gated_layout(w_s), w_q.shape[0] // 2, dtype,
                            cfg, tma)


def _assert_gated(ops, dtype, cfg=None, tma=None):
    h, parts = _gated(*ops, dtype, cfg, tma)
    want = _unfused(ops, dtype)
    assert h.dtype == dtype and h.shape == want.shape
    assert torch.equal(h, want)
    blocks = -(-want.shape[1] // K.GATED_BLOCK)
    padded = torch.nn.functional.pad(want.float().abs(), (0, blocks * K.GATED_BLOCK - want.shape[1]))
    assert torch.equal(parts, padded.view(-1, blocks, K.GATED_BLOCK).amax(dim=2))  # each block's max
    return h, parts


@pytest.mark.parametrize("m,inter,k", [(1, 7, 32), (5, 33, 96), (33, 100, 160), (17, 16, 48)])
@pytest.mark.parametrize("cfg", TINY, ids=["16x16", "32x32-grouped"])
@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointer"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_gemm_then_silu_and_mul(monkeypatch, m, inter, k, cfg, tma, dtype):
    """Ragged M and K tiles; I = 7, 33, 100 pad the layout's last block (16: one block, mostly padding)."""
    name = "_int8_gemm_silu_kernel"
    spy = record_launches(monkeypatch, K, name)[name]
    _assert_gated(_operands(m, inter, k), dtype, cfg, tma)
    assert len(spy.launches) == 1 and spy.launches[0][1]["TMA"] is tma


@pytest.mark.parametrize("m", [1, 40, 200, 300])  # one per table entry
def test_table_config_and_triton_3_6_dot(monkeypatch, m):
    """The table's block shapes (K tile shrunk to keep the interpreter fast); the int32 accumulators
    name their out_dtype, which Triton 3.6 requires."""
    triton_3_6_semantics(monkeypatch)
    cfg = K.silu_gemm_config(m)._replace(block_k=32, num_stages=1)
    _assert_gated(_operands(m, 24, 64), torch.bfloat16, cfg)


def test_quant_amax_matches_int8_quant():
    """A zero row (scale 1e-8 / 127), ties at k + 1/2 (to even), the max in the last column, f32 / f16 / bf16."""
    ties = (torch.arange(-126, 126, dtype=torch.float32) + 0.5) / 64
    rows = torch.stack([torch.cat([ties, torch.tensor([127 / 64])]), torch.zeros(253),
                        torch.randn(253) * 3, torch.randn(253) * 1e-3])
    for dtype in DTYPES:
        h = rows.to(dtype).to(device())
        got = K.int8_quant_amax(h, h.float().abs().amax(dim=1, keepdim=True))  # one part: the row max
        want = Q.int8_quant(h)
        assert got.residual is None
        assert torch.equal(got.q, want.q) and torch.equal(got.scale, want.scale)
    parts = h.float().abs().view(4, 11, 23).amax(dim=2)  # 11 partial maxima per row
    assert torch.equal(K.int8_quant_amax(h, parts).q, want.q)
    assert K.int8_quant_amax(h[:1], parts[:1]).scale.item() * 127 == pytest.approx(127 / 64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_chain_matches_silu_and_mul_int8_quant(monkeypatch, dtype):
    """What the MLP runs in place of int8_gemm + silu_and_mul_int8_quant: the same q and scales, with rows
    over several quantisation programs (256 columns each here; 18 partial maxima per row) and strided h rows."""
    monkeypatch.setattr(K, "_QUANT_BLOCK", 256)
    ops = _operands(6, 1100, 64)
    cfg = K.SiluGemmConfig(16, 64, group_m=1, num_warps=4, num_stages=1)
    h, parts = _gated(*ops, dtype, cfg)
    got = K.int8_quant_amax(h, parts)
    want = SQ.silu_and_mul_int8_quant(G.int8_gemm(*ops, None, dtype))
    assert torch.equal(got.q, want.q) and torch.equal(got.scale, want.scale)
    wide = torch.cat([h, h[:, :16]], dim=1)[:, :1100]  # row stride 1116
    strided = K.int8_quant_amax(wide, parts)
    assert torch.equal(strided.q, want.q) and torch.equal(strided.scale, want.scale)


def test_empty_shapes():
    dev = device()
    h, parts = _gated(*_operands(0, 8, 32))
    assert h.shape == (0, 8) and parts.shape == (0, 1)
    h, parts = _gated(*_operands(3, 8, 0))  # K = 0: gate = up = 0, h = silu(0) * 0 = 0
    assert torch.equal(h, torch.zeros(3, 8, dtype=torch.bfloat16, device=dev)) and not parts.any()
    q = K.int8_quant_amax(torch.zeros(0, 5, device=dev), torch.zeros(0, 1, device=dev))
    assert q.q.shape == (0, 5) and q.scale.shape == (0,)


def test_gated_layout_round_trip():
    """Blocks of gate rows then up rows, zero-padded; from_gated_layout undoes it along the last dim."""
    w = torch.arange(2 * 70 * 3).view(140, 3)
    g = K.to_gated_layout(w, block=32)  # I = 70 -> 3 blocks of 32 (26 padding rows per half)
    assert g.shape == (192, 3)
    assert torch.equal(g[:32], w[:32]) and torch.equal(g[32:64], w[70:102]) and torch.equal(g[128:134], w[64:70])
    assert not g[134:160].any() and torch.equal(g[160:166], w[134:140]) and not g[166:].any()
    assert torch.equal(K.to_gated_layout(w[:, 0], block=32), g[:, 0])
    y = torch.randn(2, 5, 192)
    back = K.from_gated_layout(y, 70, block=32)
    assert torch.equal(K.from_gated_layout(g.t(), 70, block=32), w.t()) and back.shape == (2, 5, 140)
    assert torch.equal(back[..., :32], y[..., :32]) and torch.equal(back[..., 70:102], y[..., 32:64])
    with pytest.raises(ValueError, match="even"):
        K.to_gated_layout(w[:5])


def test_bad_inputs():
    x_q, x_s, w_q, w_s = _operands(4, 8, 32)
    w_g, s_g = K.to_gated_layout(w_q), K.to_gated_layout(w_s)
    with pytest.raises(ValueError, match="gated-layout"):
        K.int8_gemm_silu(x_q, x_s, w_q, w_s, 8)  # not in the layout
    with pytest.raises(ValueError, match="x_scale"):
        K.int8_gemm_silu(x_q, x_s[:3], w_g, s_g, 8)
    with pytest.raises(ValueError, match="weight scale"):
        K.int8_gemm_silu(x_q, x_s, w_g, s_g[:8], 8)
    with pytest.raises(ValueError, match="out_dtype"):
        K.int8_gemm_silu(x_q, x_s, w_g, s_g, 8, torch.int32)
    with pytest.raises(ValueError, match="weight must be"):
        K.int8_gemm_silu(x_q, x_s, w_g[:, :16], s_g, 8)
    h = torch.zeros(4, 8, device=x_q.device)
    for bad in (torch.zeros(3, 1), torch.zeros(4), torch.zeros(4, 0), torch.zeros(4, K.MAX_PARTS + 1),
                torch.zeros(4, 2, dtype=torch.float64), torch.zeros(2, 4).t()):
        with pytest.raises(ValueError, match="part_max"):
            K.int8_quant_amax(h, bad.to(x_q.device))
    with pytest.raises(ValueError, match="unit stride"):
        K.int8_quant_amax(h.t(), torch.zeros(8, 1, device=x_q.device))


# ---- GPU, qwen-7b's gate_up (K = 3584, I = 18944) -------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 256, 2048, 8192])
def test_gpu_real_shape_table_configs(monkeypatch, m):
    """Each table entry at qwen-7b's gate_up, through TMA (it must be the path that ran): bit-equal to
    int8_gemm + silu_and_mul, and the chain to silu_and_mul_int8_quant."""
    ops = _operands(m, 18944, 3584, "cuda")
    name = "_int8_gemm_silu_kernel"
    spy = record_launches(monkeypatch, K, name)[name]
    h, parts = _assert_gated(ops, torch.bfloat16)
    assert spy.launches[0][1]["TMA"] is True
    monkeypatch.undo()
    got = K.int8_quant_amax(h, parts)
    want = SQ.silu_and_mul_int8_quant(G.int8_gemm(*ops, None, torch.bfloat16))
    assert torch.equal(got.q, want.q) and torch.equal(got.scale, want.scale)


@pytest.mark.gpu
def test_gpu_in_a_cuda_graph():
    """Captured and replayed with new inputs: the unfused bits, twice."""
    ops = _operands(256, 18944, 3584, "cuda")
    x_q, x_s = ops[0], ops[1]
    K.int8_quant_amax(*_gated(*ops))  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = K.int8_quant_amax(*_gated(*ops))
    for i in range(2):
        x_q.copy_(torch.randint(-127, 128, x_q.shape, dtype=torch.int8, device="cuda"))
        x_s.mul_(1.5)
        graph.replay()
        want = SQ.silu_and_mul_int8_quant(G.int8_gemm(*ops, None, torch.bfloat16))
        assert torch.equal(out.q, want.q) and torch.equal(out.scale, want.scale), i
