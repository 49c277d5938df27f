"""The MHA/GQA attention backends with a rotary module (the dense models hand theirs over): the Triton backend
rotates q and k and writes the cache in ONE launch (kernels/rope_kv_write), the PyTorch backend as the model did
before (rotate with the module, write, attend); a tiny dense model on either backend."""

from __future__ import annotations

import importlib

import pytest
import torch

from deepserve.forward_context import build_forward_context, forward_context
from deepserve.layers.attention import Attention
from deepserve.layers.rotary import RotaryEmbedding
from tests.kernels.interpret import device, load_kernel_module
from tests.kernels.paged_cases import shuffled_tables

F = load_kernel_module("rope_kv_write")
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)  # NaN patterns compared bit for bit


def _backend_module():
    """deepserve.layers.attention_triton bound to the (possibly interpreted) kernel modules."""
    module = importlib.import_module("deepserve.layers.attention_triton")
    if module.rope_kv_write is not F.rope_kv_write:
        module = importlib.reload(module)
    return module


class _NotCalled(RotaryEmbedding):
    """The module's tables; its own rotation must not run (the fused kernel rotates)."""

    def forward(self, positions, q, k):
        raise AssertionError("the rotary module ran: the Triton backend should rotate in rope_kv_write")


def _layer_step(layers, q_lens, done, tables, block_size, heads, kv_heads, head_dim, dev, dtype=torch.float32):
    seq_lens = [d + n for d, n in zip(done, q_lens)]
    ctx = build_forward_context(q_lens, seq_lens, tables, block_size, device=dev)
    qkv = torch.randn(sum(q_lens), heads + 2 * kv_heads, head_dim, device=dev).to(dtype)  # fused projection
    q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)
    with forward_context(ctx):
        return [layer(q, k, v, ctx.positions) for layer in layers]


def test_triton_backend_rotates_and_writes_in_one_launch(monkeypatch):
    """TritonAttention with a rotary module (interpreted) over prefill, mixed and decode steps: ONE fused launch
    a step, no rotary or kv_cache_write launch; the cache bit for bit the PyTorch backend's (float32: the eager
    rotation and the kernel's agree exactly), the outputs close."""
    backend, fused_calls = _backend_module(), []
    monkeypatch.setattr(backend, "rope_kv_write", lambda *a: fused_calls.append(1) or F.rope_kv_write(*a))
    monkeypatch.setattr(backend, "kv_cache_write", None)  # a call would raise
    heads, kv_heads, head_dim, block_size, dev = 4, 2, 16, 4, device()
    tables, num_blocks = shuffled_tables([22, 10], block_size, torch.Generator().manual_seed(1))
    ours = backend.TritonAttention(heads, head_dim, kv_heads, rotary=_NotCalled(16, 64, 10000.0, LLAMA3).to(dev))
    ref = Attention(heads, head_dim, kv_heads, rotary=RotaryEmbedding(16, 64, 10000.0, LLAMA3).to(dev))
    ours.kv_cache = torch.full((2, num_blocks, block_size, kv_heads, head_dim), float("nan"), device=dev)
    ref.kv_cache = ours.kv_cache.clone()
    done = [0, 0]
    for q_lens in ([12, 7], [8, 1], [1, 1], [1, 1]):
        got, want = _layer_step([ours, ref], q_lens, done, tables, block_size, heads, kv_heads, head_dim, dev)
        assert torch.equal(_bytes(ours.kv_cache), _bytes(ref.kv_cache))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        done = [d + n for d, n in zip(done, q_lens)]
    assert len(fused_calls) == 4


def test_pytorch_backend_rotates_then_writes_as_before():
    """Attention with a rotary module == the rotary module, then Attention without one (the model's old call):
    outputs and cache bit for bit."""
    rope = RotaryEmbedding(16, 64, 10000.0, YARN)
    layers = [Attention(4, 16, 2, rotary=rope), Attention(4, 16, 2)]
    for layer in layers:
        layer.kv_cache = torch.full((2, 12, 4, 2, 16), float("nan"))
    tables = [[3, 1, 7], [5, 2]]
    done = [0, 0]
    for q_lens in ([9, 6], [1, 1]):
        ctx = build_forward_context(q_lens, [d + n for d, n in zip(done, q_lens)], tables, 4)
        q, k, v = torch.randn(sum(q_lens), 8, 16).split([4, 2, 2], dim=1)
        with forward_context(ctx):
            fused_out = layers[0](q, k, v, ctx.positions)
            old_out = layers[1](*rope(ctx.positions, q, k), v)
        assert torch.equal(fused_out, old_out)
        assert torch.equal(_bytes(layers[0].kv_cache), _bytes(layers[1].kv_cache))
        done = [d + n for d, n in zip(done, q_lens)]


def test_positions_go_with_a_rotary_module():
    rope = RotaryEmbedding(16, 64, 10000.0)
    ctx = build_forward_context([3], [3], [[1]], 4)
    q, k, v = torch.randn(3, 8, 16).split([4, 2, 2], dim=1)
    with forward_context(ctx):
        with pytest.raises(ValueError, match="positions go with a rotary module"):
            Attention(4, 16, 2, rotary=rope)(q, k, v)
        with pytest.raises(ValueError, match="positions go with a rotary module"):
            Attention(4, 16, 2)(q, k, v, ctx.positions)


def test_dense_model_on_the_triton_backend(monkeypatch):
    """A tiny Qwen2 built on the Triton backend (interpreted: rope_kv_write + paged attention kernels) against
    the same weights on the PyTorch backend: chunked prefill of two prompts, then decode steps."""
    from deepserve.config import ModelConfig
    from deepserve.layers import attention
    from deepserve.loader.dummy import fill_dummy_weights
    from deepserve.models.qwen2 import Qwen2ForCausalLM
    from tests.paged_harness import PagedRunner

    config = ModelConfig.from_hf_dict({"architectures": ["Qwen2ForCausalLM"], "vocab_size": 128, "hidden_size": 64,
                                       "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                                       "num_key_value_heads": 2, "max_position_embeddings": 128})
    backend, launches = _backend_module(), []
    monkeypatch.setattr(backend, "rope_kv_write", lambda *a: launches.append(1) or F.rope_kv_write(*a))
    runners = []
    for cls in (backend.TritonAttention, attention.Attention):
        monkeypatch.setattr(attention, "attention_backend_cls", lambda device_type, cls=cls: cls)
        model = Qwen2ForCausalLM(config).eval()
        fill_dummy_weights(model, seed=3)
        runners.append(PagedRunner(model, num_blocks=16, block_size=4))
    prompts = {0: list(range(3, 14)), 1: list(range(40, 47))}
    for runner in runners:
        runner.new_seq(), runner.new_seq()
    steps = [{0: prompts[0][:6], 1: prompts[1]}, {0: prompts[0][6:]}, {0: [5], 1: [9]}, {0: [17], 1: [2]}]
    for chunks in steps:
        got, want = (runner.step(chunks) for runner in runners)
        for sid in chunks:
            torch.testing.assert_close(got[sid], want[sid], atol=1e-4, rtol=1e-4)
    assert len(launches) == len(steps) * config.num_hidden_layers


# ------------------------------------------------------------------ GPU


@pytest.mark.gpu
def test_gpu_backend_steps_match_torch_backend():
    """qwen-7b's attention shape in bf16 through TritonAttention with a rotary module (fused) and the PyTorch
    backend: prefill, mixed, decode steps."""
    backend, rope = _backend_module(), RotaryEmbedding(128, 4096, 1e6).cuda()
    tables, num_blocks = shuffled_tables([1027, 303, 4], 16, torch.Generator().manual_seed(1))
    ours = backend.TritonAttention(28, 128, 4, rotary=rope)
    ref = Attention(28, 128, 4, rotary=rope)
    ours.kv_cache = torch.zeros(2, num_blocks, 16, 4, 128, dtype=torch.bfloat16, device="cuda")
    ref.kv_cache = ours.kv_cache.clone()
    done = [0, 0, 0]
    for q_lens in ([1000, 300, 1], [24, 1, 1], [1, 1, 1], [1, 1, 1]):
        got, want = _layer_step([ours, ref], q_lens, done, tables, 16, 28, 4, 128, "cuda", torch.bfloat16)
        got, want = got.float(), want.float()
        torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)
        done = [d + n for d, n in zip(done, q_lens)]
