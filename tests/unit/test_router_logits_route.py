"""TopKRouter.logits: which GEMM computes the router logits.

The Triton route (CUDA, or `use_kernel=True` here on CPU under the interpreter) takes the router
GEMV (`kernels/router_gemv`) for T <= SMALL_T with the weight of x's dtype; larger T, the CPU route
and an x dtype without a matching weight keep the torch GEMM.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deepserve.layers.moe import SMALL_T, RouterConfig, TopKRouter
from tests.kernels.interpret import load_kernel_module

GEMV = load_kernel_module("router_gemv")
load_kernel_module("moe_router")
CFG = RouterConfig(num_experts=8, top_k=2)


def loaded_router(dtype=torch.float32) -> TopKRouter:
    router = TopKRouter(16, CFG)
    router.weight.data = torch.randn(8, 16).to(dtype)
    router.process_weights_after_loading()  # CPU: float32 weight, no half weight
    return router


@pytest.fixture
def gemv_calls(monkeypatch) -> list:
    """Records (T, weight) of each router GEMV call; returns the float32 GEMM's logits."""
    calls = []

    def fake(x, w):
        calls.append((x.shape[0], w))
        return F.linear(x.float(), w.float())

    monkeypatch.setattr(GEMV, "router_logits", fake)
    return calls


def test_small_t_takes_the_gemv_on_the_triton_route(gemv_calls):
    router = loaded_router()
    router.use_kernel = True
    for tokens in (1, SMALL_T):
        router.logits(torch.randn(tokens, 16))
    router.logits(torch.randn(SMALL_T + 1, 16))
    assert [t for t, _ in gemv_calls] == [1, SMALL_T]
    assert all(w is router.weight for _, w in gemv_calls)


def test_torch_gemm_off_the_triton_route_and_without_a_weight_of_x_dtype(gemv_calls):
    router = loaded_router()
    x = torch.randn(2, 16)
    router.use_kernel = None  # CPU: the torch route
    assert router.gemv_weight(x) is None
    assert torch.equal(router.logits(x), F.linear(x, router.weight))
    router.use_kernel = True
    assert router.gemv_weight(x.bfloat16()) is None  # float32 weight only, bf16 x: the torch GEMM
    assert router.gemv_weight(x.double()) is None
    assert router.gemv_weight(torch.randn(16, 2).t()) is None  # not unit-stride in H
    router.logits(x.bfloat16())
    assert gemv_calls == []


def test_half_weight_is_the_gemv_weight_for_half_x(gemv_calls):
    """The hook keeps a half-precision weight where CUDA's mm has a float32 output; set here by hand."""
    router = loaded_router(torch.bfloat16)
    router.half_weight = router.weight.data.bfloat16()
    router.use_kernel = True
    router.logits(torch.randn(3, 16).bfloat16())
    router.logits(torch.randn(3, 16))
    assert len(gemv_calls) == 2
    assert gemv_calls[0][1] is router.half_weight and gemv_calls[1][1] is router.weight


def test_forward_through_the_gemv_matches_the_torch_route():
    """Unpatched: the interpreted GEMV + routing kernel pick the torch route's experts."""
    router = loaded_router()
    x = torch.randn(SMALL_T, 16)
    router.use_kernel = True
    got = router(x)
    torch.testing.assert_close(router.logits(x), F.linear(x, router.weight), rtol=1e-6, atol=1e-5)
    router.use_kernel = False
    want = router(x)
    assert torch.equal(got.ids, want.ids)
    torch.testing.assert_close(got.weights, want.weights, rtol=1e-5, atol=1e-6)


def test_large_gates_keep_the_torch_gemm(gemv_calls, monkeypatch):
    """V3's 256 x 7168 gate ran slower through the GEMV than torch.mm on an H200: gates above
    GEMV_MAX_WEIGHT elements never take it."""
    from deepserve.layers import moe

    assert moe.GEMV_MAX_WEIGHT >= 64 * 2048 and 256 * 7168 > moe.GEMV_MAX_WEIGHT  # V2-Lite's gate in, V3's out
    router = loaded_router()
    router.use_kernel = True
    x = torch.randn(1, 16)
    assert router.gemv_weight(x) is router.weight  # 8 x 16: small
    monkeypatch.setattr(moe, "GEMV_MAX_WEIGHT", 8 * 16 - 1)
    assert router.gemv_weight(x) is None
