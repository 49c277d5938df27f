"""int8 routed experts (W8A16) in the MoE layer: `RoutedExperts.process_weights_after_loading` quantises
the stacks per (expert, row) under `int8` / `int8-weight-only` where the backend takes int8 stacks
(triton), and the layer then runs the fused W8A16 kernel.

CPU: the triton backend is forced (`RoutedExperts.backend`) and runs under the Triton interpreter in
float32. GPU: DeepSeek-V2-Lite shapes in bf16 on the CUDA defaults, eager and in a CUDA graph.
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

from deepserve.config import ModelConfig
from deepserve.layers.activation import SiluAndMul
from deepserve.layers.linear_method import PerTokenQuant, process_weights_after_loading
from deepserve.layers.moe import DeepseekMoE, RoutedExperts, Routing, RouterConfig
from deepserve.layers.moe_backend import get_moe_backend
from deepserve.quant.block_fp8_ref import quantize_rows_int8_ref
from deepserve.quant.int8 import Int8WeightOnlyMethod
from deepserve.quant.int8_experts import INT8_EXPERT_QUANTIZATIONS, quantize_experts_int8
from tests.kernels.interpret import load_kernel_module

FUSED_MOE = load_kernel_module("fused_moe")
E, TOP_K, H, I = 8, 2, 40, 24


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def forced_triton_on_cpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("forces the Triton kernels on CPU tensors, i.e. the interpreter; the @gpu tests cover CUDA")


def make_experts(backend: str | None = "triton", shape=(E, H, I), device="cpu", dtype=torch.float32) -> RoutedExperts:
    """Random stacks of `shape` (E, H, I), scaled so activations stay O(1)."""
    if device == "cpu" and backend == "triton":
        forced_triton_on_cpu()
    with torch.device(device):
        experts = RoutedExperts(*shape, "silu", backend)
    for p in (experts.w13, experts.w2):
        p.copy_(torch.randn(p.shape, device=device) / p.shape[-1] ** 0.5)
    return experts.to(dtype)


def route(tokens: int, num_experts: int = E, top_k: int = TOP_K, device="cpu") -> Routing:
    probs = torch.randn(tokens, num_experts, device=device).softmax(dim=-1)
    ids = probs.topk(top_k, dim=-1).indices
    return Routing(probs.gather(1, ids), ids)


def test_quantize_experts_int8_matches_the_reference():
    """The loader's expert-by-expert quantisation gives `quantize_rows_int8_ref`'s values bit for bit."""
    w = torch.randn(5, 24, 40).to(torch.float16)
    q, scale = quantize_experts_int8(w)
    q_ref, scale_ref = quantize_rows_int8_ref(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)
    dequant = q.double() * scale.double()[..., None]
    assert ((dequant - w.double()).abs() <= scale.double()[..., None] / 2 * (1 + 1e-6)).all()


def test_backends_take_or_refuse_int8_stacks():
    forced_triton_on_cpu()
    x = torch.randn(5, H)
    q13, s13 = quantize_rows_int8_ref(torch.randn(E, 2 * I, H) / H ** 0.5)
    q2, s2 = quantize_rows_int8_ref(torch.randn(E, H, I) / I ** 0.5)
    routing = route(5)
    triton_backend, torch_backend = get_moe_backend("triton"), get_moe_backend("torch")
    assert triton_backend.int8_weights and not torch_backend.int8_weights
    got = triton_backend.apply(x, q13, q2, routing, SiluAndMul(), None, s13, s2)
    want = FUSED_MOE.fused_moe(x, q13, q2, routing.weights, routing.ids, w13_scale=s13, w2_scale=s2)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="float expert stacks"):
        torch_backend.apply(x, q13, q2, routing, SiluAndMul(), None, s13, s2)


@pytest.mark.parametrize("quantization", sorted(INT8_EXPERT_QUANTIZATIONS))
def test_hook_quantises_the_stacks_and_releases_the_float_ones(quantization):
    experts = make_experts()
    w13, w2 = experts.w13.detach().clone(), experts.w2.detach().clone()
    old = weakref.ref(experts.w13)
    experts.process_weights_after_loading(quantization)
    gc.collect()
    assert old() is None  # nothing keeps the float stack: allocated bytes count the int8 one
    assert experts.w13.dtype == experts.w2.dtype == torch.int8
    for q, scale, w in ((experts.w13, experts.w13_scale, w13), (experts.w2, experts.w2_scale, w2)):
        q_ref, scale_ref = quantize_rows_int8_ref(w)
        assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref) and not q.requires_grad
    names = dict(experts.named_parameters())
    assert names["w13_scale"].shape == (E, 2 * I) and names["w2_scale"].shape == (E, H)
    experts.process_weights_after_loading(quantization)  # a second call keeps the int8 stacks
    assert torch.equal(experts.w13, quantize_rows_int8_ref(w13)[0])


def test_quantised_layer_runs_the_int8_kernel():
    """forward = fused_moe on the int8 stacks (exactly); near the float layer: the stacks are within
    scale / 2 per weight, which moves these O(1) outputs by ~1% of max |out| (asserted: 3%)."""
    experts = make_experts()
    float_layer = copy.deepcopy(experts)
    experts.process_weights_after_loading("int8-weight-only")
    x, routing = torch.randn(7, H), route(7)
    addend = torch.randn(7, H)
    got = experts(x, routing, addend)
    want = FUSED_MOE.fused_moe(x, experts.w13, experts.w2, routing.weights, routing.ids, addend=addend,
                               w13_scale=experts.w13_scale, w2_scale=experts.w2_scale)
    assert torch.equal(got, want)
    ref = float_layer(x, routing, addend)
    assert (got - ref).abs().max() <= 0.03 * ref.abs().max()


@pytest.mark.parametrize("quantization", [None, "int8-weight-only-asym", "int8-hadamard", "block-fp8", "fp8"])
def test_other_modes_keep_float_stacks(quantization):
    experts = make_experts()
    w13 = experts.w13.detach().clone()
    experts.process_weights_after_loading(quantization)
    assert torch.equal(experts.w13, w13) and experts.w13_scale is None and experts.w2_scale is None


def test_torch_backend_keeps_float_stacks():
    """CPU default (torch backend): no int8 kernel, the stacks stay float under int8 too."""
    experts = make_experts(backend=None)
    assert experts.moe_backend().name == "torch"
    experts.process_weights_after_loading("int8")
    assert experts.w13.dtype == torch.float32 and experts.w13_scale is None


def _moe_with_shared_experts() -> DeepseekMoE:
    forced_triton_on_cpu()
    config = ModelConfig(architecture="DeepseekV2ForCausalLM", vocab_size=16, hidden_size=H, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, intermediate_size=64,
                         max_position_embeddings=64, n_routed_experts=E, n_shared_experts=2,
                         num_experts_per_tok=TOP_K, moe_intermediate_size=I)
    moe = DeepseekMoE(config, RouterConfig(num_experts=E, top_k=TOP_K))
    for name, p in moe.named_parameters():
        p.copy_(torch.randn(p.shape) / p.shape[-1] ** 0.5 * (3.0 if name.startswith("gate.") else 1.0))
    moe.experts.backend = "triton"
    return moe


def test_moe_layer_under_int8_weight_only_keeps_the_shared_mlp_apart():
    """Through the loader's hook: routed stacks int8, the shared MLP unfused with int8 linears, and its
    output added in the kernel's sum (exactly fused_moe(..., addend=shared(x)))."""
    moe = _moe_with_shared_experts()
    process_weights_after_loading(moe, "int8-weight-only")
    assert moe.experts.w13.dtype == torch.int8 and moe.experts.w13.shape[0] == E and moe.gate.num_shared == 0
    assert isinstance(moe.shared_experts.gate_up_proj.method, Int8WeightOnlyMethod)
    x = torch.randn(6, H)
    routing, shared = moe.gate(x), moe.shared_experts(x)
    want = FUSED_MOE.fused_moe(x, moe.experts.w13, moe.experts.w2, routing.weights, routing.ids, addend=shared,
                               w13_scale=moe.experts.w13_scale, w2_scale=moe.experts.w2_scale)
    assert torch.equal(moe(x), want)


def _int8_moe() -> DeepseekMoE:
    """The layer under int8, its routed stacks W8A8 from 1 token."""
    moe = _moe_with_shared_experts()
    process_weights_after_loading(moe, "int8")
    moe.experts.w8a8_min_tokens = 1
    return moe


def _spies(monkeypatch, share: bool) -> tuple[list, list]:
    """(what the int8 W8A8 linears' apply receives: (layer, type of x), the x_quant each fused_moe call
    receives). share: the method says it takes quantised input (on CUDA it does; on CPU it quantises its
    own input: the reference path)."""
    from deepserve.quant.int8 import Int8W8A8Method

    seen_by_linear, seen_by_moe = [], []
    real_apply, real_moe = Int8W8A8Method.apply, FUSED_MOE.fused_moe
    monkeypatch.setattr(Int8W8A8Method, "apply", lambda self, layer, x, bias: (
        seen_by_linear.append((layer, type(x))), real_apply(self, layer, x, bias))[1])
    monkeypatch.setattr(FUSED_MOE, "fused_moe", lambda *a, **k: (seen_by_moe.append(k.get("x_quant")),
                                                                  real_moe(*a, **k))[1])
    if share:
        monkeypatch.setattr(Int8W8A8Method, "quantizes_input", lambda self, layer, x: True)
    return seen_by_linear, seen_by_moe


def test_int8_moe_quantises_x_once_for_the_shared_mlp_and_the_routed_experts(monkeypatch):
    """Both int8 consumers of x (the shared MLP's gate_up, the W8A8 routed stacks) take one per-token
    quantisation: the output equals the layer that quantises x in each consumer, bit for bit."""
    moe, x = _int8_moe(), torch.randn(6, H)
    _, unshared = _spies(monkeypatch, share=False)
    want = moe(x)
    assert unshared == [None]
    monkeypatch.undo()
    seen_by_linear, seen_by_moe = _spies(monkeypatch, share=True)
    got = moe(x)
    assert torch.equal(got, want)
    (q, scale), = seen_by_moe
    assert q.dtype == torch.int8 and q.shape == x.shape and scale.shape == (6,)
    gate_up_inputs = [kind for layer, kind in seen_by_linear if layer is moe.shared_experts.gate_up_proj]
    assert gate_up_inputs == [PerTokenQuant]


def test_int8_moe_keeps_x_float_where_a_consumer_does_not_quantise(monkeypatch):
    """No shared quantisation below the stacks' W8A8 size (they run W8A16), or with a hook on the shared MLP
    (calibration sees real inputs)."""
    moe = _int8_moe()
    _, seen_by_moe = _spies(monkeypatch, share=True)
    moe.experts.w8a8_min_tokens = 8
    x = torch.randn(6, H)
    assert moe._shared_input_quant(x) is None
    moe(x)
    assert seen_by_moe == [None]
    moe.experts.w8a8_min_tokens = 1
    assert moe._shared_input_quant(x) is not None
    for linear in (moe.shared_experts.gate_up_proj, moe.shared_experts.down_proj):
        handle = linear.register_forward_pre_hook(lambda *args: None)
        assert moe._shared_input_quant(x) is None
        handle.remove()
    assert moe._shared_input_quant(x) is not None
    act = moe.shared_experts.act
    moe.shared_experts.act = torch.nn.Identity()  # not SiLU-gated
    assert moe._shared_input_quant(x) is None
    moe.shared_experts.act = act
    with monkeypatch.context() as m:  # a method taking e4m3 rows: not this int8 quantisation
        m.setattr(type(moe.shared_experts.gate_up_proj.method), "quantized_input_dtype", torch.float8_e4m3fn)
        assert moe._shared_input_quant(x) is None
    assert moe._shared_input_quant(x) is not None
    moe.shared_experts.register_forward_hook(lambda *args: None)
    assert moe._shared_input_quant(x) is None


# --- GPU, DeepSeek-V2-Lite shapes (E=64, H=2048, I=1408, top-6) in bf16, CUDA defaults -------------------

V2_LITE = (64, 2048, 1408)


@pytest.mark.gpu
def test_gpu_v2_lite_hook_halves_the_expert_bytes():
    """The loader's int8 hook on CUDA: triton chosen by default, the allocated bytes (what start-up
    memory planning measures) drop by the bf16 stack minus the int8 stack and its scales."""
    torch.manual_seed(0)
    experts = make_experts(backend=None, shape=V2_LITE, device="cuda", dtype=torch.bfloat16)
    assert experts.moe_backend().name == "triton"
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    experts.process_weights_after_loading("int8")
    torch.cuda.synchronize()
    elements = 64 * (2 * 1408 * 2048 + 2048 * 1408)
    expected_drop = elements * 2 - elements - 64 * (2 * 1408 + 2048) * 4
    drop = before - torch.cuda.memory_allocated()
    assert abs(drop - expected_drop) <= 1 << 20, (drop, expected_drop)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 64, 256])
def test_gpu_v2_lite_int8_layer_near_bf16_and_graph_replay(tokens):
    """int8 layer vs the bf16 layer on the same weights: within 3% of max |out| (quantisation moves
    outputs by ~1%); captured in a CUDA graph and replayed with new x and routing: bit-identical to eager."""
    torch.manual_seed(0)
    experts = make_experts(backend=None, shape=V2_LITE, device="cuda", dtype=torch.bfloat16)
    float_layer = copy.deepcopy(experts)
    experts.process_weights_after_loading("int8-weight-only")
    x = torch.randn(tokens, 2048, device="cuda").bfloat16()
    routing = route(tokens, 64, 6, "cuda")
    out, ref = experts(x, routing).float(), float_layer(x, routing).float()
    assert (out - ref).abs().max() <= 0.03 * ref.abs().max()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = experts(x, routing)
    x.copy_(torch.randn(tokens, 2048, device="cuda").bfloat16())
    new = route(tokens, 64, 6, "cuda")
    routing.weights.copy_(new.weights)
    routing.ids.copy_(new.ids)
    graph.replay()
    assert torch.equal(captured, experts(x, routing))


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [256, 2048])
def test_gpu_v2_lite_moe_shares_the_x_quantisation(monkeypatch, tokens):
    """V2-Lite's MoE layer under int8 on the CUDA defaults, at W8A8 sizes: x quantised once for the shared
    MLP and the routed stacks gives the output of quantising it in each, bit for bit, eager and replayed
    from a CUDA graph."""
    config = ModelConfig(architecture="DeepseekV2ForCausalLM", vocab_size=16, hidden_size=2048, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, intermediate_size=64,
                         max_position_embeddings=64, n_routed_experts=64, n_shared_experts=2,
                         num_experts_per_tok=6, moe_intermediate_size=1408)
    torch.manual_seed(0)
    with torch.device("cuda"):
        moe = DeepseekMoE(config, RouterConfig(num_experts=64, top_k=6))
    for name, p in moe.named_parameters():
        p.copy_(torch.randn(p.shape, device="cuda") / p.shape[-1] ** 0.5 * (3.0 if name.startswith("gate.") else 1.0))
    moe = moe.bfloat16()
    process_weights_after_loading(moe, "int8")
    x = torch.randn(tokens, 2048, device="cuda").bfloat16()
    assert moe.experts.quantizes_input(x) and moe._shared_input_quant(x) is not None
    got = moe(x)
    with monkeypatch.context() as m:
        m.setattr(DeepseekMoE, "_shared_input_quant", lambda self, x: None)
        want = moe(x)
    assert torch.equal(got, want)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = moe(x)
    graph.replay()
    assert torch.equal(captured, got)


def test_torch_backend_refuses_int8_inputs():
    """The torch backend computes float stacks only: W8A8 requests and pre-quantised x are errors."""
    experts = make_experts(backend=None)
    x, routing = torch.randn(3, H), route(3)
    q = torch.zeros(3, H, dtype=torch.int8)
    backend = get_moe_backend("torch")
    for extra in (dict(int8_activations=True), dict(x_quant=(q, torch.ones(3)))):
        with pytest.raises(ValueError, match="float expert stacks"):
            backend.apply(x, experts.w13, experts.w2, routing, experts.act, **extra)
