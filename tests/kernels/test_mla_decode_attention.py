"""MLA absorbed decode attention vs its PyTorch reference and vs layers/mla.py's absorb path.

CPU: the Triton interpreter at tiny shapes (fp32 and fp16; the 3.9 interpreter's tl.dot multiplies
bf16 bit patterns as integers, so bf16 runs on the GPU only). GPU: DeepSeek-V2-Lite (H=16) and V3
(H=128) shapes, R=512, Dr=64, bf16, contexts up to 4096.
"""

from __future__ import annotations

import pytest
import torch

from torch.utils._python_dispatch import TorchDispatchMode

from deepserve.forward_context import build_forward_context, forward_context
from deepserve.kernels.mla_norm_rope_write import mla_norm_rope_write_ref
from deepserve.layers import fused
from tests.kernels.interpret import device, load_kernel_module
from tests.kernels.mla_cases import V2_LITE_DIMS, V3_DIMS, layer_outputs, make_latent_case, mla_layer
from tests.kernels.paged_cases import long_context_lens, replay_with_new_lengths

mla = load_kernel_module("mla_decode_attention")

TINY_LENS = [1, 15, 16, 17, 40]  # one token, inside / exactly / across a block, several tiles
V3_SCALE = 192 ** -0.5  # qk_head_dim 128 + 64


def _run(lengths, heads, rank, rope_dim, dtype, dev, block_size=16, scale=0.3, **kwargs):
    cache, tables, lens = make_latent_case(lengths, rank, rope_dim, block_size, dtype, dev)
    q = torch.randn(len(lengths), heads, rank + rope_dim, device=dev).to(dtype)  # [B, H, R + Dr]
    q_lat, q_rope = q[..., :rank], q[..., rank:]  # strided views, as mla.py passes them
    out = mla.mla_decode_attention(q_lat, q_rope, cache, tables, lens, scale, **kwargs)
    ref = mla.mla_decode_attention_ref(q_lat, q_rope, cache, tables, lens, scale)
    return out, ref


@pytest.mark.parametrize("num_splits", [1, 3])
def test_tiny_matches_reference_fp32(num_splits):
    out, ref = _run(TINY_LENS, heads=4, rank=32, rope_dim=8, dtype=torch.float32, dev=device(),
                    num_splits=num_splits, block_n=16)
    assert out.shape == (5, 4, 32) and not out.isnan().any()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_tiny_fp16_auto_splits_block_8_two_head_tiles():
    out, ref = _run([3, 9, 33], heads=20, rank=32, rope_dim=16, dtype=torch.float16, dev=device(),
                    block_size=8, block_n=16)
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)


def test_zero_length_rows_give_zeros():
    """CUDA-graph padding rows: no reads, zero output, no NaN, with and without splits."""
    cache, tables, lens = make_latent_case([5, 20], 32, 8, 16, torch.float32, device())
    lens[0] = 0
    q_lat, q_rope = torch.randn(2, 4, 32, device=device()), torch.randn(2, 4, 8, device=device())
    for splits in (1, 2):
        out = mla.mla_decode_attention(q_lat, q_rope, cache, tables, lens, 0.3, num_splits=splits, block_n=16)
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        ref = mla.mla_decode_attention_ref(q_lat, q_rope, cache, tables, lens, 0.3)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_mla_num_splits_on_an_h200():
    """132 SMs, V2-Lite (one head tile of 16), BLOCK_N 32: small batches split down to one tile of keys,
    batches that fill the GPU keep the shared rule."""
    pick = lambda batch, longest, tiles=1: mla.mla_num_splits(batch, tiles, longest, 132, 32)
    assert pick(1, 384) == 12  # W-b1's graphs (max_model_len 384); the shared rule gave 3
    assert pick(1, 163840) == 64  # capped
    assert pick(1, 20) == 1  # shorter than one tile
    assert pick(8, 384) == 12 and pick(1, 384, tiles=8) == 12  # V3: 128 heads, 8 head tiles
    for batch, longest in ((64, 384), (64, 2048), (256, 768), (256, 4096)):  # unchanged
        assert pick(batch, longest) == mla.choose_num_splits(batch, 1, longest, 132, max_splits=64)


@pytest.mark.parametrize("length", [1, 15, 16, 17, 40, 100])
@pytest.mark.parametrize("max_seq_len, num_splits", [(4096, None), (None, 64)])
def test_batch_1_many_splits_mostly_empty(length, max_seq_len, num_splits, monkeypatch):
    """Batch 1 as a CUDA graph sized for a long max_model_len runs it: the split count is picked from
    max_seq_len (or forced to 64) while the sequence fills only its first splits; the empty ones read
    nothing, write only their LSE, and the merge skips them (the partials start as NaN here)."""
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan"))
                        if k.get("dtype") == torch.float32 else empty(*a, **k))
    out, ref = _run([length], heads=4, rank=32, rope_dim=8, dtype=torch.float32, dev=device(), block_n=16,
                    max_seq_len=max_seq_len, num_splits=num_splits)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_rejects_bad_inputs():
    cache, tables, lens = make_latent_case([3], 32, 8, 16, torch.float32, device())
    q_lat, q_rope = torch.randn(1, 4, 32, device=device()), torch.randn(1, 4, 8, device=device())
    with pytest.raises(ValueError, match="R \\+ Dr"):
        mla.mla_decode_attention(q_lat, torch.randn(1, 4, 16, device=device()), cache, tables, lens, 0.3)
    with pytest.raises(ValueError, match="int32"):
        mla.mla_decode_attention(q_lat, q_rope, cache, tables.long(), lens, 0.3)
    with pytest.raises(ValueError, match="dtype"):
        mla.mla_decode_attention(q_lat.half(), q_rope.half(), cache, tables, lens, 0.3)
    with pytest.raises(ValueError, match="powers of two"):
        mla.mla_decode_attention(q_lat, q_rope, cache, tables, lens, 0.3, block_h=8)


# ------------------------------------------------------------------ agreement with layers/mla.py


def test_layer_decode_routes_agree():
    """MLAAttention.forward on a decode batch: the Triton route (cache write + decode kernel, interpreted
    on CPU) and the batched PyTorch absorb path equal the per-sequence naive loop."""
    triton_out, torch_out, naive = layer_outputs(mla_layer("absorb"), TINY_LENS, [1] * len(TINY_LENS),
                                                 [(True, "absorb"), (False, "auto"), (False, "naive")])
    assert not triton_out.isnan().any()
    torch.testing.assert_close(triton_out, torch_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch_out, naive, atol=1e-5, rtol=1e-5)


class _AtenLog(TorchDispatchMode):
    """The aten ops issued at the top level while active (kernels stubbed by `quiet` are not logged)."""

    def __init__(self):
        super().__init__()
        self.ops, self.muted = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.muted:
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))

    def quiet(self, fn):
        def run(*args, **kwargs):
            self.muted += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.muted -= 1
        return run


def _head_gemv_stub(log, calls):
    """kernels/head_gemv's `head_gemv` as its reference (into `out` when given), not logged."""
    from deepserve.kernels.head_gemv import head_gemv_ref

    def run(x, w, out=None):
        calls.append((tuple(x.shape), tuple(w.shape)))
        y = head_gemv_ref(x, w)
        return y if out is None else out.copy_(y)
    return log.quiet(run)


@pytest.mark.parametrize("lengths", [[5, 17, 40], [5, 17, 40, 1, 9]], ids=["3-rows-head-gemv", "5-rows-bmm"])
def test_triton_decode_route_has_no_cat_copy_or_second_rotary(monkeypatch, lengths):
    """The decode route's launches (issue 5): the kernels (stubbed by their references here) take q_latent /
    q_pe and the kv_a output / q_pe as they are, kv_a_layernorm + both rotations + the cache write are one call
    (no separate norm or rotary), and o_lat @ W_UV lands in the rows o_proj reads: no cat, no layout copy.
    W_UK and W_UV: one head GEMV each up to HEAD_GEMV_MAX_T = 4 rows, one bmm each above."""
    log, rotations, norms, writes, gemvs = _AtenLog(), [], [], [], []
    decode_ref = lambda *args, max_seq_len=None: mla.mla_decode_attention_ref(*args)
    monkeypatch.setattr("deepserve.kernels.mla_decode_attention.mla_decode_attention", log.quiet(decode_ref))
    monkeypatch.setattr("deepserve.kernels.head_gemv.head_gemv", _head_gemv_stub(log, gemvs))
    write = log.quiet(mla_norm_rope_write_ref)
    monkeypatch.setattr("deepserve.kernels.mla_norm_rope_write.mla_norm_rope_write",
                        lambda *args: writes.append(args) or write(*args))
    rotate, norm = log.quiet(fused.apply_rotary), log.quiet(fused.rms_norm)
    monkeypatch.setattr(fused, "apply_rotary", lambda *args: rotations.append(args) or rotate(*args))
    monkeypatch.setattr(fused, "rms_norm", lambda *args: norms.append(args) or norm(*args))
    layer = mla_layer("auto")
    layer._on_triton = lambda t: True
    rows = len(lengths)
    cache, tables, _ = make_latent_case(lengths, layer.kv_lora_rank, layer.rope_dim, 16, torch.float32, "cpu")
    layer.kv_cache = cache
    ctx = build_forward_context([1] * rows, lengths, [[b for b in row if b] for row in tables.tolist()], 16)
    x = torch.randn(rows, layer.o_proj.weight.shape[0])
    with forward_context(ctx), torch.no_grad(), log:
        layer(ctx.positions, x)
    assert len(writes) == 1 and not rotations and not norms  # norm, q_pe and k_pe rotations, cache write: one call
    head_gemvs = 2 if rows <= 4 else 0  # W_UK, W_UV
    assert len(gemvs) == head_gemvs and log.ops.count("bmm") == 2 - head_gemvs
    assert log.ops.count("mm") == 3  # q_proj, kv_a_proj, o_proj
    assert not {"cat", "clone", "copy_", "contiguous", "_to_copy"} & set(log.ops), log.ops


def test_cpu_cache_write_skips_padding_slots():
    """slot -1 (a CUDA-graph padding row) writes nothing, where indexing would wrap to the last slot."""
    layer = mla_layer("auto")
    cache, _, _ = make_latent_case([5], 32, 8, 16, torch.float32, "cpu")
    layer.kv_cache = cache
    flat = cache.view(-1, 40)
    before = flat.clone()
    entries = torch.randn(3, 40)
    layer._write_cache(flat, entries, torch.tensor([-1, 7, -1]))
    assert torch.equal(flat[7], entries[1])
    keep = [s for s in range(flat.shape[0]) if s != 7]
    assert torch.equal(flat[keep].isnan(), before[keep].isnan())
    assert torch.equal(flat[keep].nan_to_num(), before[keep].nan_to_num())


def test_graph_safety_depends_on_the_mode():
    assert mla_layer("auto").supports_cuda_graph and mla_layer("absorb").supports_cuda_graph
    assert not mla_layer("naive").supports_cuda_graph


def test_bf16_layer_keeps_float32_rope_tables():
    """`.to(dtype=bf16)` of a layer (as the GPU test helper does) keeps the rotary kernel's float32 tables."""
    rotary = mla_layer("auto", dtype=torch.bfloat16).rotary
    assert rotary.cos.dtype == rotary.sin.dtype == torch.float32 and rotary.cos.stride() == rotary.sin.stride()


@pytest.mark.gpu
@pytest.mark.parametrize("dims", [V2_LITE_DIMS, V3_DIMS], ids=["v2-lite", "v3"])
def test_gpu_layer_triton_route_matches_pytorch_bf16(dims):
    """The wiring on the GPU: DeepSeek attention dims, bf16, the Triton route vs the PyTorch absorb loop."""
    lengths = [1, 17, 1000, 4096]
    triton_out, torch_out = layer_outputs(mla_layer("absorb", dims, torch.bfloat16, "cuda"), lengths,
                                          [1] * len(lengths), [(True, "absorb"), (False, "absorb")])
    err = (triton_out.float() - torch_out.float()).abs().max() / torch_out.float().abs().max()
    assert err < 2e-2, f"max |triton - torch| / max |torch| = {err:.3g}"


def test_cpu_tensors_keep_pytorch_paths():
    assert not mla_layer("absorb")._on_triton(torch.zeros(2, 4, 40))


# ------------------------------------------------------------------ GPU, real shapes


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [16, 128])  # V2-Lite, V3
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_gpu_deepseek_shapes_bf16(heads, batch):
    lens = long_context_lens(batch)
    if batch > 2:
        lens[1:3] = [1, 17]
    out, ref = _run(lens, heads=heads, rank=512, rope_dim=64, dtype=torch.bfloat16, dev="cuda", scale=V3_SCALE)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 4, 17, 64])
def test_gpu_splits_agree_bf16(num_splits):
    out, ref = _run([4096, 1, 333, 2048], heads=128, rank=512, rope_dim=64, dtype=torch.bfloat16, dev="cuda",
                    scale=V3_SCALE, num_splits=num_splits)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("max_seq_len", [384, 2048, 163840])
def test_gpu_v2_lite_batch_1_auto_splits_bf16(max_seq_len):
    """W-b1's shape: one sequence, 16 heads, the split count picked from a graph's max_model_len."""
    for length in (1, 31, 130, 384, 1000):
        if length > max_seq_len:
            continue
        out, ref = _run([length], heads=16, rank=512, rope_dim=64, dtype=torch.bfloat16, dev="cuda",
                        scale=V3_SCALE, max_seq_len=max_seq_len)
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_with_new_lengths():
    """Captured once with a fixed num_splits, replayed after seq_lens change in place."""
    cache, tables, _ = make_latent_case([4096] * 8, 512, 64, 16, torch.bfloat16, "cuda")
    q = torch.randn(8, 16, 576, device="cuda").to(torch.bfloat16)
    seq_lens = torch.full((8,), 100, dtype=torch.int32, device="cuda")
    out = replay_with_new_lengths(
        lambda: mla.mla_decode_attention(q[..., :512], q[..., 512:], cache, tables, seq_lens, 0.1, num_splits=8),
        seq_lens)
    ref = mla.mla_decode_attention_ref(q[..., :512], q[..., 512:], cache, tables, seq_lens, 0.1)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
