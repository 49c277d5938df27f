"""head_gemv (kernels/head_gemv.py) against the exact product, its reference and MLA's torch path; the
MLAAttention wiring (layers/mla.py `_absorb_latent` / `_absorb_output`).

Tolerance (as tests/kernels/test_gemv.py argues it): s = sum_k x w exact (float64), B = sum_k |x w|.
Any float32 summation order of the K products (one more rounding for float32 products) is within
E = gamma_D * B, D = K + 2; the output is rounded once to the output dtype (precision p):
    |y - s| <= r 2^(1-p) (|s| + E) + E + r 2^-24 (f16 subnormals)
with r = 1/2 (round to nearest), r = 1 under the interpreter (it may truncate float32 -> bf16). A lost or
doubled chunk, row or head moves outputs by ~B / sqrt(K), far above E.

Weights are views of one kv_b_proj-like matrix [h * (Dn + Dv), R], split per head as `_kv_b_weights`
does: W_UK [h, Dn, R] (unit stride in N = R) and W_UV^T = W_UV.transpose(1, 2) [h, R, Dv] (unit stride
in K = R). CPU (interpreter): tiny shapes, T = 1..4, bf16 / f16 / f32, strided x and out, masked and
exact blocks, several K chunks. GPU: V2-Lite (h=16) and V3 (h=128) shapes, CUDA-graph replay.
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels.interpret import INTERPRET, device, load_kernel_module
from tests.kernels.mla_cases import V2_LITE_DIMS, V3_DIMS, layer_outputs, mla_layer

HG = load_kernel_module("head_gemv")
U = 2.0 ** -24
EPS = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 0.0}  # 2^(1-p); f32: no rounding
TINY = {torch.float16: 2.0 ** -24}
ROWS = [1, 2, 3, 4]
LAYOUTS = ["w_uk", "w_uv"]  # unit stride in N, unit stride in K


def kv_b_weights(heads: int, dn: int, dv: int, rank: int, dtype, dev) -> dict[str, torch.Tensor]:
    """{"w_uk": W_UK [h, Dn, R], "w_uv": W_UV^T [h, R, Dv]}: views of one [h * (Dn + Dv), R] matrix."""
    kv_b = (torch.randn(heads * (dn + dv), rank, device=dev) / rank ** 0.5).to(dtype)
    w = kv_b.view(heads, dn + dv, rank)
    return {"w_uk": w[:, :dn], "w_uv": w[:, dn:].transpose(1, 2)}


def within_bound(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rounding: float) -> torch.Tensor:
    """[T, h, N] bool: got within the module docstring's bound of the exact x @ w."""
    exact = torch.einsum("thk,hkn->thn", x.double(), w.double())
    mags = torch.einsum("thk,hkn->thn", x.double().abs(), w.double().abs())
    err = (x.shape[2] + 2) * U / (1 - (x.shape[2] + 2) * U) * mags
    eps = EPS[got.dtype]
    allowed = rounding * eps * (exact.abs() + err) + err + rounding * TINY.get(got.dtype, 0.0)
    return (got.double() - exact).abs() <= allowed


def assert_close_to_exact(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    assert got.dtype == x.dtype and got.shape == (x.shape[0], x.shape[1], w.shape[2])
    ok = within_bound(got, x, w, 1.0 if INTERPRET else 0.5)
    assert bool(ok.all()), f"{int((~ok).sum())} of {ok.numel()} outputs outside the bound"


def torch_path(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What layers/mla.py computes without the kernel: the einsum (W_UK) or the bmm into token-major rows (W_UV)."""
    if w.stride(2) == 1:
        return torch.einsum("thd,hdr->thr", x, w)
    out = x.new_empty(x.shape[0], x.shape[1], w.shape[2])
    torch.bmm(x.transpose(0, 1), w, out=out.transpose(0, 1))
    return out


def layer_input(rows: int, heads: int, k: int, dtype, dev, pad: int = 8) -> torch.Tensor:
    """x [T, h, K], a strided view as the layer passes q_nope (a column slice of [T, h, K + pad])."""
    return torch.randn(rows, heads, k + pad, device=dev).to(dtype)[..., :k]


# ---- CPU (interpreter) and GPU: small shapes ------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rows", ROWS)
def test_matches_exact_reference_and_torch_path(dtype, layout, rows):
    """Tiny MLA-like dims (N not a multiple of the blocks): the kernel within the bound of the exact result, and
    of its reference and the layer's torch path to within both roundings."""
    w = kv_b_weights(3, 16, 24, 40, dtype, device())[layout]
    x = layer_input(rows, 3, w.shape[1], dtype, device())
    got = HG.head_gemv(x, w)
    assert got.is_contiguous()
    assert_close_to_exact(got, x, w)
    assert_close_to_exact(HG.head_gemv_ref(x, w), x, w)
    ref, tp = HG.head_gemv_ref(x, w).float(), torch_path(x, w).float()
    tol = 2 * EPS[dtype] * ref.abs().max().item() + 1e-5
    torch.testing.assert_close(got.float(), ref, atol=tol, rtol=0)
    torch.testing.assert_close(got.float(), tp, atol=tol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("config", [(8, 16), (4, 8), (16, 64), (1, 128)], ids=["8x16", "4x8", "16x64", "1x128"])
def test_block_configs_chunks_and_tails(dtype, layout, config):
    """K = 40 in several chunks with a masked tail, N in several blocks (masked or exact), one-column blocks."""
    w = kv_b_weights(2, 32, 32, 40, dtype, device())[layout]  # w_uk: K=32, N=40; w_uv: K=40, N=32
    x = layer_input(3, 2, w.shape[1], dtype, device())
    assert_close_to_exact(HG.head_gemv(x, w, config=HG.HeadGemvConfig(*config)), x, w)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_exact_blocks_take_unmasked_loads(layout):
    """Blocks dividing K and N (the EVEN path, as at the real shapes): same bound."""
    w = kv_b_weights(2, 32, 32, 64, torch.float32, device())[layout]
    x = layer_input(2, 2, w.shape[1], torch.float32, device())
    assert_close_to_exact(HG.head_gemv(x, w, config=HG.HeadGemvConfig(16, 16)), x, w)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_strided_x_and_out(layout):
    """x with no unit stride (every other column of a head-major buffer), out a slice of a wider buffer:
    the columns beyond it untouched."""
    w = kv_b_weights(3, 16, 24, 40, torch.float32, device())[layout]
    k, n = w.shape[1], w.shape[2]
    x = torch.randn(3, 4, 2 * k, device=device()).transpose(0, 1)[..., ::2]  # [T=4, h=3, K]: strides (2K, 8K, 2)
    buf = torch.full((4, 3, n + 5), 7.0, device=device())
    got = HG.head_gemv(x, w, buf[..., :n])
    assert got.data_ptr() == buf.data_ptr() and bool((buf[..., n:] == 7.0).all())
    assert_close_to_exact(buf[..., :n], x, w)


def test_one_row_or_column_and_empty_shapes():
    """K = 1 or N = 1, where both inner strides of w can be 1; T = 0; K = 0 (zeros)."""
    dev = device()
    w_k1 = torch.randn(2, 16, 1, device=dev).transpose(1, 2)  # [h, K=1, N=16], strides (16, 1, 1)
    w_n1 = torch.randn(2, 1, 8, device=dev).transpose(1, 2)  # [h, K=8, N=1], strides (8, 1, 1)
    for w in (w_k1, w_n1):
        x = layer_input(2, 2, w.shape[1], torch.float32, dev)
        assert_close_to_exact(HG.head_gemv(x, w), x, w)
    assert HG.head_gemv(torch.empty(0, 2, 1, device=dev), w_k1).shape == (0, 2, 16)
    empty_k = torch.empty(2, 0, 8, device=dev)
    assert torch.equal(HG.head_gemv(torch.empty(3, 2, 0, device=dev), empty_k), torch.zeros(3, 2, 8, device=dev))


def test_rejects_what_it_cannot_take():
    w = kv_b_weights(2, 8, 8, 16, torch.float32, device())["w_uk"]
    x = torch.randn(2, 2, 8, device=device())
    with pytest.raises(ValueError, match="at most"):
        HG.head_gemv(torch.randn(HG.HEAD_GEMV_MAX_T + 1, 2, 8, device=device()), w)
    with pytest.raises(ValueError, match="dtype"):
        HG.head_gemv(x.bfloat16(), w)
    with pytest.raises(ValueError, match="unit stride"):
        HG.head_gemv(x, w[:, :, ::2])
    with pytest.raises(ValueError, match="out must be"):
        HG.head_gemv(x, w, torch.empty(2, 2, 8, device=device()))
    with pytest.raises(ValueError, match=r"\[T, h, K\]"):
        HG.head_gemv(x[:, :1], w)


def test_applies():
    w = kv_b_weights(2, 8, 8, 16, torch.bfloat16, "cpu")
    x = torch.randn(4, 2, 8).bfloat16()
    assert HG.head_gemv_applies(x, w["w_uk"]) and HG.head_gemv_applies(torch.randn(1, 2, 16).bfloat16(), w["w_uv"])
    assert not HG.head_gemv_applies(torch.randn(5, 2, 8).bfloat16(), w["w_uk"])  # above HEAD_GEMV_MAX_T
    assert not HG.head_gemv_applies(x[:0], w["w_uk"])
    assert not HG.head_gemv_applies(x.float(), w["w_uk"])  # dtypes differ
    assert not HG.head_gemv_applies(x, w["w_uk"].to(torch.float8_e4m3fn))
    assert not HG.head_gemv_applies(x, w["w_uk"][:, :, ::2])  # no unit stride


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads", [16, 128])  # V2-Lite, V3
def test_config_at_mla_shapes(dtype, heads):
    """8 KB weight tiles, 16-byte vectors along the unit-stride dim, >= 256 programs (~2 per SM of an H200)."""
    for k, n, k_contig in [(128, 512, False), (512, 128, True)]:  # W_UK, W_UV^T
        cfg = HG.head_gemv_config(k, n, k_contig, dtype)
        vec, threads = 16 // dtype.itemsize, 32 * cfg.num_warps
        assert cfg.block_n * cfg.block_k * dtype.itemsize == 8192 and k % cfg.block_k == 0 and n % cfg.block_n == 0
        assert (cfg.block_k if k_contig else cfg.block_n) % vec == 0
        assert cfg.block_n * cfg.block_k // vec % threads == 0  # every thread loads whole vectors
        assert -(-n // cfg.block_n) * heads >= 256


# ---- the MLAAttention wiring ---------------------------------------------------------------------

def _counting(monkeypatch) -> list:
    """Records each head_gemv call (x rows, w shape) and calls through."""
    calls, real = [], HG.head_gemv
    monkeypatch.setattr(HG, "head_gemv", lambda x, w, out=None: calls.append((x.shape[0], tuple(w.shape)))
                        or real(x, w, out))
    return calls


@pytest.mark.parametrize("rows", [1, 2, 4, 5])
@torch.no_grad()
def test_layer_absorb_products_on_the_triton_route(monkeypatch, rows):
    """Triton route (interpreted on CPU): up to HEAD_GEMV_MAX_T rows the head GEMV gives q_latent [T, h, R]
    and o [T, h, Dv] contiguous, equal to the torch path; above, the einsum / bmm as before."""
    calls = _counting(monkeypatch)
    layer = mla_layer("auto")
    q_nope = layer_input(rows, layer.num_heads, layer.nope_dim, torch.float32, "cpu")
    o_lat = torch.randn(rows, layer.num_heads, layer.kv_lora_rank)
    on_cpu = layer._absorb_latent(q_nope), layer._absorb_output(o_lat)
    layer._on_triton = lambda t: True
    q_lat, out = layer._absorb_latent(q_nope), layer._absorb_output(o_lat)
    assert len(calls) == (2 if rows <= HG.HEAD_GEMV_MAX_T else 0)
    assert out.is_contiguous() and (q_lat.is_contiguous() or rows > HG.HEAD_GEMV_MAX_T)
    torch.testing.assert_close(q_lat, on_cpu[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, on_cpu[1], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_layer_cpu_path_is_the_einsum(monkeypatch):
    """CPU tensors keep the PyTorch einsums: no kernel call, the same bits."""
    calls = _counting(monkeypatch)
    layer = mla_layer("auto")
    w = layer.kv_b_proj.weight.view(layer.num_heads, -1, layer.kv_lora_rank)
    q_nope, o_lat = torch.randn(2, layer.num_heads, layer.nope_dim), torch.randn(2, layer.num_heads, layer.kv_lora_rank)
    assert torch.equal(layer._absorb_latent(q_nope), torch.einsum("thd,hdr->thr", q_nope, w[:, :layer.nope_dim]))
    assert torch.equal(layer._absorb_output(o_lat), torch.einsum("thr,hvr->thv", o_lat, w[:, layer.nope_dim:]))
    assert not calls


@pytest.mark.parametrize("lengths", [[9], [1, 17, 40], [5, 16, 33, 2]], ids=["1-row", "3-rows", "4-rows"])
def test_layer_decode_with_head_gemv_matches_pytorch(lengths):
    """A whole decode step on the Triton route (cache write, head GEMVs, decode kernel: interpreted) equals
    the batched PyTorch absorb path and the naive loop; q_latent from the head GEMV feeds the decode kernel."""
    triton_out, torch_out, naive = layer_outputs(mla_layer("absorb"), lengths, [1] * len(lengths),
                                                 [(True, "absorb"), (False, "auto"), (False, "naive")])
    assert not triton_out.isnan().any()
    torch.testing.assert_close(triton_out, torch_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch_out, naive, atol=1e-5, rtol=1e-5)


# ---- GPU: real shapes ----------------------------------------------------------------------------

MLA_SHAPES = [(16, 128, 128, 512), (128, 128, 128, 512)]  # (h, Dn, Dv, R): V2-Lite, V3


@pytest.mark.gpu
@pytest.mark.parametrize("shape", MLA_SHAPES, ids=["v2-lite", "v3"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rows", ROWS)
def test_gpu_real_shapes(shape, layout, rows):
    """bf16 at DeepSeek shapes: within the bound, deterministic, close to cuBLAS's einsum / bmm."""
    w = kv_b_weights(*shape, torch.bfloat16, "cuda")[layout]
    x = layer_input(rows, shape[0], w.shape[1], torch.bfloat16, "cuda", pad=64)  # q_nope's stride: Dn + Dr
    got = HG.head_gemv(x, w)
    assert_close_to_exact(got, x, w)
    assert torch.equal(got, HG.head_gemv(x, w))
    tp = torch_path(x, w).float()
    torch.testing.assert_close(got.float(), tp, atol=2 * EPS[torch.bfloat16] * tp.abs().max().item(), rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", MLA_SHAPES, ids=["v2-lite", "v3"])
@pytest.mark.parametrize("rows", [1, 4])
def test_gpu_f32_and_f16(shape, rows):
    for dtype in (torch.float32, torch.float16):
        for layout, w in kv_b_weights(*shape, dtype, "cuda").items():
            x = layer_input(rows, shape[0], w.shape[1], dtype, "cuda")
            assert_close_to_exact(HG.head_gemv(x, w), x, w)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", MLA_SHAPES, ids=["v2-lite", "v3"])
@pytest.mark.parametrize("rows", [1, 3])
def test_gpu_cuda_graph_replay(shape, rows):
    """Both products captured once (W_UV into a given token-major out), replayed on new inputs: the bits of
    eager calls."""
    w = kv_b_weights(*shape, torch.bfloat16, "cuda")
    q_nope = layer_input(rows, shape[0], shape[1], torch.bfloat16, "cuda", pad=64)
    o_lat = torch.randn(rows, shape[0], shape[3], device="cuda").bfloat16()
    out = torch.empty(rows, shape[0], shape[2], device="cuda", dtype=torch.bfloat16)
    run = lambda: (HG.head_gemv(q_nope, w["w_uk"]), HG.head_gemv(o_lat, w["w_uv"], out))
    run()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q_lat, _ = run()
    for _ in range(3):
        q_nope.copy_(torch.randn_like(q_nope))
        o_lat.copy_(torch.randn_like(o_lat))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(q_lat, HG.head_gemv(q_nope, w["w_uk"]))
        assert torch.equal(out, HG.head_gemv(o_lat, w["w_uv"]))
        assert_close_to_exact(q_lat, q_nope, w["w_uk"])


@pytest.mark.gpu
@pytest.mark.parametrize("dims", [V2_LITE_DIMS, V3_DIMS], ids=["v2-lite", "v3"])
@torch.no_grad()
def test_gpu_layer_dispatch(monkeypatch, dims):
    """On CUDA the layer takes the head GEMV for 1..4 rows and cuBLAS above; both agree with the PyTorch
    einsums of the same bf16 weights."""
    calls = _counting(monkeypatch)
    layer = mla_layer("auto", dims, torch.bfloat16, "cuda")
    w = layer.kv_b_proj.weight.view(layer.num_heads, -1, layer.kv_lora_rank)
    for rows in (1, 2, 4, 8):
        calls.clear()
        q_nope = layer_input(rows, layer.num_heads, layer.nope_dim, torch.bfloat16, "cuda", pad=64)
        o_lat = torch.randn(rows, layer.num_heads, layer.kv_lora_rank, device="cuda").bfloat16()
        q_lat, out = layer._absorb_latent(q_nope), layer._absorb_output(o_lat)
        assert len(calls) == (2 if rows <= 4 else 0)
        for got, ref in [(q_lat, torch.einsum("thd,hdr->thr", q_nope, w[:, :layer.nope_dim])),
                         (out, torch.einsum("thr,hvr->thv", o_lat, w[:, layer.nope_dim:]))]:
            torch.testing.assert_close(got.float(), ref.float(), atol=2 ** -6 * ref.float().abs().max().item(), rtol=0)
