"""Which batches of int8 routed experts run W8A8 (`fused_moe(..., int8_activations=True)`): only under
`--quantization int8` (not int8-weight-only), only from `W8A8_MIN_TOKENS` tokens, and never while
that constant is None (its default is 256, measured on an H200: see `quant/int8_experts.py`).

The selection tests record what `RoutedExperts` asks the triton backend for (a stand-in `fused_moe`,
no kernel runs); one test runs the real kernel under the interpreter through the layer.
"""

from __future__ import annotations

import pytest
import torch

from deepserve.layers.moe import RoutedExperts, Routing
from deepserve.layers.moe_backend import get_moe_backend
from deepserve.quant import int8_experts
from tests.unit.test_moe_int8_experts import E, FUSED_MOE, H, I, TOP_K


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def quantised_experts(quantization: str) -> RoutedExperts:
    experts = RoutedExperts(E, H, I, "silu", backend="triton")
    for p in (experts.w13, experts.w2):
        p.copy_(torch.randn(p.shape) / p.shape[-1] ** 0.5)
    experts.process_weights_after_loading(quantization)
    return experts


def route(tokens: int) -> Routing:
    probs = torch.randn(tokens, E).softmax(dim=-1)
    ids = probs.topk(TOP_K, dim=-1).indices
    return Routing(probs.gather(1, ids), ids)


@pytest.fixture
def asked(monkeypatch) -> list[bool]:
    """The int8_activations flag of every fused_moe call the triton backend makes (returns zeros)."""
    calls: list[bool] = []

    def fake(x, *args, int8_activations=False, **kwargs):
        calls.append(int8_activations)
        return torch.zeros_like(x)

    monkeypatch.setattr(FUSED_MOE, "fused_moe", fake)
    return calls


def test_default_selects_w8a8_from_256_tokens_under_int8(asked):
    assert int8_experts.W8A8_MIN_TOKENS == 256
    for quantization in ("int8", "int8-weight-only"):
        experts = quantised_experts(quantization)
        assert experts.w13.dtype == torch.int8
        assert experts.w8a8_min_tokens == (256 if quantization == "int8" else None)
        for tokens in (1, 255, 256, 4096):
            experts(torch.randn(tokens, H), route(tokens))
    assert asked == [False, False, True, True] + [False] * 4


def test_threshold_selects_w8a8_under_int8_only(monkeypatch, asked):
    monkeypatch.setattr(int8_experts, "W8A8_MIN_TOKENS", 8)
    int8 = quantised_experts("int8")
    weight_only = quantised_experts("int8-weight-only")
    assert (int8.w8a8_min_tokens, weight_only.w8a8_min_tokens) == (8, None)
    for tokens in (1, 7, 8, 33):
        int8(torch.randn(tokens, H), route(tokens))
        weight_only(torch.randn(tokens, H), route(tokens))
    assert asked == [False, False, False, False, True, False, True, False]
    assert int8_experts.w8a8_min_tokens("int8-weight-only-asym") is None
    assert int8_experts.w8a8_min_tokens(None) is None


def test_float_experts_and_torch_backend_never_w8a8(monkeypatch):
    monkeypatch.setattr(int8_experts, "W8A8_MIN_TOKENS", 1)
    experts = RoutedExperts(E, H, I, "silu", backend="torch")
    experts.process_weights_after_loading("int8")  # the torch backend keeps float stacks
    assert experts.w13.dtype == torch.float32 and experts.w8a8_min_tokens is None
    with pytest.raises(ValueError, match="float expert stacks"):
        get_moe_backend("torch").apply(torch.randn(2, H), experts.w13, experts.w2, route(2), experts.act,
                                       int8_activations=True)


def test_layer_runs_the_w8a8_kernel_from_the_threshold(monkeypatch):
    """Interpreter, float32: with the threshold at 4, a 5-token batch through the layer gives the W8A8
    kernel's result (`fused_moe_w8a8_ref` up to float32 ulps) and differs from W8A16's."""
    if torch.cuda.is_available():
        pytest.skip("forces the Triton kernels on CPU tensors; tests/kernels/test_fused_moe_w8a8.py covers CUDA")
    monkeypatch.setattr(int8_experts, "W8A8_MIN_TOKENS", 4)
    experts = quantised_experts("int8")
    x, routing = torch.randn(5, H), route(5)
    out = experts(x, routing)
    scales = (experts.w13_scale, experts.w2_scale)
    ref = FUSED_MOE.fused_moe_w8a8_ref(x, experts.w13, experts.w2, routing.weights, routing.ids, *scales)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    w8a16 = FUSED_MOE.fused_moe(x, experts.w13, experts.w2, routing.weights, routing.ids, w13_scale=scales[0],
                                w2_scale=scales[1])
    assert not torch.equal(out, w8a16)
