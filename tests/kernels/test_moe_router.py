"""Fused MoE router kernel against `select_experts` (the reference), and the TopKRouter wiring.

Random logits: exp/sigmoid may differ from torch's by an ulp, so rows whose decisions (the
topk_group-th vs the next group score, adjacent choices among the best k+1) are closer than 1e-5
in float64 may legitimately order differently; they are left out and must be rare. Exact ties
(equal logits) are compared on every row: both sides must send them to the lowest index.
"""

import pytest
import torch

from deepserve.layers.moe import RouterConfig, TopKRouter, select_experts
from tests.kernels.interpret import device, load_kernel_module
from tests.kernels.triton36 import triton_3_6_semantics

K = load_kernel_module("moe_router")
RTOL, ATOL = 1e-5, 1e-6  # float32 weights from exp/sigmoid that may differ by an ulp or two

V2_LITE = RouterConfig(num_experts=64, top_k=6)
V2 = RouterConfig(num_experts=160, top_k=6, topk_method="group_limited_greedy", n_group=8, topk_group=3,
                  routed_scaling_factor=16.0)
V3 = RouterConfig(num_experts=256, top_k=8, scoring_func="sigmoid", topk_method="noaux_tc", n_group=8,
                  topk_group=4, norm_topk_prob=True, routed_scaling_factor=2.5)
CONFIGS = {
    "v2_lite": V2_LITE, "v2": V2, "v3": V3,
    "v2_normed": RouterConfig(num_experts=16, top_k=3, norm_topk_prob=True, routed_scaling_factor=1.5),
    "v3_unnormalised": RouterConfig(num_experts=16, top_k=4, scoring_func="sigmoid", topk_method="noaux_tc",
                                    n_group=8, topk_group=3),
    "three_groups": RouterConfig(num_experts=24, top_k=4, scoring_func="sigmoid", topk_method="noaux_tc",
                                 n_group=3, topk_group=2, norm_topk_prob=True),
    "groups_of_one": RouterConfig(num_experts=8, top_k=3, scoring_func="sigmoid", topk_method="noaux_tc",
                                  n_group=8, topk_group=4),
    "greedy_sigmoid_bias": RouterConfig(num_experts=32, top_k=2, scoring_func="sigmoid", topk_method="noaux_tc"),
}


def _bias(cfg: RouterConfig, scale: float = 0.3) -> torch.Tensor | None:
    return torch.randn(cfg.num_experts) * scale if cfg.topk_method == "noaux_tc" else None


def _close(a: torch.Tensor, b: torch.Tensor, floor: float, eps: float) -> torch.Tensor:
    """a >= b elementwise; True where a - b < eps * max(|a|, |b|, floor)."""
    scale = torch.maximum(a.abs(), b.abs()).clamp(min=floor)
    return (a - b) < eps * scale


def near_tie_rows(logits: torch.Tensor, cfg: RouterConfig, bias: torch.Tensor | None,
                  eps: float = 1e-5) -> torch.Tensor:
    """[T] bool: rows with a routing decision closer than eps (relative; float64 math of
    select_experts). Softmax scores err relatively; sigmoid (+ bias) choices absolutely (floor 1)."""
    x = logits.double()
    scores = x.softmax(-1) if cfg.scoring_func == "softmax" else x.sigmoid()
    choice = scores if bias is None else scores + bias.double()
    floor = 0.0 if cfg.scoring_func == "softmax" else 1.0
    tie = torch.zeros(x.shape[0], dtype=torch.bool)
    if cfg.group_limited:
        grouped = choice.view(x.shape[0], cfg.n_group, -1)  # [T, G, S]
        best = min(2, grouped.shape[-1]) if cfg.topk_method == "noaux_tc" else 1
        ranked = grouped.topk(best, dim=-1).values.sum(-1).sort(-1, descending=True)  # [T, G]
        if cfg.n_group > cfg.topk_group:
            tie |= _close(ranked.values[:, cfg.topk_group - 1], ranked.values[:, cfg.topk_group], floor, eps)
        keep = torch.zeros_like(ranked.values, dtype=torch.bool)
        keep.scatter_(1, ranked.indices[:, :cfg.topk_group], True)
        choice = choice.masked_fill(~keep.repeat_interleave(grouped.shape[-1], dim=1), float("-inf"))
    top = choice.sort(-1, descending=True).values[:, :cfg.top_k + 1]  # -inf past the eligible ones
    return tie | _close(top[:, :-1], top[:, 1:], floor, eps).any(-1)


def assert_matches_reference(logits: torch.Tensor, cfg: RouterConfig, bias: torch.Tensor | None,
                             exact: bool = False) -> None:
    """Kernel (on device()) vs select_experts (CPU); `exact`: no row may be left out as a near tie."""
    dev = device()
    got = K.moe_router(logits.to(dev), cfg, None if bias is None else bias.to(dev))
    want = select_experts(logits, cfg, bias)
    assert got.weights.dtype == torch.float32 and got.ids.dtype == torch.int64
    assert got.weights.shape == got.ids.shape == (logits.shape[0], cfg.top_k)
    rows = torch.ones(logits.shape[0], dtype=torch.bool)
    if not exact:
        ties = near_tie_rows(logits, cfg, bias)
        assert ties.float().mean() <= 0.05, f"{int(ties.sum())} near-tie rows of {logits.shape[0]}"
        rows = ~ties
    assert torch.equal(got.ids.cpu()[rows], want.ids[rows])
    torch.testing.assert_close(got.weights.cpu()[rows], want.weights[rows], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("tokens", [1, 7])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_select_experts(name, tokens):
    cfg = CONFIGS[name]
    assert_matches_reference(torch.randn(tokens, cfg.num_experts) * 2, cfg, _bias(cfg))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_equal_logits_go_to_the_lowest_index(name):
    cfg = CONFIGS[name]
    zero_bias = None if cfg.topk_method != "noaux_tc" else torch.zeros(cfg.num_experts)
    assert_matches_reference(torch.zeros(2, cfg.num_experts), cfg, zero_bias, exact=True)
    got = K.moe_router(torch.zeros(1, cfg.num_experts, device=device()), cfg, None)
    assert got.ids.tolist() == [list(range(cfg.top_k))]


@pytest.mark.parametrize("name", ["v2_lite", "v2", "v3", "three_groups"])
def test_many_exact_ties(name):
    """Logits from a small set of values: ties everywhere, inside groups and between groups.
    (Sigmoid logits from {0, 2} only: sums of two other sigmoids could tie up to an ulp.)"""
    cfg = CONFIGS[name]
    values = torch.tensor([0.0, 2.0]) if cfg.scoring_func == "sigmoid" else torch.arange(-2.0, 3.0)
    logits = values[torch.randint(0, len(values), (6, cfg.num_experts))]
    zero_bias = None if cfg.topk_method != "noaux_tc" else torch.zeros(cfg.num_experts)
    assert_matches_reference(logits, cfg, zero_bias, exact=True)


def test_bias_steers_choice_but_not_weights():
    cfg = RouterConfig(num_experts=8, top_k=2, scoring_func="sigmoid", topk_method="noaux_tc")
    logits = torch.zeros(1, 8, device=device())
    logits[0, 0] = 1.0  # the best score, but the bias favours experts 6 and 7
    bias = torch.tensor([0.0, 0, 0, 0, 0, 0, 1.0, 2.0], device=device())
    weights, ids = K.moe_router(logits, cfg, bias)
    assert ids.tolist() == [[7, 6]]
    assert weights.tolist() == [[0.5, 0.5]]  # sigmoid(0), the bias left out


@pytest.mark.parametrize("name", ["v2_lite", "v3"])
def test_all_tokens_to_one_expert(name):
    cfg = CONFIGS[name]
    logits = torch.randn(5, cfg.num_experts)
    logits[:, 37] += 30.0
    got = K.moe_router(logits.to(device()), cfg, None)
    assert bool((got.ids[:, 0] == 37).all())
    assert_matches_reference(logits, cfg, None)


def test_zero_tokens_and_strided_logits():
    got = K.moe_router(torch.empty(0, 64, device=device()), V2_LITE)
    assert got.weights.shape == got.ids.shape == (0, 6)
    wide = torch.randn(5, 64 + 16) * 2
    dev = device()
    strided = K.moe_router(wide.to(dev)[:, 8:72], V2_LITE)  # row stride 80
    want = select_experts(wide[:, 8:72].contiguous(), V2_LITE)
    assert torch.equal(strided.ids.cpu(), want.ids)


@pytest.mark.parametrize("num_shared", [1, 2])
@pytest.mark.parametrize("name", ["v2_lite", "v2", "v3", "v2_normed"])
def test_shared_expert_columns(name, num_shared, monkeypatch):
    """num_shared extra columns (shared experts folded into the stack): ids E.., weight 1; the routed
    columns exactly as without them (normalisation and scaling leave the shared ones out). Under
    Triton 3.6's front-end semantics too (the CPU interpreter runs a newer one)."""
    triton_3_6_semantics(monkeypatch)
    cfg, dev = CONFIGS[name], device()
    logits, bias = torch.randn(5, cfg.num_experts) * 2, _bias(cfg)
    bias_dev = None if bias is None else bias.to(dev)
    plain = K.moe_router(logits.to(dev), cfg, bias_dev)
    got = K.moe_router(logits.to(dev), cfg, bias_dev, num_shared)
    k = cfg.top_k
    assert got.ids.shape == got.weights.shape == (5, k + num_shared)
    assert torch.equal(got.ids[:, :k], plain.ids) and torch.equal(got.weights[:, :k], plain.weights)
    assert got.ids[:, k:].tolist() == [list(range(cfg.num_experts, cfg.num_experts + num_shared))] * 5
    assert torch.equal(got.weights[:, k:].cpu(), torch.ones(5, num_shared))
    want = K.moe_router_ref(logits, cfg, bias, num_shared)
    rows = ~near_tie_rows(logits, cfg, bias)
    assert torch.equal(got.ids.cpu()[rows], want.ids[rows])
    torch.testing.assert_close(got.weights.cpu()[rows], want.weights[rows], rtol=RTOL, atol=ATOL)
    assert K.moe_router(torch.empty(0, cfg.num_experts, device=dev), cfg, bias_dev, num_shared).ids.shape == (0, k + num_shared)


def test_top_k_router_shared_columns_kernel_and_torch_agree():
    """TopKRouter with num_shared: the kernel (forced on CPU) and the select_experts path."""
    router = TopKRouter(32, CONFIGS["v2_normed"])
    with torch.no_grad():
        router.weight.copy_(torch.randn_like(router.weight))
    router.num_shared = 2
    x = torch.randn(6, 32, device=device())
    router = router.to(device())
    router.use_kernel = True
    got = router(x)
    router.use_kernel = False
    want = router(x)
    assert got.ids.shape == want.ids.shape == (6, 5)
    assert torch.equal(got.ids, want.ids) and torch.equal(got.weights[:, 3:], want.weights[:, 3:])
    torch.testing.assert_close(got.weights, want.weights, rtol=RTOL, atol=ATOL)


def test_bad_inputs():
    dev = device()
    with pytest.raises(ValueError, match="float32"):
        K.moe_router(torch.zeros(2, 64, dtype=torch.float16, device=dev), V2_LITE)
    with pytest.raises(ValueError, match="64"):
        K.moe_router(torch.zeros(2, 32, device=dev), V2_LITE)
    with pytest.raises(ValueError, match="unit-stride"):
        K.moe_router(torch.zeros(64, 2, device=dev).t(), V2_LITE)
    with pytest.raises(ValueError, match="correction_bias"):
        K.moe_router(torch.zeros(2, 256, device=dev), V3, torch.zeros(128, device=dev))
    with pytest.raises(ValueError, match="num_shared"):
        K.moe_router(torch.zeros(2, 64, device=dev), V2_LITE, None, -1)


def test_router_keeps_float32_weights_after_loading():
    router = TopKRouter(32, CONFIGS["v3_unnormalised"])
    with torch.no_grad():  # the parameters start uninitialised (torch.empty): NaN would compare unequal
        router.weight.copy_(torch.randn_like(router.weight))
        router.e_score_correction_bias.copy_(torch.randn_like(router.e_score_correction_bias) * 0.1)
    router = router.to(torch.bfloat16)
    assert router.weight.dtype == router.e_score_correction_bias.dtype == torch.bfloat16
    router.process_weights_after_loading()
    assert router.weight.dtype == router.e_score_correction_bias.dtype == torch.float32
    assert isinstance(router.weight, torch.nn.Parameter)
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    want = select_experts(torch.nn.functional.linear(x.float(), router.weight), router.cfg,
                          router.e_score_correction_bias)
    got = router(x)  # CPU: select_experts
    assert torch.equal(got.ids, want.ids) and torch.equal(got.weights, want.weights)


# --- GPU, real shapes ------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 8, 64, 4096])
@pytest.mark.parametrize("name", ["v2_lite", "v2", "v3"])
def test_gpu_real_shapes(name, tokens):
    cfg = CONFIGS[name]
    assert_matches_reference(torch.randn(tokens, cfg.num_experts) * 2, cfg, _bias(cfg))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["v2_lite", "v2", "v3"])
def test_gpu_exact_ties(name):
    cfg = CONFIGS[name]
    values = torch.tensor([0.0, 2.0]) if cfg.scoring_func == "sigmoid" else torch.arange(-2.0, 3.0)
    logits = values[torch.randint(0, len(values), (512, cfg.num_experts))]
    zero_bias = None if cfg.topk_method != "noaux_tc" else torch.zeros(cfg.num_experts)
    assert_matches_reference(logits, cfg, zero_bias, exact=True)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["v2_lite", "v3"])
def test_gpu_top_k_router_uses_the_kernel(name):
    """TopKRouter on CUDA (bf16 model, float32 router after loading) against select_experts."""
    cfg = CONFIGS[name]
    router = TopKRouter(2048, cfg).cuda()
    with torch.no_grad():
        router.weight.normal_(0, 0.05)
        if router.e_score_correction_bias is not None:
            router.e_score_correction_bias.normal_(0, 0.3)
    router = router.to(torch.bfloat16)
    router.process_weights_after_loading()
    x = torch.randn(256, 2048, dtype=torch.bfloat16, device="cuda")
    got = router(x)
    logits = torch.nn.functional.linear(x.float(), router.weight)
    bias = router.e_score_correction_bias
    want = select_experts(logits, cfg, bias)
    rows = ~near_tie_rows(logits.cpu(), cfg, None if bias is None else bias.cpu()).cuda()
    assert got.ids.dtype == torch.int64 and got.weights.dtype == torch.float32
    assert torch.equal(got.ids[rows], want.ids[rows])
    torch.testing.assert_close(got.weights[rows], want.weights[rows], rtol=RTOL, atol=ATOL)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 256])
@pytest.mark.parametrize("name,num_shared", [("v2_lite", 2), ("v3", 1)])
def test_gpu_shared_expert_columns(name, num_shared, tokens):
    """Real shapes with the shared experts' columns (V2-Lite: 2, V3: 1)."""
    cfg = CONFIGS[name]
    logits, bias = torch.randn(tokens, cfg.num_experts) * 2, _bias(cfg)
    bias_cuda = None if bias is None else bias.cuda()
    got = K.moe_router(logits.cuda(), cfg, bias_cuda, num_shared)
    plain = K.moe_router(logits.cuda(), cfg, bias_cuda)
    assert torch.equal(got.ids[:, :cfg.top_k], plain.ids) and torch.equal(got.weights[:, :cfg.top_k], plain.weights)
    want = K.moe_router_ref(logits, cfg, bias, num_shared)
    assert torch.equal(got.ids[:, cfg.top_k:].cpu(), want.ids[:, cfg.top_k:])
    assert torch.equal(got.weights[:, cfg.top_k:].cpu(), want.weights[:, cfg.top_k:])


@pytest.mark.gpu
def test_gpu_cuda_graph_replay():
    logits = torch.randn(64, 256, device="cuda") * 2
    bias = torch.randn(256, device="cuda") * 0.3
    K.moe_router(logits, V3, bias)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = K.moe_router(logits, V3, bias)
    logits.copy_(torch.randn(64, 256, device="cuda") * 2)
    graph.replay()
    want = select_experts(logits, V3, bias)
    rows = ~near_tie_rows(logits.cpu(), V3, bias.cpu()).cuda()
    assert torch.equal(got.ids[rows], want.ids[rows])
    torch.testing.assert_close(got.weights[rows], want.weights[rows], rtol=RTOL, atol=ATOL)
