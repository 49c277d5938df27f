"""MLA varlen prefill attention (expanded K/V, shared rope key) vs its PyTorch reference.

CPU: the Triton interpreter at tiny shapes in fp32 and fp16 (the 3.9 interpreter's tl.dot is wrong
for bf16). GPU: DeepSeek-V2-Lite (h=16) and V3 (h=128) head counts, Dn=128, Dr=64, Dv=128, bf16,
contexts up to 4096.
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels.interpret import device, load_kernel_module
from tests.kernels.mla_cases import V2_LITE_DIMS, V3_DIMS, layer_outputs, mla_layer

K = load_kernel_module("mla_prefill_attention")
V3_SCALE = 192 ** -0.5  # qk_head_dim 128 + 64


def make_case(seqs: list[tuple[int, int]], heads: int, nope: int, rope: int, v_dim: int, dtype: torch.dtype,
              dev, rank: int = 32, seed: int = 0):
    """seqs: (context length, new tokens) per sequence. Returns the kernel's inputs as the MLA layer
    passes them: q views into [T, h, Dn + Dr], k_nope / v views into a kv_b_proj output
    [S, h, Dn + Dv], k_pe a view into a gathered latent [S, R + Dr]."""
    gen = torch.Generator().manual_seed(seed)
    total_q, total_k = sum(q for _, q in seqs), sum(s for s, _ in seqs)
    q = torch.randn(total_q, heads, nope + rope, generator=gen).to(dev, dtype)  # [T, h, Dn + Dr]
    kv = torch.randn(total_k, heads, nope + v_dim, generator=gen).to(dev, dtype)  # [S, h, Dn + Dv]
    latent = torch.randn(total_k, rank + rope, generator=gen).to(dev, dtype)  # [S, R + Dr]
    cu_q = torch.tensor([0, *torch.tensor([q for _, q in seqs]).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    cu_k = torch.tensor([0, *torch.tensor([s for s, _ in seqs]).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    return q[..., :nope], q[..., nope:], kv[..., :nope], latent[:, rank:], kv[..., nope:], cu_q, cu_k


def run(seqs, heads=2, nope=32, rope=16, v_dim=32, dtype=torch.float32, dev=None, scale=0.3, rank=32, **kwargs):
    """kwargs go to the kernel; `rank` sizes the latent the shared rope key is a view into."""
    args = make_case(seqs, heads, nope, rope, v_dim, dtype, dev or device(), rank=rank)
    out = K.mla_prefill_attention(*args, scale, **kwargs)
    return out, K.mla_prefill_attention_ref(*args, scale)


# (context, new tokens): a 1-token sequence, a decode row (q_len 1) with a long context, a prefix-cache
# hit (context longer than new tokens, across tile boundaries), a plain prefill ending on a block edge.
MIXED = [(1, 1), (37, 1), (45, 19), (32, 32), (17, 16)]


@pytest.mark.parametrize("block_m, block_n", [(16, 16), (32, 16), (16, 32)])
def test_mixed_batch_fp32(block_m, block_n):
    out, ref = run(MIXED, block_m=block_m, block_n=block_n)
    assert out.shape == (69, 2, 32) and out.is_contiguous() and not out.isnan().any()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_fp16_odd_dims_padded_with_masks():
    """Dn, Dr, Dv not powers of two (and Dr < 16): the head dims are padded with masks."""
    out, ref = run([(20, 20), (9, 3), (1, 1)], heads=3, nope=24, rope=8, v_dim=20, dtype=torch.float16,
                   block_m=16, block_n=16)
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)


def test_single_sequence_and_single_token():
    out, ref = run([(50, 50)], block_m=16, block_n=16)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out, ref = run([(1, 1)], block_m=16, block_n=16)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_decode_rows_only_and_default_blocks():
    """Every row q_len 1 (a mixed batch's decode rows), block sizes from the host heuristic."""
    out, ref = run([(5, 1), (64, 1), (17, 1)])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_a_tile_per_sequence_even_past_the_token_count():
    """Many short sequences: tiles are numbered cu_q[i] // BLOCK_M + i, so the grid needs the + B."""
    seqs = [(3 + i, 1 + i % 3) for i in range(9)]
    out, ref = run(seqs, block_m=16, block_n=16)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_empty_batch():
    args = make_case([], 2, 32, 16, 32, torch.float32, device())
    assert K.mla_prefill_attention(*args, 0.3).shape == (0, 2, 32)


def test_rejects_bad_inputs():
    q_nope, q_pe, k_nope, k_pe, v, cu_q, cu_k = make_case([(4, 2)], 2, 32, 16, 32, torch.float32, device())
    with pytest.raises(ValueError, match="shapes disagree"):
        K.mla_prefill_attention(q_nope, q_pe, k_nope, k_pe[:, :8], v, cu_q, cu_k, 0.3)
    with pytest.raises(ValueError, match="k_pe \\[S, Dr\\]"):
        K.mla_prefill_attention(q_nope, q_pe, k_nope, k_pe[:, None].expand(-1, 2, -1), v, cu_q, cu_k, 0.3)
    with pytest.raises(ValueError, match="dtype"):
        K.mla_prefill_attention(q_nope.half(), q_pe, k_nope, k_pe, v, cu_q, cu_k, 0.3)
    with pytest.raises(ValueError, match="int32"):
        K.mla_prefill_attention(q_nope, q_pe, k_nope, k_pe, v, cu_q.long(), cu_k, 0.3)
    with pytest.raises(ValueError, match="\\[B \\+ 1\\]"):
        K.mla_prefill_attention(q_nope, q_pe, k_nope, k_pe, v, cu_q, cu_k[:1], 0.3)
    with pytest.raises(ValueError, match="last dim"):
        K.mla_prefill_attention(q_nope.transpose(1, 2).contiguous().transpose(1, 2), q_pe, k_nope, k_pe, v,
                                cu_q, cu_k, 0.3)
    with pytest.raises(ValueError, match="powers of two"):
        K.mla_prefill_attention(q_nope, q_pe, k_nope, k_pe, v, cu_q, cu_k, 0.3, block_m=8)


# ------------------------------------------------------------------ through layers/mla.py

# (context lengths, new tokens): prefill chunks, decode rows, a prefix-cache hit, a 1-token prompt.
LAYER_MIXED = ([7, 20, 33, 1, 40, 16], [7, 1, 5, 1, 12, 16])


@pytest.mark.parametrize("lengths, query_lens", [LAYER_MIXED, ([9, 30, 17], [9, 4, 17])],
                         ids=["mixed", "prefill-only"])
def test_layer_kernel_routes_match_the_naive_loop(lengths, query_lens):
    """MLAAttention.forward on a non-decode batch: the GPU route (mla_batch plan, one gather + one kv_b_proj,
    the prefill kernel; in "auto" the decode rows through the absorbed decode kernel), interpreted on CPU,
    equals the PyTorch per-sequence naive loop; so does the forced-absorb loop."""
    auto, naive_kernel, naive_loop, absorb_loop = layer_outputs(
        mla_layer("auto"), lengths, query_lens, [(True, "auto"), (True, "naive"), (False, "naive"), (True, "absorb")])
    assert not auto.isnan().any() and not naive_kernel.isnan().any()
    torch.testing.assert_close(naive_kernel, naive_loop, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(auto, naive_loop, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(absorb_loop, naive_loop, atol=1e-5, rtol=1e-5)


def test_batch_plan_indices():
    """The host plan of a mixed batch: decode rows split off, prefill rows, offsets and slots."""
    from deepserve.forward_context import build_forward_context
    from deepserve.layers.mla_batch import plan_mla_batch

    ctx = build_forward_context([3, 1, 2], [3, 18, 5], [[4], [9, 2], [7]], block_size=16)
    plan = plan_mla_batch(ctx, split_decode_rows=True)
    assert plan.decode.tokens.tolist() == [3] and plan.decode.seqs.tolist() == [1]
    assert plan.decode.max_seq_len == 18
    assert plan.prefill.tokens.tolist() == [0, 1, 2, 4, 5]
    assert plan.prefill.cu_q.tolist() == [0, 3, 5] and plan.prefill.cu_k.tolist() == [0, 3, 8]
    assert plan.prefill.cu_q.dtype == plan.prefill.cu_k.dtype == torch.int32
    assert plan.prefill.slots.tolist() == [64, 65, 66, 112, 113, 114, 115, 116]
    whole = plan_mla_batch(ctx, split_decode_rows=False)
    assert whole.decode is None and whole.prefill.tokens is None
    assert whole.prefill.slots.tolist()[3:21] == [144 + p for p in range(16)] + [32, 33]
    only_decode = plan_mla_batch(build_forward_context([1, 1], [4, 2], [[3], [5]], 16), True)
    assert only_decode.prefill is None and only_decode.decode.tokens.tolist() == [0, 1]


def test_layers_of_a_step_share_one_plan(monkeypatch):
    """Two MLA layers in one forward context: the host plan is built once (ForwardContext.derived)."""
    import deepserve.layers.mla as mla_module
    from deepserve.forward_context import build_forward_context, forward_context

    calls = []
    original = mla_module.plan_mla_batch
    monkeypatch.setattr(mla_module, "plan_mla_batch", lambda ctx, split: calls.append(split) or original(ctx, split))
    ctx = build_forward_context([3, 1], [3, 5], [[1], [2]], 16)
    q_nope, q_pe = torch.randn(4, 4, 16), torch.randn(4, 4, 8)
    layers = (mla_layer("auto"), mla_layer("auto"))
    for layer in layers:
        layer.kv_cache = torch.randn(3, 16, 40)  # [N, bs, R + Dr]
    with forward_context(ctx), torch.no_grad():
        outs = [layer._mixed_kernels(q_nope, q_pe, layer.kv_cache.view(48, 40), ctx) for layer in layers]
    assert calls == [True] and outs[0].shape == (4, 4, 16)


@pytest.mark.gpu
@pytest.mark.parametrize("dims", [V2_LITE_DIMS, V3_DIMS], ids=["v2-lite", "v3"])
def test_gpu_layer_mixed_batch_matches_naive_loop_bf16(dims):
    """The wiring on the GPU, bf16: prefill chunks, prefix-cache hits and decode rows with contexts up
    to 4096, kernel routes ("auto" and "naive") vs the PyTorch per-sequence naive loop."""
    lengths, query_lens = [4096, 1, 3000, 700, 2048, 17], [512, 1, 1, 700, 100, 1]
    auto, naive_kernel, naive_loop = layer_outputs(mla_layer("auto", dims, torch.bfloat16, "cuda"), lengths,
                                                   query_lens, [(True, "auto"), (True, "naive"), (False, "naive")])
    scale = naive_loop.float().abs().max()
    for out in (auto, naive_kernel):
        err = (out.float() - naive_loop.float()).abs().max() / scale
        assert err < 2e-2, f"max |kernel route - naive loop| / max |naive loop| = {err:.3g}"


# ------------------------------------------------------------------ GPU, real shapes


def _gpu_seqs(batch: int, seed: int) -> list[tuple[int, int]]:
    """Random (context, new tokens) up to 4096, with a decode row, a 1-token prompt and a prefix hit."""
    gen = torch.Generator().manual_seed(seed)
    seqs = []
    for _ in range(batch):
        ctx = int(torch.randint(1, 4097, (1,), generator=gen))
        seqs.append((ctx, int(torch.randint(1, ctx + 1, (1,), generator=gen))))
    seqs[0] = (4096, 4096)
    if batch > 3:
        seqs[1:4] = [(3000, 1), (1, 1), (2500, 700)]
    return seqs


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [16, 128])  # V2-Lite, V3
@pytest.mark.parametrize("batch", [1, 6, 24])
def test_gpu_deepseek_shapes_bf16(heads, batch):
    out, ref = run(_gpu_seqs(batch, batch), heads=heads, nope=128, rope=64, v_dim=128, dtype=torch.bfloat16,
                   dev="cuda", scale=V3_SCALE, rank=512)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("block_m, block_n", [(64, 64), (128, 64), (128, 32)])
def test_gpu_block_sizes_agree_bf16(block_m, block_n):
    out, ref = run(_gpu_seqs(8, 0), heads=16, nope=128, rope=64, v_dim=128, dtype=torch.bfloat16, dev="cuda",
                   scale=V3_SCALE, rank=512, block_m=block_m, block_n=block_n)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_gpu_no_host_sync():
    """The launch reads no device value on the host: it captures in a CUDA graph."""
    args = make_case([(300, 100), (50, 1)], 16, 128, 64, 128, torch.bfloat16, "cuda", rank=512)
    K.mla_prefill_attention(*args, V3_SCALE)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = K.mla_prefill_attention(*args, V3_SCALE)
    graph.replay()
    torch.cuda.synchronize()
    ref = K.mla_prefill_attention_ref(*args, V3_SCALE)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
