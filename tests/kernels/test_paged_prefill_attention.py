"""Varlen paged prefill attention (causal with offset, GQA) vs its PyTorch reference.

Batches mix fresh prefills (context == new tokens), chunked prefills / prefix hits (cached context
before the new tokens) and decode rows (one new token), over shuffled blocks of a NaN-filled cache.
8-bit caches (int8 / fp8, per-row scales; rows nobody owns get NaN scales): the kernel against the
reference over the dequantised cache, and against attention over the unquantised cache within the
bound the round trip implies (tests/kernels/kv_quant_cases.py).
"""

import pytest
import torch

from tests.kernels.interpret import device, load_kernel_module
from tests.kernels.kv_quant_cases import QUANT_DTYPES, attention_bound, quantized_case
from tests.kernels.paged_cases import make_case, query_start_loc

pre = load_kernel_module("paged_prefill_attention")

# (context after this step, new tokens): decode, fresh prefill across blocks, prefix hit, chunk.
TINY = [(1, 1), (17, 17), (40, 9), (33, 1), (20, 12)]


def _run(spec, heads, kv_heads, head_dim, block_size, dtype, dev, **kwargs):
    seq_lens, q_lens = [s for s, _ in spec], [n for _, n in spec]
    case = make_case(seq_lens, kv_heads, head_dim, block_size, dtype, dev)
    q = torch.randn(sum(q_lens), heads, head_dim, device=dev).to(dtype)
    starts = query_start_loc(q_lens, dev)
    scale = head_dim ** -0.5
    out = pre.paged_prefill_attention(q, case.kv_cache, case.block_tables, starts, case.seq_lens, scale, **kwargs)
    ref = pre.paged_prefill_attention_ref(q, case.kv_cache, case.block_tables, starts, case.seq_lens, scale)
    return out, ref


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (32, 32)])
def test_tiny_mixed_batch_fp32(block_m, block_n):
    out, ref = _run(TINY, 4, 2, 16, 16, torch.float32, device(), block_m=block_m, block_n=block_n)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_tiny_group_of_three_fp16_block_8():
    """G = 3 does not divide BLOCK_M: the last rows of each tile are padding."""
    spec = [(9, 9), (30, 5), (2, 1)]
    out, ref = _run(spec, 6, 2, 32, 8, torch.float16, device(), block_m=16, block_n=16)
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)


def test_non_contiguous_query_rows():
    """q as a view of a fused projection: token stride larger than H * D."""
    spec = [(5, 5), (18, 3)]
    seq_lens, q_lens = [s for s, _ in spec], [n for _, n in spec]
    case = make_case(seq_lens, 1, 16, 16, torch.float32, device())
    fused = torch.randn(sum(q_lens), 5, 16, device=device())
    q = fused[:, :2]  # [T, 2, 16], stride(0) = 80
    starts = query_start_loc(q_lens, device())
    out = pre.paged_prefill_attention(q, case.kv_cache, case.block_tables, starts, case.seq_lens, 0.25,
                                      block_m=16, block_n=16)
    ref = pre.paged_prefill_attention_ref(q, case.kv_cache, case.block_tables, starts, case.seq_lens, 0.25)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_rejects_mismatched_batch():
    case = make_case([4, 4], 1, 16, 16, torch.float32, device())
    q = torch.randn(8, 2, 16, device=device())
    with pytest.raises(ValueError, match="batch"):
        pre.paged_prefill_attention(q, case.kv_cache, case.block_tables, query_start_loc([4], device()),
                                    case.seq_lens, 0.25)


GPU_SPECS = {
    "fresh_4096": [(4096, 4096)],
    "mixed": [(1000, 1000), (3000, 96), (4095, 1), (17, 17), (2048, 512), (1, 1), (600, 1)],
    "chunked_prefix_hits": [(4096, 512), (2064, 2048), (129, 1), (513, 513)],
    "decode_rows_256": [(int(n), 1) for n in torch.linspace(1, 4096, 256).tolist()],
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_SPECS))
def test_gpu_qwen7b_shapes_bf16(name):
    out, ref = _run(GPU_SPECS[name], 28, 4, 128, 16, torch.bfloat16, "cuda")
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("block_m,block_n,num_warps", [(64, 64, 4), (128, 64, 8), (128, 32, 8)])
def test_gpu_configs_llama8b_bf16(block_m, block_n, num_warps):
    out, ref = _run(GPU_SPECS["mixed"], 32, 8, 128, 16, torch.bfloat16, "cuda",
                    block_m=block_m, block_n=block_n, num_warps=num_warps)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


# ------------------------------------------------------------------------------- 8-bit caches


def _run_quantized(spec, heads, kv_heads, head_dim, block_size, dtype, kv_dtype, dev, **kwargs):
    """(kernel over the 8-bit cache, reference over its dequantisation, reference over the float
    cache, the derived bound on the last two's difference)."""
    seq_lens, q_lens = [s for s, _ in spec], [n for _, n in spec]
    case = make_case(seq_lens, kv_heads, head_dim, block_size, torch.float32 if dev != "cuda" else dtype, dev)
    data, scales = quantized_case(case, kv_dtype)
    q = torch.randn(sum(q_lens), heads, head_dim, device=dev).to(dtype)
    starts = query_start_loc(q_lens, dev)
    scale = head_dim ** -0.5
    args = (case.block_tables, starts, case.seq_lens, scale)
    out = pre.paged_prefill_attention(q, data, *args, kv_scales=scales, **kwargs)
    ref = pre.paged_prefill_attention_ref(q, data, *args, kv_scales=scales)
    exact = pre.paged_prefill_attention_ref(q, case.kv_cache, *args)
    bound = attention_bound(q, list(zip(starts.tolist()[:-1], starts.tolist()[1:])), case, scales, kv_dtype, scale)
    return out, ref, exact, bound


@pytest.mark.parametrize("kv_dtype", QUANT_DTYPES)
def test_tiny_mixed_batch_quantized_cache_fp32(kv_dtype):
    out, ref, exact, bound = _run_quantized(TINY, 4, 2, 16, 16, torch.float32, kv_dtype, device(),
                                            block_m=16, block_n=16)
    assert not out.isnan().any()  # NaN scales of rows nobody owns were never read
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert ((out - exact).abs().cpu() <= bound + 1e-5).all()


@pytest.mark.parametrize("kv_dtype", QUANT_DTYPES)
def test_tiny_group_of_three_quantized_cache_fp16(kv_dtype):
    out, ref, _, _ = _run_quantized([(9, 9), (30, 5), (2, 1)], 6, 2, 32, 8, torch.float16, kv_dtype, device(),
                                    block_m=16, block_n=16)
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", QUANT_DTYPES)
@pytest.mark.parametrize("name", ["mixed", "chunked_prefix_hits"])
def test_gpu_qwen7b_shapes_quantized_bf16(kv_dtype, name):
    out, ref, exact, bound = _run_quantized(GPU_SPECS[name], 28, 4, 128, 16, torch.bfloat16, kv_dtype, "cuda")
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    assert ((out.float() - exact.float()).abs().cpu() <= bound + 2e-2).all()
