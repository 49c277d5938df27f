"""router_logits (the router GEMV) against float64 and its float32 reference.

Tolerance, from float32 accumulation: a float32 sum of n terms in any order is within
gamma_n * sum |terms| of the exact sum, gamma_n = n*u / (1 - n*u), u = 2^-24. bf16 and f16 products
are exact in float32; float32 products add one rounding each, so every logit obeys
    |logit - exact| <= gamma_{H+1} * sum_h |x[t, h] * w[e, h]|                 (exact: float64)
and the kernel and any float32 GEMM (the reference, cuBLAS) differ by at most twice that. Inputs on a
grid whose float32 sums are exact give equal bits whatever the order.

CPU (interpreter): small shapes, E and H not multiples of the blocks, T = 1, 3, 16, strided rows,
bf16 / f16 / f32. GPU: V2-Lite (E=64, H=2048) and V3 (E=256, H=7168), and CUDA-graph replay.
"""

import pytest
import torch

from tests.kernels.interpret import device, load_kernel_module

K = load_kernel_module("router_gemv")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
U = 2.0 ** -24


def gamma(n: int) -> float:
    return n * U / (1 - n * U)


def error_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[T, E] float64: gamma_{H+1} * sum_h |x w|."""
    return gamma(x.shape[1] + 1) * (x.double().abs() @ w.double().abs().t())


def assert_accumulation_error(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, slack: float = 1.0):
    exact = x.double() @ w.double().t()  # [T, E]
    err = (got.double() - exact).abs()
    bound = slack * error_bound(x, w)
    assert got.dtype == torch.float32 and got.shape == exact.shape
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3e}"


def strided(rows: int, cols: int, dtype, pad: int = 0) -> torch.Tensor:
    """[rows, cols] with row stride cols + pad (a column slice of a wider tensor)."""
    base = torch.randn(rows, cols + 2 * pad, device=device()).to(dtype)
    return base[:, pad:pad + cols]


CONFIGS = [None, (2, 4, 16), (4, 8, 32), (1, 2, 64)]  # None: gemv_config's choice


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 3, 16])
@pytest.mark.parametrize("experts,hidden", [(10, 40), (37, 300)])
@pytest.mark.parametrize("config", CONFIGS)
def test_within_float32_accumulation_error(experts, hidden, tokens, dtype, config):
    x, w = strided(tokens, hidden, dtype), strided(experts, hidden, dtype)
    cfg = None if config is None else K.GemvConfig(*config)
    got = K.router_logits(x, w, cfg)
    assert_accumulation_error(got, x, w)
    assert_accumulation_error(K.router_logits_ref(x, w), x, w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", CONFIGS)
def test_strided_rows_and_exact_grid(dtype, config):
    """x and w as column slices (row strides H+6 and H+10): the bits of the reference on inputs of
    multiples of 1/16 in (-1, 1), whose products (multiples of 2^-8) sum exactly in float32."""
    tokens, experts, hidden = 5, 13, 77
    x = (torch.randint(-15, 16, (tokens, hidden + 6)) / 16).to(dtype).to(device())[:, 3:3 + hidden]
    w = (torch.randint(-15, 16, (experts, hidden + 10)) / 16).to(dtype).to(device())[:, 5:5 + hidden]
    assert x.stride(0) == hidden + 6 and w.stride(0) == hidden + 10
    cfg = None if config is None else K.GemvConfig(*config)
    got = K.router_logits(x, w, cfg)
    assert torch.equal(got, K.router_logits_ref(x.contiguous(), w.contiguous()))


def test_catches_a_wrong_column():
    """The bound is tight enough to see one product too few: drop column 7 of x and compare."""
    x, w = strided(3, 40, torch.float32), strided(10, 40, torch.float32)
    dropped = x.clone()
    dropped[:, 7] = 0
    got = K.router_logits(dropped, w)
    with pytest.raises(AssertionError, match="max excess"):
        assert_accumulation_error(got, x, w)


def test_empty_inputs():
    dev = device()
    assert K.router_logits(torch.empty(0, 16, device=dev), torch.randn(8, 16, device=dev)).shape == (0, 8)
    zeros = K.router_logits(torch.empty(3, 0, device=dev), torch.empty(8, 0, device=dev))
    assert torch.equal(zeros, torch.zeros(3, 8, device=dev))


def test_bad_inputs():
    dev = device()
    x, w = torch.randn(2, 16, device=dev), torch.randn(8, 16, device=dev)
    with pytest.raises(ValueError, match="same H"):
        K.router_logits(x, torch.randn(8, 12, device=dev))
    with pytest.raises(ValueError, match=r"\[T, H\]"):
        K.router_logits(x[0], w)
    with pytest.raises(ValueError, match="one dtype"):
        K.router_logits(x, w.half())
    with pytest.raises(ValueError, match="one dtype"):
        K.router_logits(x.double(), w.double())
    with pytest.raises(ValueError, match="unit-stride"):
        K.router_logits(torch.randn(16, 2, device=dev).t(), w)
    with pytest.raises(ValueError, match="unit-stride"):
        K.router_logits(x, torch.randn(16, 8, device=dev).t())
    with pytest.raises(ValueError, match="powers of two"):
        K.router_logits(x, w, K.GemvConfig(1, 3, 16))


@pytest.mark.parametrize("tokens", [1, 2, 4, 8, 16, 32])
@pytest.mark.parametrize("experts,hidden", [(64, 2048), (256, 7168), (160, 5120)])
def test_default_config(tokens, experts, hidden):
    """gemv_config: <= 128 expert blocks, <= 4 tokens a program, <= 4096 products a chunk and <= 16
    unrolled chunks (V2 / V2-Lite / V3 gates); V2-Lite at T=1 is one chunk in each of 64 programs."""
    cfg = K.gemv_config(tokens, experts, hidden)
    chunks = -(-hidden // cfg.block_h)
    assert -(-experts // cfg.block_e) <= 128 and cfg.block_t <= min(4, tokens * 2 - 1)
    assert chunks <= 16 and cfg.block_t * cfg.block_e * cfg.block_h <= 4096
    if (tokens, experts, hidden) == (1, 64, 2048):
        assert cfg == K.GemvConfig(1, 1, 2048) and chunks == 1


# --- GPU, real shapes ------------------------------------------------------------------------

SHAPES = {"v2-lite": (64, 2048), "v3": (256, 7168)}


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 2, 4, 8, 16, 32])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_gpu_real_shapes(shape, tokens):
    """bf16 at V2-Lite / V3 gate shapes: within float32 accumulation error of float64, within twice
    that of torch.mm(out_dtype=float32) (the path it replaces), strided x rows too."""
    experts, hidden = SHAPES[shape]
    w = (torch.randn(experts, hidden, device="cuda") / hidden ** 0.5).bfloat16()
    for x in (torch.randn(tokens, hidden, device="cuda").bfloat16(), strided(tokens, hidden, torch.bfloat16, 64)):
        got = K.router_logits(x, w)
        assert_accumulation_error(got, x, w)
        mm = torch.mm(x, w.t(), out_dtype=torch.float32)
        assert bool(((got.double() - mm.double()).abs() <= 2 * error_bound(x, w)).all())


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 8, 16])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_gpu_cuda_graph_replay(shape, tokens):
    """Captured once, replayed on new contents of the static input: the eager call's bits."""
    experts, hidden = SHAPES[shape]
    w = (torch.randn(experts, hidden, device="cuda") / hidden ** 0.5).bfloat16()
    x = torch.randn(tokens, hidden, device="cuda").bfloat16()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        K.router_logits(x, w)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = K.router_logits(x, w)
    for _ in range(3):
        x.copy_(torch.randn_like(x, dtype=torch.float32))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, K.router_logits(x, w))
        assert_accumulation_error(out, x, w)
