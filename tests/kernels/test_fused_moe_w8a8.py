"""W8A8 fused MoE (`fused_moe(..., int8_activations=True)`): int8 expert stacks with per-(expert, row)
scales, activations quantised per row (x per token before launch 1, act per assignment row before
launch 2), int8 x int8 -> int32 dots.

Two oracles:
  * `fused_moe_w8a8_ref`, the kernel's arithmetic op for op (same quantised activations, exact integer
    dots, the same float32 epilogue). Launch by launch the kernel must equal it up to the float32 exp
    of SiLU (one activation ulp at most); end to end, one activation ulp can move one int8 code of
    launch 2's input (or its row scale), so end to end the check allows 2 ulps of |ref| plus 2 ulps of
    the row's largest |ref|.
  * the float reference on the dequantised weights (float64), within the W8A16 rounding bound of
    test_fused_moe_int8 plus the activation quantisation error: |x - q * s| <= s / 2 per element
    (s = max|row| / 127), i.e. s_t / 2 * sum_h |w[n, h]| on each gate/up output and
    s_r / 2 * sum_i |w2[h, i]| on each down output (s_r from the oracle's act, widened by its bound).

CPU (Triton interpreter): f32, f16, bf16 x at tiny shapes. The interpreter rounds float32 -> bf16 by
truncation (an error up to one ulp, 2u), so bf16 runs on CPU against the float bound with u doubled,
not launch by launch. GPU: V2-Lite shapes, bf16, T up to 4096, and a CUDA-graph replay.
"""

import pytest
import torch

from tests.kernels.interpret import INTERPRET, device, load_kernel_module
from tests.kernels.test_fused_moe_int8 import E, H, I, TINY, TOP_K, U32, UNIT, dequant, int8_experts, route, tiny_case

K = load_kernel_module("fused_moe")
Q = load_kernel_module("int8_quant")
W8A8 = dict(int8_activations=True)


def unit(dtype) -> float:
    """Unit roundoff of the activation dtype as this backend rounds (the interpreter truncates to bf16)."""
    return 2 * UNIT[dtype] if INTERPRET and dtype == torch.bfloat16 else UNIT[dtype]


def error_bound(x, q13, s13, q2, s2, weights, ids) -> torch.Tensor:
    """[T, H] float64: first-order bound of |W8A8 kernel - float oracle on q * scale| (module docstring)."""
    u, (num_tokens, top_k), hidden = unit(x.dtype), ids.shape, x.shape[1]
    inter = q2.shape[2]
    xd, flat_ids, p = x.double(), ids.flatten(), weights.flatten().double()
    token = torch.arange(num_tokens, device=x.device).repeat_interleave(top_k)  # [T*k]
    x_step = xd.abs().amax(1).clamp(min=1e-8) / 127  # [T] per-token quantisation step
    bound = torch.zeros(num_tokens, hidden, dtype=torch.float64, device=x.device)
    weighted_abs = torch.zeros_like(bound)
    for e in flat_ids.unique().tolist():
        picks = (flat_ids == e).nonzero().squeeze(1)
        xe, pe = xd[token[picks]], p[picks, None]  # [n, H], [n, 1]
        w13, w2 = dequant(q13[e], s13[e]), dequant(q2[e], s2[e])  # [2I, H], [H, I]
        gu = xe @ w13.t()  # [n, 2I]
        dgu = (x_step[token[picks], None] / 2) * w13.abs().sum(1)[None, :] \
            + (hidden + 4) * U32 * (xe.abs() @ w13.abs().t()) + u * gu.abs()
        (g, up), (dg, dup) = gu.split(inter, dim=1), dgu.split(inter, dim=1)
        sil = torch.nn.functional.silu(g)
        dsil = 1.1 * dg + (u + 8 * U32) * sil.abs()
        act = sil * up
        dact = up.abs() * dsil + sil.abs() * dup + u * act.abs()  # [n, I]
        act_step = (act.abs() + dact).amax(1, keepdim=True) / 127  # [n, 1] launch 2's quantisation step
        d = act @ w2.t()  # [n, H]
        dd = dact @ w2.abs().t() + (act_step / 2) * w2.abs().sum(1)[None, :] \
            + (inter + 4) * U32 * (act.abs() @ w2.abs().t()) + u * d.abs()
        bound.index_add_(0, token[picks], pe * dd + u * pe * d.abs())
        weighted_abs.index_add_(0, token[picks], pe * d.abs())
    out = K.fused_moe_ref(xd, q13, q2, weights, ids, w13_scale=s13, w2_scale=s2)
    return bound + 2 * top_k * U32 * weighted_abs + u * out.abs()


def assert_within_float_bound(out, x, q13, s13, q2, s2, weights, ids, addend=None):
    oracle = K.fused_moe_ref(x.double(), q13, q2, weights, ids, w13_scale=s13, w2_scale=s2)
    bound = error_bound(x, q13, s13, q2, s2, weights, ids)
    if addend is not None:
        oracle = oracle + addend.double()
        bound = bound + unit(x.dtype) * oracle.abs()
    err = (out.double() - oracle).abs()
    assert out.dtype == x.dtype and out.shape == x.shape
    worst = float((err / bound).max())
    assert (err <= 1.1 * bound).all(), f"max err / bound {worst:.3g} (max err {float(err.max()):.3g})"
    return worst


def assert_close_to_w8a8_ref(out, x, q13, s13, q2, s2, weights, ids, addend=None):
    """End to end against `fused_moe_w8a8_ref`: within 2 ulps of |ref| plus 2 ulps of the row's largest
    |ref| (an act ulp from SiLU's exp moves that row's scale or one of its int8 codes)."""
    ref = K.fused_moe_w8a8_ref(x, q13, q2, weights, ids, s13, s2, addend)
    err = (out.double() - ref.double()).abs()
    tol = 2 * unit(x.dtype) * 2 * (ref.double().abs() + ref.double().abs().amax(1, keepdim=True))
    assert (err <= tol).all(), f"max err {float(err.max()):.3g}"


def exact_dtypes():
    """Activation dtypes the launch-by-launch check runs in: bf16 not under the interpreter."""
    return [torch.float32, torch.float16] + ([] if INTERPRET else [torch.bfloat16])


# --- CPU (interpreter) and GPU at tiny shapes -----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 5, 33])
def test_matches_float_reference_within_quantisation_bound(tokens, dtype):
    x, q13, s13, q2, s2, weights, ids = tiny_case(tokens, dtype)
    out = K.fused_moe(x, q13, q2, weights, ids, TINY, w13_scale=s13, w2_scale=s2, **W8A8)
    worst = assert_within_float_bound(out, x, q13, s13, q2, s2, weights, ids)
    print(f"T={tokens} {dtype}: max err / bound {worst:.3f}")


@pytest.mark.parametrize("dtype", exact_dtypes())
@pytest.mark.parametrize("tokens", [1, 5, 33])
def test_matches_w8a8_reference(tokens, dtype):
    x, q13, s13, q2, s2, weights, ids = tiny_case(tokens, dtype)
    out = K.fused_moe(x, q13, q2, weights, ids, TINY, w13_scale=s13, w2_scale=s2, **W8A8)
    assert_close_to_w8a8_ref(out, x, q13, s13, q2, s2, weights, ids)


@pytest.mark.parametrize("dtype", exact_dtypes())
def test_launches_one_by_one_equal_the_reference_arithmetic(dtype):
    """Launch 1 on int8_quant(x), then launch 2 on int8_quant(the kernel's own act): each equals the
    reference's float32 epilogue on the exact integer dots (launch 1 up to SiLU's float32 exp)."""
    tokens = 9
    x = torch.randn(tokens, H, device=device()).to(dtype)
    q13, s13, q2, s2 = int8_experts(E, H, I, device())
    weights, ids = route(tokens, E, TOP_K, device())
    align = K.moe_align_block_size_triton(ids, E, TINY.block_m)
    n, flat = tokens * TOP_K, ids.flatten()
    xq, xs, _ = Q.int8_quant(x)
    act = torch.empty(n, I, dtype=dtype, device=device())
    K._launch(xq, q13, act, weights.contiguous(), align, n, TOP_K, True, TINY, s13, xs)
    rows = torch.arange(n, device=device()) // TOP_K
    gate, up = K._w8a8_rows(xq[rows], xs[rows], q13, s13, flat).to(dtype).float().chunk(2, dim=1)
    want = ((gate / (1.0 + torch.exp(-gate))).to(dtype).float() * up).to(dtype)
    # exp in float32 may differ by a few of its ulps between backends, then the dtype rounds once more
    torch.testing.assert_close(act, want, rtol=2 * UNIT[dtype] + 8 * U32, atol=0)
    aq, a_s, _ = Q.int8_quant(act)
    down = torch.empty(n, H, dtype=dtype, device=device())
    K._launch(aq, q2, down, weights.contiguous(), align, n, 1, False, TINY, s2, a_s)
    want = (K._w8a8_rows(aq, a_s, q2, s2, flat).to(dtype).float() * weights.flatten()[:, None]).to(dtype)
    assert torch.equal(down, want)


def test_empty_experts_shared_ids_int32_and_addend():
    """E=8 but only experts 3 and 0 routed (six empty), two always-chosen shared ids of weight 1, int32
    ids, an addend: exactly `fused_moe(...) + addend`, and within both oracles."""
    tokens = 6
    x = torch.randn(tokens, H, device=device())
    q13, s13, q2, s2 = int8_experts(E + 2, H, I, device())
    routed = torch.tensor([[3, 0]], device=device()).expand(tokens, 2)
    weights, _ = route(tokens, E, TOP_K, device(), routed)
    shared = torch.tensor([E, E + 1], device=device()).expand(tokens, 2)
    full_w = torch.cat([weights, torch.ones(tokens, 2, device=device())], 1)
    full_ids = torch.cat([routed, shared], 1).int()
    addend = torch.randn(tokens, H, device=device())
    scales = dict(w13_scale=s13, w2_scale=s2, **W8A8)
    out = K.fused_moe(x, q13, q2, full_w, full_ids, TINY, addend=addend, **scales)
    assert torch.equal(out, K.fused_moe(x, q13, q2, full_w, full_ids, TINY, **scales) + addend)
    assert_close_to_w8a8_ref(out, x, q13, s13, q2, s2, full_w, full_ids, addend)
    assert_within_float_bound(out, x, q13, s13, q2, s2, full_w, full_ids.long(), addend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_x_and_the_default_config(dtype):
    """x as a column slice (row stride > H), the table's config: the result of the contiguous x."""
    wide = torch.randn(5, 2 * H, device=device()).to(dtype)
    x = wide[:, H:]
    q13, s13, q2, s2 = int8_experts(E, H, I, device())
    weights, ids = route(5, E, TOP_K, device())
    out = K.fused_moe(x, q13, q2, weights, ids, w13_scale=s13, w2_scale=s2, **W8A8)
    assert torch.equal(out, K.fused_moe(x.contiguous(), q13, q2, weights, ids, w13_scale=s13, w2_scale=s2, **W8A8))
    assert_within_float_bound(out, x, q13, s13, q2, s2, weights, ids)


def test_zero_tokens_and_bad_inputs():
    q13, s13, q2, s2 = int8_experts(E, H, I, device())
    weights, ids = route(0, E, TOP_K, device())
    empty = K.fused_moe(torch.empty(0, H, device=device()), q13, q2, weights, ids, w13_scale=s13,
                        w2_scale=s2, **W8A8)
    assert empty.shape == (0, H)
    x = torch.randn(3, H, device=device())
    weights, ids = route(3, E, TOP_K, device())
    with pytest.raises(ValueError, match="int8 stacks"):
        K.fused_moe(x, dequant(q13, s13).float(), dequant(q2, s2).float(), weights, ids, **W8A8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_given_x_quant_is_the_quantisation_it_would_make(dtype):
    """x_quant = int8_quant(x) (another consumer's): the same output as quantising x inside; a different
    quantisation is really used (not ignored)."""
    x = torch.randn(5, H, device=device()).to(dtype)
    q13, s13, q2, s2 = int8_experts(E, H, I, device())
    weights, ids = route(5, E, TOP_K, device())
    q, scale, _ = Q.int8_quant(x)
    want = K.fused_moe(x, q13, q2, weights, ids, w13_scale=s13, w2_scale=s2, **W8A8)
    got = K.fused_moe(x, q13, q2, weights, ids, w13_scale=s13, w2_scale=s2, x_quant=(q, scale), **W8A8)
    assert torch.equal(got, want)
    halved = K.fused_moe(x, q13, q2, weights, ids, w13_scale=s13, w2_scale=s2, x_quant=(q, scale / 2), **W8A8)
    assert not torch.equal(halved, want)
    strided = torch.stack([scale, torch.zeros_like(scale)], dim=1)[:, 0]  # the values of scale, stride 2
    got = K.fused_moe(x, q13, q2, weights, ids, w13_scale=s13, w2_scale=s2, x_quant=(q, strided), **W8A8)
    assert torch.equal(got, want)


def test_x_quant_checks():
    x = torch.randn(3, H, device=device())
    q13, s13, q2, s2 = int8_experts(E, H, I, device())
    weights, ids = route(3, E, TOP_K, device())
    q, scale, _ = Q.int8_quant(x)
    run = dict(w13_scale=s13, w2_scale=s2)
    with pytest.raises(ValueError, match="W8A8"):  # W8A16 quantises no activations
        K.fused_moe(x, q13, q2, weights, ids, x_quant=(q, scale), **run)
    for bad in ((q.float(), scale), (q, scale.double()), (q[:2], scale), (q, scale[:2])):
        with pytest.raises(ValueError, match="x_quant must be"):
            K.fused_moe(x, q13, q2, weights, ids, x_quant=bad, **run, **W8A8)


# --- GPU, DeepSeek-V2-Lite shapes (E=64 + 2 shared ids, H=2048, I=1408, top-6), bf16 -------------------

V2_LITE = (64, 2048, 1408, 6)  # E, H, I, top-k


@pytest.fixture(scope="module")
def v2_lite_int8():
    num_experts, hidden, inter, _ = V2_LITE
    torch.manual_seed(0)
    experts = int8_experts(num_experts + 2, hidden, inter, "cuda")
    yield experts
    del experts
    torch.cuda.empty_cache()


def v2_lite_routing(tokens):
    """Top-6 of 64 routed experts plus the 2 shared ids (64, 65) of weight 1: [T, 8]."""
    num_experts, _, _, top_k = V2_LITE
    weights, ids = route(tokens, num_experts, top_k, "cuda")
    shared = torch.tensor([num_experts, num_experts + 1], device="cuda").expand(tokens, 2)
    return torch.cat([weights, torch.ones(tokens, 2, device="cuda")], 1), torch.cat([ids, shared], 1)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 64, 512, 4096])
def test_gpu_v2_lite_shapes(v2_lite_int8, tokens):
    q13, s13, q2, s2 = v2_lite_int8
    x = torch.randn(tokens, V2_LITE[1], device="cuda").bfloat16()
    weights, ids = v2_lite_routing(tokens)
    out = K.fused_moe(x, q13, q2, weights, ids, w13_scale=s13, w2_scale=s2, **W8A8)
    assert_close_to_w8a8_ref(out, x, q13, s13, q2, s2, weights, ids)
    worst = assert_within_float_bound(out, x, q13, s13, q2, s2, weights, ids)
    print(f"V2-Lite W8A8 T={tokens}: max err / float bound {worst:.3f}")
    addend = torch.randn_like(x)
    got = K.fused_moe(x, q13, q2, weights, ids, addend=addend, w13_scale=s13, w2_scale=s2, **W8A8)
    assert torch.equal(got, out + addend)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 512])
def test_gpu_v2_lite_cuda_graph_replay(v2_lite_int8, tokens):
    """No host synchronisation in the W8A8 path: captured once, replayed with new x and routing."""
    q13, s13, q2, s2 = v2_lite_int8
    x = torch.randn(tokens, V2_LITE[1], device="cuda").bfloat16()
    weights, ids = v2_lite_routing(tokens)
    args = dict(w13_scale=s13, w2_scale=s2, **W8A8)
    K.fused_moe(x, q13, q2, weights, ids, **args)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = K.fused_moe(x, q13, q2, weights, ids, **args)
    new_weights, new_ids = v2_lite_routing(tokens)
    x.copy_(torch.randn_like(x))
    weights.copy_(new_weights)
    ids.copy_(new_ids)
    graph.replay()
    assert torch.equal(out, K.fused_moe(x, q13, q2, weights, ids, **args))
    assert_close_to_w8a8_ref(out, x, q13, s13, q2, s2, weights, ids)
