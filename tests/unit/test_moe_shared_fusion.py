"""Shared-expert fusion in DeepseekMoE: the shared MLP folded into the routed expert stack.

CPU: the triton backend and the router kernel are forced on (`RoutedExperts.backend`,
`TopKRouter.use_kernel`) and run under the Triton interpreter, in float32 / float16 (the
interpreter truncates bf16). GPU: V2-Lite shapes (E=64, H=2048, I=1408, top-6, 2 shared) in bf16.
"""

from __future__ import annotations

import copy

import pytest
import torch

from deepserve.config import ModelConfig
from deepserve.layers.linear_method import process_weights_after_loading
from deepserve.layers.moe import (DeepseekMoE, RoutedExperts, RouterConfig, fused_experts_ref, select_experts,
                                  set_shared_expert_fusion, split_shared_mlp, with_shared_experts)
from deepserve.quant.block_fp8_experts import Int8RoutedExperts, quantize_routed_experts_int8
from tests.kernels.interpret import load_kernel_module

FUSED_MOE = load_kernel_module("fused_moe")
load_kernel_module("moe_router")


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def moe_config(hidden=32, inter=16, experts=8, top_k=2, shared=2, **router) -> tuple[ModelConfig, RouterConfig]:
    config = ModelConfig(architecture="DeepseekV2ForCausalLM", vocab_size=16, hidden_size=hidden, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, intermediate_size=64,
                         max_position_embeddings=64, n_routed_experts=experts, n_shared_experts=shared,
                         num_experts_per_tok=top_k, moe_intermediate_size=inter)
    return config, RouterConfig(num_experts=experts, top_k=top_k, **router)


@torch.no_grad()
def make_moe(config: ModelConfig, router: RouterConfig, dtype=torch.float32, device="cpu", backend="triton",
             **kwargs) -> DeepseekMoE:
    """Random weights scaled so activations stay O(1); the triton backend and router kernel forced."""
    if device == "cpu" and backend == "triton" and torch.cuda.is_available():
        pytest.skip("forces the Triton kernels on CPU tensors, i.e. the interpreter; on a CUDA machine "
                    "kernels compile instead and the @gpu tests below cover the fused path")
    with torch.device(device):
        moe = DeepseekMoE(config, router, **kwargs)
    for name, p in moe.named_parameters():
        fan_in = p.shape[-1]
        p.copy_(torch.randn(p.shape, device=device) / fan_in ** 0.5 * (3.0 if name.startswith("gate.") else 1.0))
    moe = moe.to(dtype)
    moe.experts.backend = backend
    moe.gate.use_kernel = True if backend == "triton" else None  # None: the kernel on CUDA only
    return moe


def unfused_and_fused(moe: DeepseekMoE) -> tuple[DeepseekMoE, DeepseekMoE]:
    """(fusion off, fusion on), both after process_weights_after_loading."""
    off, on = copy.deepcopy(moe), copy.deepcopy(moe)
    off.fuse_shared_experts = False
    process_weights_after_loading(off)
    process_weights_after_loading(on)
    return off, on


def test_split_shared_mlp_is_the_same_function():
    """n experts of intermediate I (weight 1 each) sum to the shared MLP of intermediate n*I, float64."""
    moe = make_moe(*moe_config(shared=3), dtype=torch.float64, backend="torch")
    w13, w2 = split_shared_mlp(moe.shared_experts, 3)
    assert w13.shape == (3, 32, 32) and w2.shape == (3, 32, 16)
    x = torch.randn(5, 32, dtype=torch.float64)
    pieces = sum(torch.nn.functional.silu(x @ w13[j, :16].t()) * (x @ w13[j, 16:].t()) @ w2[j].t() for j in range(3))
    torch.testing.assert_close(pieces, moe.shared_experts(x), rtol=1e-12, atol=1e-12)


def test_fold_moves_the_weights_and_drops_the_mlp():
    moe = make_moe(*moe_config())
    gate_up = moe.shared_experts.gate_up_proj.weight.detach().clone()  # [2*2*16, 32]
    down = moe.shared_experts.down_proj.weight.detach().clone()  # [32, 2*16]
    w13, w2 = moe.experts.w13.detach().clone(), moe.experts.w2.detach().clone()
    mlp = moe.shared_experts
    process_weights_after_loading(moe)
    assert moe.shared_experts is None and moe.gate.num_shared == 2
    assert moe.experts.w13.shape == (10, 32, 32) and moe.experts.w2.shape == (10, 32, 16)
    assert torch.equal(moe.experts.w13[:8], w13) and torch.equal(moe.experts.w2[:8], w2)
    for j in range(2):  # expert 8 + j: gate rows j*16.., up rows 32 + j*16.., down columns j*16..
        assert torch.equal(moe.experts.w13[8 + j], torch.cat([gate_up[j * 16:(j + 1) * 16],
                                                              gate_up[32 + j * 16:32 + (j + 1) * 16]]))
        assert torch.equal(moe.experts.w2[8 + j], down[:, j * 16:(j + 1) * 16])
    assert mlp.gate_up_proj.weight.numel() == mlp.down_proj.weight.numel() == 0  # released, not doubled
    assert not any("shared_experts" in name for name, _ in moe.named_parameters())


def test_router_appends_the_shared_experts():
    """The kernel's extra columns (use_kernel) and the torch path's: ids E, E+1, weight 1."""
    moe = make_moe(*moe_config())
    process_weights_after_loading(moe)
    x = torch.randn(5, 32)
    got = moe.gate(x)
    logits = torch.nn.functional.linear(x, moe.gate.weight)
    want = with_shared_experts(select_experts(logits, moe.gate.cfg), 8, 2)
    assert got.ids.shape == (5, 4) and got.ids[:, 2:].tolist() == [[8, 9]] * 5
    assert torch.equal(got.ids, want.ids) and torch.equal(got.weights[:, 2:], torch.ones(5, 2))
    torch.testing.assert_close(got.weights, want.weights, rtol=1e-5, atol=1e-6)
    moe.gate.use_kernel = False
    assert torch.equal(moe.gate(x).ids, want.ids)


@pytest.mark.parametrize("tokens", [1, 7])
def test_fused_matches_unfused_float32(tokens):
    """float32: the two paths differ by accumulation order only."""
    off, on = unfused_and_fused(make_moe(*moe_config()))
    x = torch.randn(tokens, 32)
    want, got = off(x), on(x)
    assert on.shared_experts is None and off.shared_experts is not None
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))


def test_fused_matches_unfused_float16_within_rounding():
    """float16: the fused sum rounds each shared piece and the total once; today rounds the routed
    sum, the shared output and their sum: at most a few half-precision ulps of the output apart, and
    both about as far from a float64 evaluation of the same weights (same routing: float32 logits)."""
    moe = make_moe(*moe_config(), dtype=torch.float16)
    exact = copy.deepcopy(moe).double()
    exact.experts.backend, exact.gate.use_kernel = "torch", None
    off, on = unfused_and_fused(moe)
    x = torch.randn(9, 32).half()
    want, got, truth = off(x).float(), on(x).float(), exact(x.double()).float()
    ulp = torch.finfo(torch.float16).eps * want.abs().max()
    print(f"max |fused - unfused| {float((got - want).abs().max() / ulp):.2f} ulp; vs float64: fused "
          f"{float((got - truth).abs().max() / ulp):.2f}, unfused {float((want - truth).abs().max() / ulp):.2f}")
    assert (got - want).abs().max() <= 4 * ulp
    assert (got - truth).abs().max() <= 4 * ulp and (want - truth).abs().max() <= 4 * ulp


def test_fused_layer_is_one_fused_moe_call():
    """Exactly the stack + router columns through fused_moe (no extra add or rounding)."""
    _, on = unfused_and_fused(make_moe(*moe_config(), dtype=torch.float16))
    x = torch.randn(6, 32).half()
    routing = on.gate(x)
    want = FUSED_MOE.fused_moe(x, on.experts.w13, on.experts.w2, routing.weights, routing.ids)
    assert torch.equal(on(x), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_unfused_path_keeps_todays_rounding(dtype):
    """Fusion off, triton backend: the shared output added inside moe_sum gives exactly today's
    round(round(routed sum) + shared)."""
    off, _ = unfused_and_fused(make_moe(*moe_config(), dtype=dtype))
    x = torch.randn(5, 32).to(dtype)
    routing = off.gate(x)
    routed = FUSED_MOE.fused_moe(x, off.experts.w13, off.experts.w2, routing.weights, routing.ids)
    assert torch.equal(off(x), routed + off.shared_experts(x))


def test_v3_routing_scaled_and_normalised_with_one_shared_expert():
    """Sigmoid + noaux_tc + norm + scaling: only the routed columns are normalised and scaled."""
    config, router = moe_config(experts=16, top_k=4, shared=1, scoring_func="sigmoid", topk_method="noaux_tc",
                                n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)
    off, on = unfused_and_fused(make_moe(config, router))
    x = torch.randn(4, 32)
    routing = on.gate(x)
    assert routing.ids[:, 4].tolist() == [16] * 4 and routing.weights[:, 4].tolist() == [1.0] * 4
    torch.testing.assert_close(routing.weights[:, :4].sum(-1), torch.full((4,), 2.5))
    want = off(x)
    torch.testing.assert_close(on(x), want, rtol=0, atol=1e-5 * float(want.abs().max()))


def _tiny_deepseek(shared: int) -> torch.nn.Module:
    """A 3-layer DeepSeek-V2 (2 MoE layers), dummy weights, triton MoE + router kernel forced on."""
    from deepserve.loader.dummy import fill_dummy_weights
    from deepserve.models.deepseek_v2 import DeepseekV2ForCausalLM

    config = ModelConfig.from_hf_dict(dict(
        architectures=["DeepseekV2ForCausalLM"], vocab_size=64, hidden_size=32, intermediate_size=48,
        moe_intermediate_size=16, num_hidden_layers=3, num_attention_heads=2, n_routed_experts=8,
        n_shared_experts=shared, num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_position_embeddings=64))
    model = DeepseekV2ForCausalLM(config)
    fill_dummy_weights(model, seed=3, std=0.2)
    for layer in model.modules():
        if isinstance(layer, DeepseekMoE):
            layer.experts.backend, layer.gate.use_kernel = "triton", True
    return model.eval()


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    from deepserve.engine.kv_cache import allocate_kv_caches, bind_kv_cache
    from deepserve.forward_context import build_forward_context, forward_context

    bind_kv_cache(model, allocate_kv_caches(model, 2, 16, torch.float32, "cpu"))
    ctx = build_forward_context([len(ids)], [len(ids)], [[1]], 16)
    with forward_context(ctx):
        return model.compute_logits(model(torch.tensor(ids), ctx.positions))


def test_whole_model_through_the_loader_hook():
    """`process_weights_after_loading(model)` (the loader's): every MoE layer fused (its hook runs
    before its children's), the shared MLP gone from the parameters, logits as with fusion off."""
    model, off = _tiny_deepseek(shared=2), _tiny_deepseek(shared=2)  # the same dummy weights
    assert set_shared_expert_fusion(off, False) == 2
    process_weights_after_loading(model)
    process_weights_after_loading(off)
    layers = [m for m in model.modules() if isinstance(m, DeepseekMoE)]
    assert all(m.shared_experts is None and m.experts.w13.shape[0] == 10 for m in layers)
    assert not any("shared_experts" in name for name, _ in model.named_parameters())
    ids = [3, 17, 5, 60, 22, 9, 41]
    want, got = _logits(off, ids), _logits(model, ids)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))


# --- where the fusion does not apply: today's path, unchanged ------------------------------------------


def _assert_unfused(moe: DeepseekMoE) -> None:
    assert moe.shared_experts is not None and moe.gate.num_shared == 0
    stack = moe.experts.w13 if isinstance(moe.experts, RoutedExperts) else moe.experts.w13_q
    assert stack.shape[0] == moe.gate.cfg.num_experts


def test_cpu_torch_backend_stays_unfused_and_bit_identical():
    moe = make_moe(*moe_config(), backend=None)  # CPU default: the torch backend
    process_weights_after_loading(moe)
    _assert_unfused(moe)
    x = torch.randn(5, 32)
    routing = moe.gate(x)
    before = fused_experts_ref(x, moe.experts.w13, moe.experts.w2, routing, moe.experts.act) + moe.shared_experts(x)
    assert torch.equal(moe(x), before)  # the formula before this change


@pytest.mark.parametrize("quantization", ["int8", "block-fp8"])
def test_quantised_model_stays_unfused(quantization):
    """The serving quantization reaches DeepseekMoE's hook: its shared MLP stays for the method."""
    moe = make_moe(*moe_config())
    assert not moe.can_fuse_shared_experts(quantization)
    moe.process_weights_after_loading(quantization)
    _assert_unfused(moe)


def test_int8_routed_experts_stay_unfused_and_add_the_shared_output():
    moe = make_moe(*moe_config())
    assert quantize_routed_experts_int8(moe) == 1 and isinstance(moe.experts, Int8RoutedExperts)
    process_weights_after_loading(moe)
    _assert_unfused(moe)
    x = torch.randn(3, 32)
    routing = moe.gate(x)
    assert torch.equal(moe(x), moe.experts(x, routing) + moe.shared_experts(x))


def test_switched_off_sharded_fp8_or_biased_shared_mlp_stays_unfused():
    moe = make_moe(*moe_config())
    assert set_shared_expert_fusion(moe, False) == 1 and not moe.can_fuse_shared_experts()
    set_shared_expert_fusion(moe, True)
    assert moe.can_fuse_shared_experts()
    for edit in (lambda m: setattr(m.shared_experts.down_proj, "tp_size", 2),
                 lambda m: setattr(m.shared_experts.gate_up_proj, "weight_scale_inv", torch.ones(1)),
                 lambda m: setattr(m.shared_experts.gate_up_proj, "bias", torch.nn.Parameter(torch.zeros(64))),
                 lambda m: m.shared_experts.half()):
        other = copy.deepcopy(moe)
        edit(other)
        assert not other.can_fuse_shared_experts()
    no_shared = make_moe(*moe_config(shared=0))
    process_weights_after_loading(no_shared)
    assert no_shared.shared_experts is None and no_shared.gate.num_shared == 0
    assert no_shared.experts.w13.shape[0] == 8


# --- GPU, DeepSeek-V2-Lite shapes -----------------------------------------------------------------------

V2_LITE = dict(hidden=2048, inter=1408, experts=64, top_k=6, shared=2)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 8, 256])
def test_gpu_v2_lite_fused_matches_unfused(tokens):
    """bf16, real shapes, the CUDA defaults (no forcing): fused vs today's path within bf16 rounding
    (relative to max |out|), and both against a float32 evaluation of the same bf16 weights."""
    torch.manual_seed(0)
    moe = make_moe(*moe_config(**V2_LITE), dtype=torch.bfloat16, device="cuda", backend=None)
    off, on = unfused_and_fused(moe)
    assert on.experts.w13.shape == (66, 2816, 2048) and on.shared_experts is None
    x = torch.randn(tokens, 2048, device="cuda").bfloat16()
    want, got = off(x).float(), on(x).float()
    scale = want.abs().max()
    assert (got - want).abs().max() <= 2 ** -6 * scale, float((got - want).abs().max() / scale)
    assert torch.equal(on.gate(x).ids[:, :6], off.gate(x).ids)
    f32 = copy.deepcopy(off).float()
    truth = f32(x.float())
    assert (got - truth).abs().max() <= 2 * (want - truth).abs().max() + 2 ** -8 * scale


@pytest.mark.gpu
def test_gpu_v2_lite_fused_cuda_graph_replay():
    """The fused layer (router kernel with shared columns, fused_moe, moe_sum) captures and replays."""
    torch.manual_seed(0)
    moe = make_moe(*moe_config(**V2_LITE), dtype=torch.bfloat16, device="cuda", backend=None)
    process_weights_after_loading(moe)
    x = torch.randn(4, 2048, device="cuda").bfloat16()
    moe(x)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe(x)
    x.copy_(torch.randn(4, 2048, device="cuda").bfloat16())
    graph.replay()
    assert torch.equal(out, moe(x))
