"""Fused MoE grouped GEMMs against `fused_experts_ref`, the MoE backend registry and the config table.

CPU (Triton interpreter) at tiny shapes in float32/float16 (the interpreter's bf16 dot is wrong);
GPU at the DeepSeek-V2-Lite and V3 shapes in bf16.
"""

import pytest
import torch

from deepserve.kernels.fused_moe_configs import CONFIGS, MoeConfig, default_config, get_config
from deepserve.layers.activation import SiluAndMul
from deepserve.layers.moe import Routing, fused_experts_ref
from deepserve.layers.moe_backend import get_moe_backend, moe_backend_for
from tests.kernels.interpret import device, load_kernel_module

K = load_kernel_module("fused_moe")
E, TOP_K, H, I = 8, 2, 32, 16
TINY = MoeConfig(block_m=16, block_n=16, block_k=16, group_m=2, num_warps=4, num_stages=1)
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}  # of max |ref|


def make_experts(num_experts, hidden, inter, dtype, dev):
    """w13 [E, 2I, H], w2 [E, H, I] scaled so activations stay O(1)."""
    w13 = (torch.randn(num_experts, 2 * inter, hidden, device=dev) / hidden ** 0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, device=dev) / inter ** 0.5).to(dtype)
    return w13, w2


def route(tokens, num_experts, top_k, dev, ids=None):
    """Softmax weights of random logits; ids = top-k unless given [T, k]."""
    probs = torch.randn(tokens, num_experts, device=dev).softmax(dim=-1)
    if ids is None:
        ids = probs.topk(top_k, dim=-1).indices
    return probs.gather(1, ids), ids


def assert_matches(x, w13, w2, weights, ids, config=None):
    out = K.fused_moe(x, w13, w2, weights, ids, config)
    # The reference runs in float32 (from the same rounded inputs) except for bf16 on GPU.
    ref_dtype = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
    ref = K.fused_moe_ref(x.to(ref_dtype), w13.to(ref_dtype), w2.to(ref_dtype), weights, ids).float()
    assert out.dtype == x.dtype and out.shape == x.shape
    scale = ref.abs().max().clamp(min=1e-3)
    err = (out.float() - ref).abs().max()
    assert err <= TOL[x.dtype] * scale, f"max err {err:.3g} vs max |ref| {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens", [1, 5, 33])
def test_matches_reference(tokens, dtype):
    x = torch.randn(tokens, H, device=device()).to(dtype)
    w13, w2 = make_experts(E, H, I, dtype, device())
    assert_matches(x, w13, w2, *route(tokens, E, TOP_K, device()), TINY)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_all_tokens_to_one_expert(dtype):
    x = torch.randn(33, H, device=device()).to(dtype)
    w13, w2 = make_experts(E, H, I, dtype, device())
    ids = torch.tensor([[5, 2]], device=device()).expand(33, TOP_K)
    assert_matches(x, w13, w2, *route(33, E, TOP_K, device(), ids.contiguous()), TINY)


def test_empty_experts_and_small_batch():
    """Only experts 1 and 6 used; T*k = 4 < BLOCK_M; int32 ids; default config from the table."""
    x = torch.randn(2, H, device=device())
    w13, w2 = make_experts(E, H, I, torch.float32, device())
    ids = torch.tensor([[1, 6], [6, 1]], dtype=torch.int32, device=device())
    weights, _ = route(2, E, TOP_K, device(), ids.long())
    assert_matches(x, w13, w2, weights, ids)


def test_strided_inputs_and_multi_block_k():
    """x with a row stride, w13 as a transposed view, BLOCK_K smaller than both K dims."""
    base = torch.randn(5, H + 8, device=device())
    w13, w2 = make_experts(E, H, I, torch.float32, device())
    w13_t = w13.transpose(1, 2).contiguous().transpose(1, 2)  # same values, stride(2) != 1
    cfg = TINY._replace(block_n=16, block_k=16)
    assert_matches(base[:, :H], w13_t, w2, *route(5, E, TOP_K, device()), cfg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_addend_rides_in_the_sum(dtype):
    """addend [T, H]: exactly round(round(routed sum) + addend), i.e. `fused_moe(...) + addend`, the
    unfused shared-expert add of DeepseekMoE; and the reference's value within tolerance."""
    x = torch.randn(5, H, device=device()).to(dtype)
    w13, w2 = make_experts(E, H, I, dtype, device())
    weights, ids = route(5, E, TOP_K, device())
    addend = torch.randn(5, H, device=device()).to(dtype)
    got = K.fused_moe(x, w13, w2, weights, ids, TINY, addend=addend)
    assert torch.equal(got, K.fused_moe(x, w13, w2, weights, ids, TINY) + addend)
    ref = K.fused_moe_ref(x.float(), w13.float(), w2.float(), weights, ids, addend.float())
    assert (got.float() - ref).abs().max() <= TOL[dtype] * ref.abs().max()
    empty = K.fused_moe(x, w13, w2, weights[:, :0].contiguous(), ids[:, :0].contiguous(), addend=addend)
    assert torch.equal(empty, addend)  # no assignments: the addend alone
    with pytest.raises(ValueError, match="addend"):
        K.fused_moe(x, w13, w2, weights, ids, addend=addend[:, :-1])


def test_shared_experts_as_extra_ids():
    """Every token also routed to experts E and E+1 with weight 1 (the fused shared experts)."""
    x = torch.randn(6, H, device=device())
    w13, w2 = make_experts(E + 2, H, I, torch.float32, device())
    weights, ids = route(6, E, TOP_K, device())
    shared = torch.tensor([E, E + 1], device=device()).expand(6, 2)
    full_w = torch.cat([weights, torch.ones(6, 2, device=device())], dim=1)
    assert_matches(x, w13, w2, full_w, torch.cat([ids, shared], dim=1), TINY)


def test_zero_tokens_and_bad_inputs():
    w13, w2 = make_experts(E, H, I, torch.float32, device())
    weights, ids = route(0, E, TOP_K, device())
    assert K.fused_moe(torch.empty(0, H, device=device()), w13, w2, weights, ids).shape == (0, H)
    x = torch.randn(3, H, device=device())
    weights, ids = route(3, E, TOP_K, device())
    with pytest.raises(ValueError):
        K.fused_moe(x.half(), w13, w2, weights, ids)  # dtype mismatch
    with pytest.raises(ValueError):
        K.fused_moe(x, w13, w2[:, :, :-1], weights, ids)  # w2 shape
    with pytest.raises(ValueError):
        K.fused_moe(x, w13, w2, weights.double(), ids)
    with pytest.raises(ValueError):
        K.fused_moe(x, w13, w2, weights[:2], ids[:2])


def test_backends_agree_and_dispatch_by_device():
    assert moe_backend_for(torch.device("cpu")).name == "torch"
    assert moe_backend_for(torch.device("cuda")).name == "triton"  # only the class, no launch
    with pytest.raises(ValueError):
        get_moe_backend("nope")
    x = torch.randn(5, H, device=device())
    w13, w2 = make_experts(E, H, I, torch.float32, device())
    routing = Routing(*route(5, E, TOP_K, device()))
    want = fused_experts_ref(x, w13, w2, routing, SiluAndMul())
    got = get_moe_backend("triton").apply(x, w13, w2, routing, SiluAndMul())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        get_moe_backend("triton").apply(x, w13, w2, routing, torch.nn.GELU())


def test_config_table_lookup():
    v3 = CONFIGS[(256, 2048, "bfloat16")]
    assert get_config(256, 2048, torch.bfloat16, 1, 8) == v3[1]
    assert get_config(256, 2048, torch.bfloat16, 100, 8) == v3[128]
    assert get_config(256, 2048, torch.bfloat16, 10 ** 6, 8) == v3[max(v3)]
    assert get_config(8, 16, torch.float32, 5, 2) == default_config(5, 8, 2)
    for table in CONFIGS.values():
        assert all(c.block_m >= 16 and c.block_n >= 16 and c.block_k >= 16 for c in table.values())


# --- GPU, real shapes ------------------------------------------------------------------------

GPU_SHAPES = {"v2-lite": (64, 2048, 1408, 6), "v3": (256, 7168, 2048, 8)}  # E, H, I, top-k


@pytest.fixture(scope="module", params=list(GPU_SHAPES))
def gpu_experts(request):
    num_experts, hidden, inter, top_k = GPU_SHAPES[request.param]
    torch.manual_seed(0)
    w13, w2 = make_experts(num_experts, hidden, inter, torch.bfloat16, "cuda")
    yield w13, w2, top_k
    del w13, w2
    torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 32, 128, 1024])
def test_gpu_real_shapes(gpu_experts, tokens):
    w13, w2, top_k = gpu_experts
    x = torch.randn(tokens, w13.shape[2], dtype=torch.bfloat16, device="cuda")
    assert_matches(x, w13, w2, *route(tokens, w13.shape[0], top_k, "cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 64])
def test_gpu_v2_lite_with_shared_experts_and_addend(tokens):
    """V2-Lite's fused stack (64 routed + 2 shared experts, top-6 + 2 columns of weight 1) in bf16;
    the addend path bit-exact against `fused_moe(...) + addend`."""
    num_experts, hidden, inter, top_k = GPU_SHAPES["v2-lite"]
    torch.manual_seed(0)
    w13, w2 = make_experts(num_experts + 2, hidden, inter, torch.bfloat16, "cuda")
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16, device="cuda")
    weights, ids = route(tokens, num_experts, top_k, "cuda")
    shared = torch.tensor([num_experts, num_experts + 1], device="cuda").expand(tokens, 2)
    full_w = torch.cat([weights, torch.ones(tokens, 2, device="cuda")], dim=1)
    assert_matches(x, w13, w2, full_w, torch.cat([ids, shared], dim=1))
    addend = torch.randn(tokens, hidden, dtype=torch.bfloat16, device="cuda")
    got = K.fused_moe(x, w13, w2, weights, ids, addend=addend)
    assert torch.equal(got, K.fused_moe(x, w13, w2, weights, ids) + addend)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture(gpu_experts):
    """No host synchronisation inside fused_moe: it captures and replays with new routing."""
    w13, w2, top_k = gpu_experts
    x = torch.randn(32, w13.shape[2], dtype=torch.bfloat16, device="cuda")
    weights, ids = route(32, w13.shape[0], top_k, "cuda")
    K.fused_moe(x, w13, w2, weights, ids)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = K.fused_moe(x, w13, w2, weights, ids)
    new_weights, new_ids = route(32, w13.shape[0], top_k, "cuda")
    weights.copy_(new_weights)
    ids.copy_(new_ids)
    graph.replay()
    ref = K.fused_moe_ref(x, w13, w2, weights, ids).float()
    assert (out.float() - ref).abs().max() <= TOL[torch.bfloat16] * ref.abs().max()


@pytest.mark.gpu
def test_gpu_token_counts_share_one_compiled_kernel(monkeypatch):
    """A prefill of a token count the warm-up never ran reuses the compiled kernel of its config:
    num_m_blocks and num_valid (T * k) are not specialised on, so T = 1023, 2146, 2147 (other residues
    mod 16 than T = 1024's) compile nothing new. Specialised, a v2-lite int8 run compiled two variants
    inside its timed part (run s7a)."""
    import triton

    num_experts, hidden, inter, top_k = GPU_SHAPES["v2-lite"]
    torch.manual_seed(0)
    w13, w2 = make_experts(num_experts, hidden, inter, torch.bfloat16, "cuda")
    cfg = MoeConfig(64, 128, 64, 8, 8, 3)

    def run(tokens):
        x = torch.randn(tokens, hidden, dtype=torch.bfloat16, device="cuda")
        return K.fused_moe(x, w13, w2, *route(tokens, num_experts, top_k, "cuda"), cfg)

    run(1024)
    compiled = []
    monkeypatch.setattr(triton.knobs.runtime, "jit_cache_hook",
                        lambda **kw: compiled.append(kw["repr"].split("[")[0]) and None)
    cfg = cfg._replace(num_warps=4, num_stages=2)  # a config no test compiles: the hook must see it
    run(1024)
    assert "_fused_moe_kernel" in compiled, compiled
    compiled.clear()
    for tokens in (1023, 2146, 2147):
        run(tokens)
    assert "_fused_moe_kernel" not in compiled, compiled
