"""The MoE router `select_experts` and the expert reference `fused_experts_ref`."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from deepserve.layers.activation import SiluAndMul
from deepserve.layers.moe import RouterConfig, Routing, fused_experts_ref, select_experts

V2_GREEDY = RouterConfig(num_experts=8, top_k=2, routed_scaling_factor=1.5)
V2_GROUP = RouterConfig(num_experts=16, top_k=3, topk_method="group_limited_greedy", n_group=4, topk_group=2)
V3 = RouterConfig(num_experts=16, top_k=4, scoring_func="sigmoid", topk_method="noaux_tc", n_group=4,
                  topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)
CONFIGS = {"v2_greedy": V2_GREEDY, "v2_group": V2_GROUP, "v3": V3,
           "v3_unnormalised": RouterConfig(num_experts=16, top_k=4, scoring_func="sigmoid",
                                           topk_method="noaux_tc", n_group=8, topk_group=3)}


def direct_route(logits: list[float], cfg: RouterConfig, bias: list[float] | None) -> list[tuple[int, float]]:
    """One token, written out with plain Python: [(expert, weight)] in choice order."""
    if cfg.scoring_func == "softmax":
        top = max(logits)
        exp = [math.exp(x - top) for x in logits]
        scores = [e / sum(exp) for e in exp]
    else:
        scores = [1 / (1 + math.exp(-x)) for x in logits]
    choice = [s + (bias[i] if bias else 0.0) for i, s in enumerate(scores)]
    eligible = set(range(cfg.num_experts))
    if cfg.topk_method != "greedy" and cfg.n_group > 1:
        size = cfg.num_experts // cfg.n_group
        groups = [choice[g * size:(g + 1) * size] for g in range(cfg.n_group)]
        if cfg.topk_method == "noaux_tc":
            group_score = [sum(sorted(g, reverse=True)[:2]) for g in groups]
        else:
            group_score = [max(g) for g in groups]
        best = sorted(range(cfg.n_group), key=lambda g: -group_score[g])[:cfg.topk_group]
        eligible = {g * size + j for g in best for j in range(size)}
    ids = sorted(eligible, key=lambda e: -choice[e])[:cfg.top_k]
    weights = [scores[e] for e in ids]
    if cfg.norm_topk_prob:
        weights = [w / sum(weights) for w in weights]
    return [(e, w * cfg.routed_scaling_factor) for e, w in zip(ids, weights)]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_select_experts_matches_direct_computation(name):
    cfg = CONFIGS[name]
    logits = torch.randn(32, cfg.num_experts) * 2
    bias = torch.randn(cfg.num_experts) * 0.3 if cfg.topk_method == "noaux_tc" else None
    weights, ids = select_experts(logits, cfg, bias)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    assert weights.shape == ids.shape == (32, cfg.top_k)
    for t in range(32):
        expected = direct_route(logits[t].tolist(), cfg, bias.tolist() if bias is not None else None)
        assert ids[t].tolist() == [e for e, _ in expected]
        assert weights[t].tolist() == pytest.approx([w for _, w in expected], rel=1e-5)


def _hf_router(version: str, cfg: RouterConfig, hidden: int):
    if version == "v2":
        from transformers import DeepseekV2Config
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter as Router
        config = DeepseekV2Config(hidden_size=hidden, n_routed_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k,
                                  topk_method=cfg.topk_method, n_group=cfg.n_group, topk_group=cfg.topk_group,
                                  routed_scaling_factor=cfg.routed_scaling_factor)
    else:
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter as Router
        config = DeepseekV3Config(hidden_size=hidden, n_routed_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k,
                                  n_group=cfg.n_group, topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
                                  routed_scaling_factor=cfg.routed_scaling_factor)
    return Router(config)


@pytest.mark.parametrize("version,cfg", [("v2", V2_GREEDY), ("v2", V2_GROUP), ("v3", V3)])
def test_select_experts_matches_hf_router(version, cfg):
    router = _hf_router(version, cfg, hidden=32)
    with torch.no_grad():
        router.weight.normal_()
        if version == "v3":
            router.e_score_correction_bias.normal_(0, 0.3)
        x = torch.randn(64, 32)
        logits, hf_weights, hf_ids = router(x)
    bias = router.e_score_correction_bias if version == "v3" else None
    weights, ids = select_experts(logits, cfg, bias)
    hf_order, order = hf_ids.argsort(dim=-1), ids.argsort(dim=-1)  # HF's top-k is unsorted
    assert torch.equal(ids.gather(1, order), hf_ids.gather(1, hf_order))
    torch.testing.assert_close(weights.gather(1, order), hf_weights.gather(1, hf_order), rtol=1e-6, atol=0)


def test_bias_steers_choice_but_not_weights():
    cfg = RouterConfig(num_experts=8, top_k=2, scoring_func="sigmoid", topk_method="noaux_tc")
    logits = torch.zeros(1, 8)
    logits[0, 0] = 1.0  # the best score, but the bias favours experts 6 and 7
    bias = torch.tensor([0.0, 0, 0, 0, 0, 0, 1.0, 2.0])
    weights, ids = select_experts(logits, cfg, bias)
    assert ids.tolist() == [[7, 6]]
    assert weights.tolist() == [[0.5, 0.5]]  # sigmoid(0), the bias left out


def test_all_tokens_to_one_expert():
    cfg = RouterConfig(num_experts=8, top_k=1, routed_scaling_factor=2.0)
    logits = torch.randn(10, 8)
    logits[:, 5] += 100.0
    routing = select_experts(logits, cfg)
    assert routing.ids.eq(5).all()
    torch.testing.assert_close(routing.weights, torch.full((10, 1), 2.0))
    w13, w2, x = torch.randn(8, 12, 16), torch.randn(8, 16, 6), torch.randn(10, 16)
    expected = 2.0 * (SiluAndMul()(x @ w13[5].t()) @ w2[5].t())
    torch.testing.assert_close(fused_experts_ref(x, w13, w2, routing, SiluAndMul()), expected)


def dense_experts(x, w13, w2, routing):
    """Every expert on every token, weighted by a dense [T, E] gate (zero where not routed)."""
    gate = torch.zeros(x.shape[0], w13.shape[0]).scatter_add_(1, routing.ids, routing.weights)
    outs = torch.stack([SiluAndMul()(x @ w13[e].t()) @ w2[e].t() for e in range(w13.shape[0])], dim=1)
    return (gate.unsqueeze(-1) * outs).sum(dim=1)  # [T, H]


def test_experts_with_no_tokens_and_repeated_tokens():
    ids = torch.tensor([[0, 3], [3, 0], [3, 6], [0, 6]])  # experts 1, 2, 4, 5, 7 get nothing
    routing = Routing(torch.rand(4, 2), ids)
    w13, w2, x = torch.randn(8, 12, 16), torch.randn(8, 16, 6), torch.randn(4, 16)
    torch.testing.assert_close(fused_experts_ref(x, w13, w2, routing, SiluAndMul()), dense_experts(x, w13, w2, routing))


def test_no_tokens_at_all():
    routing = select_experts(torch.empty(0, 8), V2_GREEDY)
    assert routing.ids.shape == (0, 2)
    out = fused_experts_ref(torch.empty(0, 16), torch.randn(8, 12, 16), torch.randn(8, 16, 6), routing, SiluAndMul())
    assert out.shape == (0, 16)


@pytest.mark.parametrize("cfg", [V2_GROUP, V3], ids=["max", "top2sum"])
def test_group_limit_respected(cfg):
    logits = torch.randn(256, cfg.num_experts) * 3
    bias = torch.randn(cfg.num_experts) * 0.3 if cfg.topk_method == "noaux_tc" else None
    _, ids = select_experts(logits, cfg, bias)
    scores = logits.softmax(-1) if cfg.scoring_func == "softmax" else logits.sigmoid()
    choice = (scores + (bias if bias is not None else 0)).view(256, cfg.n_group, -1)
    group_score = choice.max(-1).values if cfg.topk_method != "noaux_tc" else choice.topk(2, -1).values.sum(-1)
    top_groups = group_score.topk(cfg.topk_group, dim=-1).indices  # [T, topk_group]
    chosen_groups = ids // (cfg.num_experts // cfg.n_group)  # [T, k]
    assert (chosen_groups.unsqueeze(-1) == top_groups.unsqueeze(1)).any(-1).all()
    global_top = scores.add(bias if bias is not None else 0).topk(cfg.top_k, -1).indices
    assert not torch.equal(ids.sort(-1).values, global_top.sort(-1).values), "the limit never mattered"


def test_group_score_is_top2_sum_for_noaux_tc():
    # Group 0 holds the single best expert; group 1 has the best pair. With topk_group=1, noaux_tc
    # (sum of the best two) picks group 1, the V2 rule (max) would pick group 0.
    cfg = RouterConfig(num_experts=8, top_k=2, scoring_func="sigmoid", topk_method="noaux_tc", n_group=2,
                       topk_group=1)
    logits = torch.tensor([[4.0, -4, -4, -4, 2, 2, -4, -4]])
    assert sorted(select_experts(logits, cfg).ids[0].tolist()) == [4, 5]
    v2 = RouterConfig(num_experts=8, top_k=2, topk_method="group_limited_greedy", n_group=2, topk_group=1)
    assert select_experts(logits, v2).ids[0].tolist()[0] == 0


def test_ties_go_to_the_lowest_index():
    logits = torch.zeros(3, 16)
    weights, ids = select_experts(logits, V3, torch.zeros(16))
    assert ids.tolist() == [[0, 1, 2, 3]] * 3  # groups 0 and 1 tie with 2, 3: the first two win
    torch.testing.assert_close(weights, torch.full((3, 4), 2.5 / 4))
    _, ids = select_experts(torch.zeros(2, 8), V2_GREEDY)
    assert ids.tolist() == [[0, 1]] * 2
    logits = torch.tensor([[0.0, 1, 0, 1, 0, 1, 0, 0]])
    assert select_experts(logits, V2_GREEDY).ids.tolist() == [[1, 3]]


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(list(CONFIGS)), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_routing_invariants(name, num_tokens, seed):
    cfg = CONFIGS[name]
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, cfg.num_experts, generator=gen) * 4
    bias = torch.randn(cfg.num_experts, generator=gen) if cfg.topk_method == "noaux_tc" else None
    weights, ids = select_experts(logits, cfg, bias)
    assert ((ids >= 0) & (ids < cfg.num_experts)).all()
    assert all(len(set(row)) == cfg.top_k for row in ids.tolist())
    assert (weights >= 0).all()
    if cfg.norm_topk_prob:
        torch.testing.assert_close(weights.sum(-1), torch.full((num_tokens,), cfg.routed_scaling_factor))


def test_router_config_rejects_bad_values():
    with pytest.raises(ValueError, match="topk_method"):
        RouterConfig(num_experts=8, top_k=2, topk_method="random")
    with pytest.raises(ValueError, match="scoring_func"):
        RouterConfig(num_experts=8, top_k=2, scoring_func="relu")
    with pytest.raises(ValueError, match="n_group"):
        RouterConfig(num_experts=8, top_k=2, topk_method="noaux_tc", n_group=3)
    with pytest.raises(ValueError, match="top_k"):
        RouterConfig(num_experts=8, top_k=5, topk_method="noaux_tc", n_group=4, topk_group=2)


def test_router_module_computes_logits_in_float32():
    from deepserve.layers.moe import TopKRouter
    router = TopKRouter(16, V2_GREEDY).to(torch.bfloat16)
    with torch.no_grad():
        router.weight.normal_()
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    expected = select_experts(F.linear(x.float(), router.weight.float()), V2_GREEDY)
    got = router(x)
    assert got.weights.dtype == torch.float32
    assert torch.equal(got.ids, expected.ids) and torch.equal(got.weights, expected.weights)


def test_router_keeps_no_half_weight_on_cpu():
    """On CPU the hook keeps only the float32 weight; logits are F.linear in float32."""
    from deepserve.layers.moe import TopKRouter

    router = TopKRouter(16, RouterConfig(num_experts=8, top_k=2))
    router.weight.data = torch.randn(8, 16).bfloat16()
    router.process_weights_after_loading()
    x = torch.randn(3, 16).bfloat16()
    assert router.half_weight is None and router.weight.dtype == torch.float32
    assert torch.equal(router.logits(x), F.linear(x.float(), router.weight))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; this machine has none")
@pytest.mark.parametrize("tokens", [1, 8, 256])
def test_router_half_weight_logits_match_float32_gpu(tokens):
    """V2-Lite router (E=64, H=2048): the logits of the bf16 weight (the Triton GEMV for T <= SMALL_T,
    else mm(bf16, bf16 -> f32)) equal the float32 GEMM of the same values up to summation order, and
    pick the same experts."""
    from deepserve.layers.moe import TopKRouter

    torch.manual_seed(tokens)
    router = TopKRouter(2048, RouterConfig(num_experts=64, top_k=6)).cuda()
    router.weight.data = (torch.randn(64, 2048, device="cuda") / 2048 ** 0.5).bfloat16()
    router.process_weights_after_loading()
    assert router.half_weight is not None and router.half_weight.dtype == torch.bfloat16
    x = torch.randn(tokens, 2048, device="cuda").bfloat16()
    got, want = router.logits(x), F.linear(x.float(), router.weight)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.topk(6).indices.sort().values, want.topk(6).indices.sort().values)
