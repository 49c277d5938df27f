"""Paged split-K decode attention vs its PyTorch reference.

CPU: the Triton interpreter at tiny shapes (fp32 and fp16; the 3.9 interpreter's tl.dot multiplies
bf16 bit patterns as integers, so bf16 runs on the GPU only). GPU: qwen-7b shapes in bf16.
8-bit caches (int8 / fp8 with per-row scales): the kernel against the reference over the
dequantised cache, and both against attention over the unquantised cache within the bound the
8-bit round trip implies (tests/kernels/kv_quant_cases.py).
"""

import pytest
import torch

from tests.kernels.interpret import INTERPRET, device, load_kernel_module
from tests.kernels.kv_quant_cases import QUANT_DTYPES, attention_bound, quantized_case
from tests.kernels.paged_cases import long_context_lens, make_case, replay_with_new_lengths

dec = load_kernel_module("paged_decode_attention")

# Lengths: 1, inside one block, exactly one block, crossing block boundaries, several tiles.
TINY_LENS = [1, 16, 17, 40, 77]


def _run(case, heads, dtype, **kwargs):
    q = torch.randn(len(case.seq_lens), heads, case.kv_cache.shape[-1], device=case.kv_cache.device).to(dtype)
    scale = q.shape[-1] ** -0.5
    out = dec.paged_decode_attention(q, case.kv_cache, case.block_tables, case.seq_lens, scale, **kwargs)
    ref = dec.paged_decode_attention_ref(q, case.kv_cache, case.block_tables, case.seq_lens, scale)
    return out, ref


@pytest.mark.parametrize("num_splits", [1, 2, 3, 8])
def test_tiny_matches_reference_fp32(num_splits):
    case = make_case(TINY_LENS, kv_heads=2, head_dim=16, block_size=16, dtype=torch.float32, device=device())
    out, ref = _run(case, heads=4, dtype=torch.float32, num_splits=num_splits, block_n=16)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_tiny_fp16_mha_auto_splits_block_8():
    case = make_case([1, 9, 33], kv_heads=2, head_dim=32, block_size=8, dtype=torch.float16, device=device())
    out, ref = _run(case, heads=2, dtype=torch.float16, block_n=16)
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)


def test_zero_length_sequence_gives_zeros():
    """CUDA-graph padding rows have seq_len 0: no reads, zero output, no NaN."""
    case = make_case([5, 20], kv_heads=1, head_dim=16, block_size=16, dtype=torch.float32, device=device())
    case.seq_lens[0] = 0
    out, ref = _run(case, heads=2, dtype=torch.float32, num_splits=2, block_n=16)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_rejects_bad_inputs():
    case = make_case([3], kv_heads=2, head_dim=16, block_size=16, dtype=torch.float32, device=device())
    q = torch.randn(1, 3, 16, device=device())  # 3 heads, not a multiple of 2
    with pytest.raises(ValueError, match="GQA"):
        dec.paged_decode_attention(q, case.kv_cache, case.block_tables, case.seq_lens, 0.25)
    with pytest.raises(ValueError, match="int32"):
        dec.paged_decode_attention(torch.randn(1, 4, 16, device=device()), case.kv_cache,
                                   case.block_tables.long(), case.seq_lens, 0.25)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 7, 64, 256])
def test_gpu_qwen7b_shapes_bf16(batch):
    lens = long_context_lens(batch)
    if batch > 2:
        lens[1:3] = [1, 17]
    case = make_case(lens, kv_heads=4, head_dim=128, block_size=16, dtype=torch.bfloat16, device="cuda")
    out, ref = _run(case, heads=28, dtype=torch.bfloat16)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 4, 17, 64])
def test_gpu_splits_agree_bf16(num_splits):
    case = make_case([4096, 1, 333, 2048], kv_heads=8, head_dim=128, block_size=16, dtype=torch.bfloat16,
                     device="cuda")
    out, ref = _run(case, heads=32, dtype=torch.bfloat16, num_splits=num_splits)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", [None, *QUANT_DTYPES])
def test_gpu_cuda_graph_replay_with_new_lengths(kv_dtype):
    """Captured once with fixed num_splits, replayed after seq_lens change in place (bf16 or 8-bit cache)."""
    case = make_case([4096] * 8, kv_heads=4, head_dim=128, block_size=16, dtype=torch.bfloat16, device="cuda")
    data, scales = (case.kv_cache, None) if kv_dtype is None else quantized_case(case, kv_dtype)
    q = torch.randn(8, 28, 128, device="cuda").to(torch.bfloat16)
    seq_lens = torch.full((8,), 100, dtype=torch.int32, device="cuda")
    out = replay_with_new_lengths(lambda: dec.paged_decode_attention(
        q, data, case.block_tables, seq_lens, 128 ** -0.5, num_splits=8, kv_scales=scales), seq_lens)
    ref = dec.paged_decode_attention_ref(q, data, case.block_tables, seq_lens, 128 ** -0.5, kv_scales=scales)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


# ------------------------------------------------------------------------------- 8-bit caches


def _run_quantized(case, heads, dtype, kv_dtype, **kwargs):
    """(kernel over the 8-bit cache, reference over its dequantisation, reference over the float
    cache, the derived bound on the last two's difference)."""
    data, scales = quantized_case(case, kv_dtype)
    q = torch.randn(len(case.seq_lens), heads, case.kv_cache.shape[-1], device=case.kv_cache.device).to(dtype)
    scale = q.shape[-1] ** -0.5
    out = dec.paged_decode_attention(q, data, case.block_tables, case.seq_lens, scale, kv_scales=scales, **kwargs)
    ref = dec.paged_decode_attention_ref(q, data, case.block_tables, case.seq_lens, scale, kv_scales=scales)
    exact = dec.paged_decode_attention_ref(q, case.kv_cache, case.block_tables, case.seq_lens, scale)
    rows = [(b, b + 1) for b in range(len(case.seq_lens))]
    return out, ref, exact, attention_bound(q, rows, case, scales, kv_dtype, scale)


def test_decode_tiles_widen_only_for_a_full_8bit_grid():
    """128-key, 3-stage tiles over an 8-bit cache once a program per (sequence, KV head) covers the SMs;
    64 x 2 otherwise (bf16 at any batch, 8-bit at small batches)."""
    assert dec.decode_tiles(256, 4, True, 132) == (128, 3)
    assert dec.decode_tiles(33, 4, True, 132) == (128, 3)
    assert dec.decode_tiles(32, 4, True, 132) == (64, 2)
    assert dec.decode_tiles(256, 4, False, 132) == (64, 2)


def test_explicit_block_n_keeps_two_stages(monkeypatch):
    """decode_tiles applies only when neither block_n nor num_stages is given."""
    from tests.kernels.launches import record_launches

    recorders = record_launches(monkeypatch, dec, "_decode_split_kernel")
    case = make_case([5, 40], kv_heads=2, head_dim=16, block_size=16, dtype=torch.float32, device=device())
    _run_quantized(case, 4, torch.float32, torch.int8, num_splits=1, block_n=16)
    (_, kw), = recorders["_decode_split_kernel"].launches
    assert (kw["BLOCK_N"], kw["num_stages"]) == (16, 2)


@pytest.mark.parametrize("kv_dtype", QUANT_DTYPES)
def test_quantized_cache_default_tiles_at_a_full_grid_fp32(monkeypatch, kv_dtype):
    """The default tiles at 33 sequences x 4 KV heads on a 132-SM count (`decode_tiles`: 128-key tiles, 3
    stages, checked on the launch) against the reference over the dequantised cache and within the 8-bit bound
    of the unquantised one."""
    from tests.kernels.launches import record_launches

    monkeypatch.setattr(dec, "num_sms", lambda device: 132)
    recorders = record_launches(monkeypatch, dec, "_decode_split_kernel")
    lens = [1 + (37 * i) % 300 for i in range(33)]  # 1 .. 300 keys: partial and several 128-key tiles
    case = make_case(lens, kv_heads=4, head_dim=16, block_size=16, dtype=torch.float32, device=device())
    out, ref, exact, bound = _run_quantized(case, 8, torch.float32, kv_dtype, num_splits=1)
    (_, kw), = recorders["_decode_split_kernel"].launches
    assert (kw["BLOCK_N"], kw["num_stages"]) == (128, 3)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert ((out - exact).abs().cpu() <= bound + 1e-5).all()


@pytest.mark.parametrize("kv_dtype", QUANT_DTYPES)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_tiny_quantized_cache_fp32(kv_dtype, num_splits):
    """Kernel == reference over the dequantised cache (fp32 rounding only); both within the bound
    the 8-bit round trip allows of attention over the unquantised cache."""
    case = make_case(TINY_LENS, kv_heads=2, head_dim=16, block_size=16, dtype=torch.float32, device=device())
    out, ref, exact, bound = _run_quantized(case, 4, torch.float32, kv_dtype, num_splits=num_splits, block_n=16)
    assert not out.isnan().any()  # NaN scales of rows nobody owns were never read
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert ((out - exact).abs().cpu() <= bound + 1e-5).all()


@pytest.mark.parametrize("kv_dtype", QUANT_DTYPES)
def test_tiny_quantized_cache_fp16_block_8(kv_dtype):
    """fp16 compute: K converts exactly, V * s_v and p round to fp16 (2^-11 relative)."""
    case = make_case([1, 9, 33], kv_heads=2, head_dim=32, block_size=8, dtype=torch.float32, device=device())
    out, ref, _, _ = _run_quantized(case, 2, torch.float16, kv_dtype, block_n=16)
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)


def test_quantized_cache_needs_its_scales():
    case = make_case([3], kv_heads=2, head_dim=16, block_size=16, dtype=torch.float32, device=device())
    data, scales = quantized_case(case, torch.int8)
    q = torch.randn(1, 4, 16, device=device())
    with pytest.raises(ValueError, match="kv_scales"):
        dec.paged_decode_attention(q, data, case.block_tables, case.seq_lens, 0.25)
    with pytest.raises(ValueError, match="q.s dtype"):  # a float cache must match q
        dec.paged_decode_attention(q.half(), case.kv_cache, case.block_tables, case.seq_lens, 0.25)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", QUANT_DTYPES)
@pytest.mark.parametrize("batch", [1, 64, 256])
def test_gpu_qwen7b_shapes_quantized_bf16(kv_dtype, batch):
    lens = long_context_lens(batch)
    case = make_case(lens, kv_heads=4, head_dim=128, block_size=16, dtype=torch.bfloat16, device="cuda")
    out, ref, exact, bound = _run_quantized(case, 28, torch.bfloat16, kv_dtype)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    assert ((out.float() - exact.float()).abs().cpu() <= bound + 2e-2).all()


# ---- prefetch_kv: the older keys of each split's first tile read before the PDL wait --------------------------


@pytest.mark.parametrize("lens, num_splits", [([0, 1, 40], 3), ([77, 16], 1), ([300, 5], 64), ([64, 65], 2)])
@pytest.mark.parametrize("quant", [None, "int8"])
def test_prefetch_kv_same_bits(lens, num_splits, quant):
    """prefetch_kv=True reads the first tile's older keys and the newest key (position seq_len - 1) in two
    loads and combines them: the same output as one load, for the newest key in the first tile or a later
    one, empty splits, seq_len 0 and 1, and an 8-bit cache (its scales combined the same way)."""
    dev = device()
    case = make_case(lens, kv_heads=2, head_dim=16, block_size=16, dtype=torch.float32, device=dev)
    cache, scales = (case.kv_cache, None) if quant is None else quantized_case(case, getattr(torch, quant))
    q = torch.randn(len(lens), 8, 16, device=dev)

    def run(prefetch):
        return dec.paged_decode_attention(q, cache, case.block_tables, case.seq_lens, 0.25, num_splits=num_splits,
                                          block_n=16, kv_scales=scales, prefetch_kv=prefetch)

    got = run(True)
    assert torch.equal(got, run(False))
    ref = dec.paged_decode_attention_ref(q, cache, case.block_tables, case.seq_lens, 0.25, kv_scales=scales)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("fused_merge", [False, True])
def test_gpu_prefetch_kv_sees_the_newest_key(fused_merge):
    """The decode step's order on a GPU with PDL: the cache write of the newest keys, then the attention with
    prefetch_kv=True, captured in a CUDA graph (qwen-7b's heads, bf16, 300 keys). Each replay writes new
    values at the newest position (large, so a stale read of it would move the output): the output equals the
    reference on the updated cache every time."""
    from deepserve.kernels.kv_cache_write import kv_cache_write

    lens = [300]
    case = make_case(lens, kv_heads=4, head_dim=128, block_size=16, dtype=torch.bfloat16, device="cuda")
    q = torch.randn(1, 28, 128, device="cuda").bfloat16()
    k_new = torch.zeros(1, 4, 128, device="cuda").bfloat16()
    v_new = torch.zeros_like(k_new)
    table = case.block_tables[0].long()
    slot = (table[299 // 16] * 16 + 299 % 16).view(1)
    counters = torch.zeros(1, 4, dtype=torch.int32, device="cuda") if fused_merge else None

    def step():
        kv_cache_write(case.kv_cache, k_new, v_new, slot)
        return dec.paged_decode_attention(q, case.kv_cache, case.block_tables, case.seq_lens, 0.088,
                                          num_splits=64, split_counters=counters, prefetch_kv=True)

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for i in range(4):
        k_new.copy_(torch.full_like(k_new, 0.5 * (i + 1)) * q.view(1, 4, 7, 128)[:, :, 0].sign())
        v_new.copy_(torch.full_like(v_new, 20.0 * (i + 1)))
        graph.replay()
        torch.cuda.synchronize()
        ref = dec.paged_decode_attention_ref(q, case.kv_cache, case.block_tables, case.seq_lens, 0.088)
        torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


def _race_hooks(monkeypatch, cache: torch.Tensor, newest: list[tuple[int, int]]) -> None:
    """Simulate the cache write still running when a program starts: each program's `_split_range` (its first
    read) blanks every sequence's newest K/V row to NaN, and its `pdl_prologue` (the PDL wait) writes the real
    rows back. Programs run one after another in the interpreter, so each sees the race in full."""
    real = [cache[:, blk, off].clone() for blk, off in newest]
    split_range = dec._split_range

    def blank(*args, **kwargs):
        for blk, off in newest:
            cache[:, blk, off] = float("nan")
        return split_range.fn(*args, **kwargs)

    def wait(PDL):
        for (blk, off), row in zip(newest, real):
            cache[:, blk, off] = row

    monkeypatch.setattr(dec, "_split_range", blank)
    monkeypatch.setattr(dec, "pdl_prologue", wait)


@pytest.mark.skipif(not INTERPRET, reason="the race is simulated through the interpreter's Python calls")
@pytest.mark.parametrize("lens, num_splits", [([1], 3), ([17], 64), ([300, 1, 0, 129], 3), ([65, 16], 1)])
@pytest.mark.parametrize("fused", [False, True])
def test_prefetch_kv_reads_the_newest_key_only_after_the_wait(monkeypatch, lens, num_splits, fused):
    """With the newest key missing (NaN) until each program's PDL wait, prefetch_kv=True still equals the
    reference: no read of the newest row happens before the wait, whether it sits in a split's first tile or
    a later one (seq_len 1, 17, 300, 129; block boundaries; empty splits; the fused merge or two launches).
    Control: without prefetch_kv the first read (`_split_range`) comes after the wait, so the blanking lands
    after the restore and the kernel reads the blanked rows: its output leaves the reference, so the harness
    does see a read of the newest key at the wrong time."""
    case = make_case(lens, kv_heads=2, head_dim=16, block_size=16, dtype=torch.float32, device="cpu")
    newest = [(int(case.block_tables[b, (n - 1) // 16]), (n - 1) % 16) for b, n in enumerate(lens) if n]
    q = torch.randn(len(lens), 4, 16)
    ref = dec.paged_decode_attention_ref(q, case.kv_cache, case.block_tables, case.seq_lens, 0.25)
    counters = torch.zeros(len(lens), 2, dtype=torch.int32) if fused else None
    _race_hooks(monkeypatch, case.kv_cache, newest)

    def run(prefetch):
        return dec.paged_decode_attention(q, case.kv_cache, case.block_tables, case.seq_lens, 0.25,
                                          num_splits=num_splits, block_n=16, prefetch_kv=prefetch,
                                          split_counters=counters)

    torch.testing.assert_close(run(True), ref, atol=1e-5, rtol=1e-5)
    if counters is not None:
        assert torch.equal(counters, torch.zeros_like(counters))
    assert not torch.allclose(run(False), ref, atol=1e-5, rtol=1e-5)
