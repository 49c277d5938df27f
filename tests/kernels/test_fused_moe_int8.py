"""W8A16 fused MoE (int8 expert stacks, per-(expert, row) f32 scales) against the float reference on
the dequantised weights.

Oracle: `fused_moe_ref` (i.e. `fused_experts_ref`) in float64 on x and on w = q * scale.

Tolerance: a first-order running error bound of the kernel's arithmetic, per output element,
computed from the oracle's own intermediates (`error_bound`). With u = the unit roundoff of the
activation dtype D (f32 2^-24, f16 2^-11, bf16 2^-8) and u32 = 2^-24:
  gate / up   f32 accumulation of K = H products (each exact, or rounded once for f32 x), the
              scale multiply, rounding to D:   (H + 2) u32 (|x| @ |w|^T) + u |g|
  silu        |silu'| <= 1.1, evaluated in f32 (<= 8 u32) and rounded to D:
              1.1 dg + (u + 8 u32) |silu(g)|
  act         silu * up rounded to D:          |up| ds + |silu| dup + u |act|
  down        f32 accumulation over I of act @ w2^T with the act errors carried, the scale
              multiply, rounding to D:         dact @ |w2|^T + (I + 2) u32 (|act| @ |w2|^T) + u |d|
  weight      rounded to D after the routing-weight multiply:  p dd + u p |d|
  k-sum       f32 sum of the k rows (+ the oracle's own float32 sum), rounded to D:
              sum dk + 2 k u32 sum p |d| + u |out|
The test asserts |out - oracle| <= 1.1 x bound (the 10% covers second-order terms). The same bound
rejects a kernel that uses a scale wrong by 2^-10 (test_bound_rejects_a_wrong_scale).

CPU (Triton interpreter): f32 and f16 activations (the interpreter's bf16 dot is wrong), tiny shapes
with H and I not multiples of the blocks. GPU: DeepSeek-V2-Lite shapes in bf16, eager and replayed
from a CUDA graph.
"""

import pytest
import torch

from deepserve.kernels.fused_moe_configs import MoeConfig
from deepserve.quant.block_fp8_ref import quantize_rows_int8_ref
from tests.kernels.interpret import device, load_kernel_module

K = load_kernel_module("fused_moe")
E, TOP_K, H, I = 8, 2, 40, 24  # H, I: not multiples of the 16-wide blocks below
TINY = MoeConfig(block_m=16, block_n=16, block_k=16, group_m=2, num_warps=4, num_stages=1)
U32 = 2.0 ** -24
UNIT = {torch.float32: U32, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def int8_experts(num_experts, hidden, inter, dev):
    """(q13 [E, 2I, H] int8, s13 [E, 2I] f32, q2 [E, H, I] int8, s2 [E, H] f32): random float
    experts, scaled so activations stay O(1), quantised per row."""
    w13 = torch.randn(num_experts, 2 * inter, hidden, device=dev) / hidden ** 0.5
    w2 = torch.randn(num_experts, hidden, inter, device=dev) / inter ** 0.5
    return (*quantize_rows_int8_ref(w13), *quantize_rows_int8_ref(w2))


def route(tokens, num_experts, top_k, dev, ids=None):
    """Softmax weights of random logits; ids = top-k unless given [T, k]."""
    probs = torch.randn(tokens, num_experts, device=dev).softmax(dim=-1)
    if ids is None:
        ids = probs.topk(top_k, dim=-1).indices
    return probs.gather(1, ids), ids


def tiny_case(tokens, dtype):
    """(x [T, H] dtype, q13, s13, q2, s2, weights, ids): random int8 experts and a top-k routing at this
    module's tiny shapes (E, TOP_K, H, I)."""
    x = torch.randn(tokens, H, device=device()).to(dtype)
    q13, s13, q2, s2 = int8_experts(E, H, I, device())
    weights, ids = route(tokens, E, TOP_K, device())
    return x, q13, s13, q2, s2, weights, ids


def dequant(q, scale):
    """[E, N, K] int8, [E, N] -> [E, N, K] float64."""
    return q.double() * scale.double()[..., None]


def error_bound(x, q13, s13, q2, s2, weights, ids, dtype) -> torch.Tensor:
    """[T, H] float64: the first-order bound of |kernel - oracle| derived in the module docstring,
    expert by expert (as `fused_experts_ref` loops)."""
    u, (num_tokens, top_k), hidden = UNIT[dtype], ids.shape, x.shape[1]
    inter = q2.shape[2]
    xd, flat_ids, p = x.double(), ids.flatten(), weights.flatten().double()  # [T, H], [T*k], [T*k]
    token = torch.arange(num_tokens, device=x.device).repeat_interleave(top_k)  # [T*k]
    bound = torch.zeros(num_tokens, hidden, dtype=torch.float64, device=x.device)
    weighted_abs = torch.zeros_like(bound)
    for e in flat_ids.unique().tolist():
        picks = (flat_ids == e).nonzero().squeeze(1)  # [n] assignments to expert e
        xe, pe = xd[token[picks]], p[picks, None]  # [n, H], [n, 1]
        w13, w2 = dequant(q13[e], s13[e]), dequant(q2[e], s2[e])  # [2I, H], [H, I]
        gu = xe @ w13.t()  # [n, 2I]
        dgu = (hidden + 2) * U32 * (xe.abs() @ w13.abs().t()) + u * gu.abs()
        (g, up), (dg, dup) = gu.split(inter, dim=1), dgu.split(inter, dim=1)
        sil = torch.nn.functional.silu(g)
        dsil = 1.1 * dg + (u + 8 * U32) * sil.abs()
        act = sil * up
        dact = up.abs() * dsil + sil.abs() * dup + u * act.abs()  # [n, I]
        d = act @ w2.t()  # [n, H]
        dd = dact @ w2.abs().t() + (inter + 2) * U32 * (act.abs() @ w2.abs().t()) + u * d.abs()
        bound.index_add_(0, token[picks], pe * dd + u * pe * d.abs())
        weighted_abs.index_add_(0, token[picks], pe * d.abs())
    out = K.fused_moe_ref(xd, q13, q2, weights, ids, w13_scale=s13, w2_scale=s2)
    return bound + 2 * top_k * U32 * weighted_abs + u * out.abs()


def assert_within_bound(out, x, q13, s13, q2, s2, weights, ids):
    oracle = K.fused_moe_ref(x.double(), q13, q2, weights, ids, w13_scale=s13, w2_scale=s2)
    bound = error_bound(x, q13, s13, q2, s2, weights, ids, x.dtype)
    err = (out.double() - oracle).abs()
    assert out.dtype == x.dtype and out.shape == x.shape
    worst = float((err / bound).max())
    assert (err <= 1.1 * bound).all(), f"max err / bound {worst:.3g} (max err {float(err.max()):.3g})"
    return worst


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens", [1, 5, 33])
def test_matches_dequantised_reference(tokens, dtype):
    x, q13, s13, q2, s2, weights, ids = tiny_case(tokens, dtype)
    out = K.fused_moe(x, q13, q2, weights, ids, TINY, w13_scale=s13, w2_scale=s2)
    worst = assert_within_bound(out, x, q13, s13, q2, s2, weights, ids)
    print(f"T={tokens} {dtype}: max err / bound {worst:.3f}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_four_experts_all_tokens_to_two_default_config(dtype):
    """E=4, all 33 tokens to experts 3 and 0 (several M-blocks per expert), the table's config."""
    x = torch.randn(33, H, device=device()).to(dtype)
    q13, s13, q2, s2 = int8_experts(4, H, I, device())
    ids = torch.tensor([[3, 0]], device=device()).expand(33, TOP_K).contiguous()
    weights, _ = route(33, 4, TOP_K, device(), ids)
    out = K.fused_moe(x, q13, q2, weights, ids, w13_scale=s13, w2_scale=s2)
    assert_within_bound(out, x, q13, s13, q2, s2, weights, ids)


def test_shared_experts_as_extra_ids_and_int32_ids():
    """Routed top-2 plus two always-chosen experts of weight 1 (a folded shared MLP's columns)."""
    x = torch.randn(6, H, device=device())
    q13, s13, q2, s2 = int8_experts(E + 2, H, I, device())
    weights, ids = route(6, E, TOP_K, device())
    shared = torch.tensor([E, E + 1], device=device()).expand(6, 2)
    full_w, full_ids = torch.cat([weights, torch.ones(6, 2, device=device())], 1), torch.cat([ids, shared], 1)
    out = K.fused_moe(x, q13, q2, full_w, full_ids.int(), TINY, w13_scale=s13, w2_scale=s2)
    assert_within_bound(out, x, q13, s13, q2, s2, full_w, full_ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_addend_rides_in_the_sum(dtype):
    """With the routing-weight multiply and the k-sum + addend (the unfused shared-expert output):
    exactly `fused_moe(...) + addend`; no assignments: the addend alone."""
    x = torch.randn(5, H, device=device()).to(dtype)
    q13, s13, q2, s2 = int8_experts(E, H, I, device())
    weights, ids = route(5, E, TOP_K, device())
    addend = torch.randn(5, H, device=device()).to(dtype)
    scales = dict(w13_scale=s13, w2_scale=s2)
    got = K.fused_moe(x, q13, q2, weights, ids, TINY, addend=addend, **scales)
    assert torch.equal(got, K.fused_moe(x, q13, q2, weights, ids, TINY, **scales) + addend)
    empty = K.fused_moe(x, q13, q2, weights[:, :0].contiguous(), ids[:, :0].contiguous(), addend=addend, **scales)
    assert torch.equal(empty, addend)


def test_gated_launch_alone_gives_the_reference_activation():
    """Launch 1 by itself (gate/up + SiLU-and-mul, no routing weight): act [T*k, I] against
    silu(x w_gate^T) * (x w_up^T) on the dequantised rows, float32 (a gate/up scale mix-up shows here)."""
    x = torch.randn(5, H, device=device())
    q13, s13, _, _ = int8_experts(E, H, I, device())
    weights, ids = route(5, E, TOP_K, device())
    align = K.moe_align_block_size_triton(ids, E, TINY.block_m)
    act = torch.empty(5 * TOP_K, I, device=device())
    K._launch(x, q13, act, weights.contiguous(), align, 5 * TOP_K, TOP_K, True, TINY, s13)
    w13 = dequant(q13, s13)[ids.flatten()]  # [T*k, 2I, H]
    gu = torch.einsum("th,tnh->tn", x.double().repeat_interleave(TOP_K, 0), w13)
    want = torch.nn.functional.silu(gu[:, :I]) * gu[:, I:]
    torch.testing.assert_close(act.double(), want, rtol=1e-5, atol=1e-5)


def test_strided_weights_and_scales():
    """int8 stacks as transposed views (stride(2) != 1) and scales as non-contiguous views."""
    x = torch.randn(5, H, device=device())
    q13, s13, q2, s2 = int8_experts(E, H, I, device())
    q13_t = q13.transpose(1, 2).contiguous().transpose(1, 2)  # same values, K not unit-stride
    s2_t = s2.t().contiguous().t()
    weights, ids = route(5, E, TOP_K, device())
    out = K.fused_moe(x, q13_t, q2, weights, ids, TINY, w13_scale=s13, w2_scale=s2_t)
    assert torch.equal(out, K.fused_moe(x, q13, q2, weights, ids, TINY, w13_scale=s13, w2_scale=s2))
    assert_within_bound(out, x, q13, s13, q2, s2, weights, ids)


def test_bound_rejects_a_wrong_scale():
    """The tolerance is tight enough to see one down-projection row scaled by 1 + 2^-10."""
    x = torch.randn(5, H, device=device())
    q13, s13, q2, s2 = int8_experts(E, H, I, device())
    weights, ids = route(5, E, TOP_K, device())
    wrong = s2.clone()
    wrong[:, 7] *= 1 + 2.0 ** -10  # row 7 of every expert's w2: output column 7
    out = K.fused_moe(x, q13, q2, weights, ids, TINY, w13_scale=s13, w2_scale=wrong)
    with pytest.raises(AssertionError, match="err / bound"):
        assert_within_bound(out, x, q13, s13, q2, s2, weights, ids)


def test_zero_tokens_and_bad_inputs():
    q13, s13, q2, s2 = int8_experts(E, H, I, device())
    weights, ids = route(0, E, TOP_K, device())
    empty = K.fused_moe(torch.empty(0, H, device=device()), q13, q2, weights, ids, w13_scale=s13, w2_scale=s2)
    assert empty.shape == (0, H)
    x = torch.randn(3, H, device=device())
    weights, ids = route(3, E, TOP_K, device())
    w13 = dequant(q13, s13).float()
    for bad in (dict(),  # int8 without scales
                dict(w13_scale=s13),  # one scale missing
                dict(w13_scale=s13.double(), w2_scale=s2),  # not float32
                dict(w13_scale=s13[:, :-1], w2_scale=s2),  # wrong shape
                dict(w13_scale=s2, w2_scale=s13)):  # swapped
        with pytest.raises(ValueError, match="scale"):
            K.fused_moe(x, q13, q2, weights, ids, **bad)
    with pytest.raises(ValueError):
        K.fused_moe(x, w13, q2, weights, ids, w13_scale=s13, w2_scale=s2)  # float w13, int8 w2
    with pytest.raises(ValueError, match="int8 stacks"):
        K.fused_moe(x, w13, dequant(q2, s2).float(), weights, ids, w13_scale=s13, w2_scale=s2)


# --- GPU, DeepSeek-V2-Lite shapes (E=64, H=2048, I=1408, top-6), bf16 activations -------------------

V2_LITE = (64, 2048, 1408, 6)  # E, H, I, top-k; quantised models keep the shared experts unfused


@pytest.fixture(scope="module")
def v2_lite_int8():
    num_experts, hidden, inter, _ = V2_LITE
    torch.manual_seed(0)
    experts = int8_experts(num_experts, hidden, inter, "cuda")
    yield experts
    del experts
    torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 64, 256])
def test_gpu_v2_lite_shapes(v2_lite_int8, tokens):
    """The table's configs, bf16 x: within the derived bound of the float64 dequantised oracle; the
    addend path exactly `fused_moe(...) + addend`."""
    q13, s13, q2, s2 = v2_lite_int8
    num_experts, hidden, _, top_k = V2_LITE
    x = torch.randn(tokens, hidden, device="cuda").bfloat16()
    weights, ids = route(tokens, num_experts, top_k, "cuda")
    out = K.fused_moe(x, q13, q2, weights, ids, w13_scale=s13, w2_scale=s2)
    worst = assert_within_bound(out, x, q13, s13, q2, s2, weights, ids)
    print(f"V2-Lite T={tokens}: max err / bound {worst:.3f}")
    addend = torch.randn(tokens, hidden, device="cuda").bfloat16()
    got = K.fused_moe(x, q13, q2, weights, ids, addend=addend, w13_scale=s13, w2_scale=s2)
    assert torch.equal(got, out + addend)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 64])
def test_gpu_v2_lite_cuda_graph_replay(v2_lite_int8, tokens):
    """No host synchronisation in the int8 path: captured once, replayed with new x and routing."""
    q13, s13, q2, s2 = v2_lite_int8
    num_experts, hidden, _, top_k = V2_LITE
    x = torch.randn(tokens, hidden, device="cuda").bfloat16()
    weights, ids = route(tokens, num_experts, top_k, "cuda")
    K.fused_moe(x, q13, q2, weights, ids, w13_scale=s13, w2_scale=s2)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = K.fused_moe(x, q13, q2, weights, ids, w13_scale=s13, w2_scale=s2)
    new_weights, new_ids = route(tokens, num_experts, top_k, "cuda")
    x.copy_(torch.randn(tokens, hidden, device="cuda").bfloat16())
    weights.copy_(new_weights)
    ids.copy_(new_ids)
    graph.replay()
    assert torch.equal(out, K.fused_moe(x, q13, q2, weights, ids, w13_scale=s13, w2_scale=s2))
    assert_within_bound(out, x, q13, s13, q2, s2, weights, ids)
