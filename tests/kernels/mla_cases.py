"""MLA test cases shared by the MLA kernel tests: a NaN-poisoned paged latent cache, a random
MLAAttention layer, and runs of one batch through the layer on its different routes.

Every cache slot that no sequence owns holds NaN (block 0 included), so a route reading past a
sequence's length or through the wrong block poisons its output.
"""

from __future__ import annotations

import torch

from deepserve.config import ModelConfig
from deepserve.forward_context import build_forward_context, forward_context
from tests.kernels.paged_cases import shuffled_tables

TINY_DIMS = dict(hidden_size=48, num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                 v_head_dim=16)
V2_LITE_DIMS = dict(hidden_size=256, num_attention_heads=16, kv_lora_rank=512, qk_nope_head_dim=128,
                    qk_rope_head_dim=64, v_head_dim=128)
V3_DIMS = dict(V2_LITE_DIMS, num_attention_heads=128)


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


def mla_layer(attention_mode: str, dims: dict = TINY_DIMS, dtype=torch.float32, dev="cpu"):
    """An MLAAttention with random weights (norm weights around 1) of a V2-Lite-like config (no q LoRA),
    built in float32 on the CPU and then moved with `.to(dev, dtype)`."""
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


def layer_outputs(layer, lengths: list[int], query_lens: list[int], routes: list[tuple[bool, str]],
                  block_size: int = 16, seed: int = 3) -> list[torch.Tensor]:
    """layer(...) on one batch (sequence i: lengths[i] context tokens, the last query_lens[i] new), once per
    route (Triton kernels on/off — interpreted on CPU —, attention mode); every run starts from the same
    NaN-poisoned cache."""
    dev, dtype = layer.kv_b_proj.weight.device, layer.kv_b_proj.weight.dtype
    cache, tables, _ = make_latent_case(lengths, layer.kv_lora_rank, layer.rope_dim, block_size, dtype, dev,
                                        seed=seed)
    ctx = build_forward_context(query_lens, lengths, [[b for b in row if b] for row in tables.tolist()], block_size,
                                device=dev)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(query_lens), layer.o_proj.weight.shape[0], generator=gen).to(dev, dtype)
    outs = []
    for on_triton, mode in routes:
        layer.kv_cache = cache.clone()
        layer.attention_mode = mode
        layer._on_triton = lambda t, flag=on_triton: flag  # instance override: Triton (interpreted on CPU) or PyTorch
        with forward_context(ctx), torch.no_grad():
            outs.append(layer(ctx.positions, x))
    return outs
