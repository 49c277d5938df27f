"""MLA absorbed decode attention vs its PyTorch reference and vs layers/mla.py's absorb path.

CPU: the Triton interpreter at tiny shapes (fp32 and fp16; the 3.9 interpreter's tl.dot multiplies
bf16 bit patterns as integers, so bf16 runs on the GPU only). GPU: DeepSeek-V2-Lite (H=16) and V3
(H=128) shapes, R=512, Dr=64, bf16, contexts up to 4096.
"""

from __future__ import annotations

import pytest
import torch

from deepserve.config import ModelConfig
from deepserve.forward_context import build_forward_context, forward_context
from tests.kernels.interpret import device, load_kernel_module
from tests.kernels.paged_cases import shuffled_tables

mla = load_kernel_module("mla_decode_attention")

TINY_LENS = [1, 15, 16, 17, 40]  # one token, inside / exactly / across a block, several tiles
V3_SCALE = 192 ** -0.5  # qk_head_dim 128 + 64


def make_latent_case(lengths: list[int], rank: int, rope_dim: int, block_size: int, dtype: torch.dtype,
                     dev: torch.device | str, seed: int = 0):
    """(kv_cache [N, bs, R + Dr] NaN outside the sequences, block_tables [B, W] int32, seq_lens [B] int32)."""
    gen = torch.Generator().manual_seed(seed)
    tables, num_blocks = shuffled_tables(lengths, block_size, gen)
    cache = torch.full((num_blocks * block_size, rank + rope_dim), float("nan"), dtype=dtype)  # [slots, R + Dr]
    for table, n in zip(tables, lengths):
        pos = torch.arange(n)
        slots = torch.tensor(table, dtype=torch.long)[pos // block_size] * block_size + pos % block_size
        cache[slots] = torch.randn(n, rank + rope_dim, generator=gen).to(dtype)
    width = max((len(t) for t in tables), default=0) or 1
    padded = [t + [0] * (width - len(t)) for t in tables]
    return (cache.view(num_blocks, block_size, rank + rope_dim).to(dev),
            torch.tensor(padded, dtype=torch.int32, device=dev), torch.tensor(lengths, dtype=torch.int32, device=dev))


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


TINY_DIMS = dict(hidden_size=48, num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                 v_head_dim=16)
V2_LITE_DIMS = dict(hidden_size=256, num_attention_heads=16, kv_lora_rank=512, qk_nope_head_dim=128,
                    qk_rope_head_dim=64, v_head_dim=128)


def _mla_layer(attention_mode: str, dims: dict = TINY_DIMS, dtype=torch.float32, dev="cpu"):
    """An MLAAttention with random weights (norm weights around 1) of a V2-Lite-like config (no q LoRA)."""
    from deepserve.layers.mla import MLAAttention
    from deepserve.layers.rotary import RotaryEmbedding

    config = ModelConfig(architecture="DeepseekV2ForCausalLM", vocab_size=64, num_hidden_layers=1,
                         num_key_value_heads=dims["num_attention_heads"], intermediate_size=64,
                         max_position_embeddings=4096, q_lora_rank=None, **dims)
    rotary = RotaryEmbedding(dims["qk_rope_head_dim"], 4096, 10000.0)
    layer = MLAAttention(config, rotary, attention_mode).eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, dims["hidden_size"] ** -0.5)
    return layer.to(dev, dtype)


def _layer_outputs(layer, lengths, query_lens, triton_flags, block_size=16):
    """layer(...) outputs on one batch, once per flag; each run starts from the same NaN-poisoned cache."""
    dev, dtype = layer.kv_b_proj.weight.device, layer.kv_b_proj.weight.dtype
    cache, tables, _ = make_latent_case(lengths, layer.kv_lora_rank, layer.rope_dim, block_size, dtype, dev, seed=3)
    ctx = build_forward_context(query_lens, lengths, [[b for b in row if b] for row in tables.tolist()], block_size,
                                device=dev)
    x = torch.randn(sum(query_lens), layer.o_proj.weight.shape[0], device=dev).to(dtype)
    outs = []
    for flag in triton_flags:
        layer.kv_cache = cache.clone()
        layer._on_triton = lambda t, flag=flag: flag  # instance override: Triton (interpreted on CPU) or PyTorch
        with forward_context(ctx), torch.no_grad():
            outs.append(layer(ctx.positions, x))
    return outs


def test_layer_decode_kernel_matches_absorb_path():
    """MLAAttention.forward on a decode batch: the Triton route (cache write + decode kernel, interpreted
    on CPU) equals the PyTorch absorb loop."""
    torch_out, triton_out = _layer_outputs(_mla_layer("absorb"), TINY_LENS, [1] * len(TINY_LENS), (False, True))
    assert not triton_out.isnan().any()
    torch.testing.assert_close(triton_out, torch_out, atol=1e-5, rtol=1e-5)


def test_layer_prefill_keeps_pytorch_attention_with_triton_write():
    """A mixed batch on the Triton route only swaps the cache writer; attention stays the PyTorch loop."""
    outs = _layer_outputs(_mla_layer("auto"), [7, 20, 33], [7, 1, 5], (False, True))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_gpu_layer_triton_route_matches_pytorch_bf16():
    """The wiring on the GPU: V2-Lite attention dims, bf16, the Triton route vs the PyTorch absorb loop."""
    lengths = [1, 17, 1000, 4096]
    torch_out, triton_out = _layer_outputs(_mla_layer("absorb", V2_LITE_DIMS, torch.bfloat16, "cuda"),
                                           lengths, [1] * len(lengths), (False, True))
    err = (triton_out.float() - torch_out.float()).abs().max() / torch_out.float().abs().max()
    assert err < 2e-2, f"max |triton - torch| / max |torch| = {err:.3g}"


def test_cpu_tensors_keep_pytorch_paths():
    assert not _mla_layer("absorb")._on_triton(torch.zeros(2, 4, 40))


# ------------------------------------------------------------------ GPU, real shapes


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [16, 128])  # V2-Lite, V3
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_gpu_deepseek_shapes_bf16(heads, batch):
    gen = torch.Generator().manual_seed(batch)
    lens = torch.randint(1, 4097, (batch,), generator=gen).tolist()
    lens[0] = 4096
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
def test_gpu_cuda_graph_replay_with_new_lengths():
    """Captured once with a fixed num_splits, replayed after seq_lens change in place."""
    cache, tables, _ = make_latent_case([4096] * 8, 512, 64, 16, torch.bfloat16, "cuda")
    q = torch.randn(8, 16, 576, device="cuda").to(torch.bfloat16)
    seq_lens = torch.full((8,), 100, dtype=torch.int32, device="cuda")
    run = lambda: mla.mla_decode_attention(q[..., :512], q[..., 512:], cache, tables, seq_lens, 0.1, num_splits=8)
    run()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    seq_lens.copy_(torch.tensor([1, 17, 4096, 2000, 0, 555, 16, 3000], dtype=torch.int32))
    graph.replay()
    ref = mla.mla_decode_attention_ref(q[..., :512], q[..., 512:], cache, tables, seq_lens, 0.1)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
