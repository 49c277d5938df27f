"""Programmatic dependent launch (kernels/pdl.py): when it is on, and that a chain of dependent PDL kernels
computes exactly what it computes without PDL (eager and replayed from a CUDA graph)."""

from __future__ import annotations

import pytest
import torch

from deepserve import envs
from tests.kernels.interpret import load_kernel_module

pdl = load_kernel_module("pdl")


@pytest.fixture
def fresh_pdl_cache():
    pdl._pdl_on.cache_clear()
    yield
    pdl._pdl_on.cache_clear()


def test_pdl_env_parsing(monkeypatch):
    monkeypatch.delenv("DEEPSERVE_PDL", raising=False)
    assert envs.pdl_enabled() is True
    monkeypatch.setenv("DEEPSERVE_PDL", "0")
    assert envs.pdl_enabled() is False
    monkeypatch.setenv("DEEPSERVE_PDL", "yes")
    with pytest.raises(ValueError, match="DEEPSERVE_PDL='yes' must be 0 or 1"):
        envs.pdl_enabled()


def test_no_pdl_off_cuda():
    """CPU tensors (the interpreter) never get the launch keywords: PDL stays False, the prologue compiles away."""
    assert pdl.pdl_launch(torch.device("cpu")) == {}


def _chain(x: torch.Tensor, weights: list[torch.Tensor], norm_w: torch.Tensor) -> torch.Tensor:
    """Each step reads what the previous kernel wrote: add + RMSNorm, then a GEMV, then SiLU-and-mul."""
    rms_norm = load_kernel_module("rms_norm").rms_norm
    gemv = load_kernel_module("gemv").gemv
    silu_and_mul = load_kernel_module("silu_and_mul").silu_and_mul
    hidden, residual = x, torch.zeros_like(x)
    for w in weights:
        normed, residual = rms_norm(hidden, residual, norm_w, 1e-6)
        hidden = silu_and_mul(gemv(normed, w))
    return hidden + residual


@pytest.mark.gpu
def test_pdl_chain_matches_without_pdl(monkeypatch, fresh_pdl_cache):
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs compute capability 9.0+")
    torch.manual_seed(0)
    dev = torch.device("cuda")
    hidden = 1024
    x = torch.randn(1, hidden, device=dev, dtype=torch.bfloat16)
    weights = [(torch.randn(2 * hidden, hidden, device=dev) / hidden ** 0.5).bfloat16() for _ in range(24)]
    norm_w = torch.rand(hidden, device=dev, dtype=torch.bfloat16) + 0.5

    monkeypatch.setenv("DEEPSERVE_PDL", "0")
    assert pdl.pdl_launch(dev) == {}
    expected = _chain(x, weights, norm_w)

    monkeypatch.setenv("DEEPSERVE_PDL", "1")
    pdl._pdl_on.cache_clear()
    assert pdl.pdl_launch(dev) == {"PDL": True, "launch_pdl": True}
    assert torch.equal(_chain(x, weights, norm_w), expected)

    static_x = x.clone()
    _chain(static_x, weights, norm_w)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _chain(static_x, weights, norm_w)
    for i in range(20):
        static_x.copy_(x if i % 2 == 0 else -x)
        graph.replay()
        want = expected if i % 2 == 0 else _chain(-x, weights, norm_w)
        torch.cuda.synchronize()
        assert torch.equal(out, want), f"replay {i}"
