"""KV-cache planning arithmetic with fake memory numbers (CPU only)."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from deepserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from deepserve.engine.engine_core import plan_kv_cache
from deepserve.engine.kv_cache import attention_layers, bytes_per_block
from deepserve.engine.memory import (GRAPH_MARGIN_FLOOR, GiB, InsufficientMemoryError, KVCachePlan,
                                     MemoryProfile, blocks_needed, cpu_num_blocks, gpu_num_blocks,
                                     graph_margin, oom_guard, profile_lengths, profile_memory)
from deepserve.loader.dummy import fill_dummy_weights
from deepserve.loader.model_loader import build_model, model_class
from deepserve.platforms import MemoryInfo, MemoryStats, Platform

TINY = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 256, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 4096}


def engine_config(max_model_len=1024, max_num_seqs=8, tokens=512, util=0.9, **cache) -> EngineConfig:
    return EngineConfig(model="tiny", model_config=ModelConfig.from_hf_dict(TINY),
                        cache=CacheConfig(gpu_memory_utilization=util, **cache),
                        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=tokens,
                                                  max_model_len=max_model_len)).resolve()


def tiny_model(config: EngineConfig):
    model = build_model(model_class(config.model_config), config.model_config, "auto", "cpu", torch.float32)
    fill_dummy_weights(model)
    return model.eval()


class FakeGpu(Platform):
    """A 'GPU' with scripted memory numbers; computes on the host."""

    name, device_type, supports_graph_capture = "fakegpu", "fakegpu", False

    def __init__(self, total=80 * GiB, free=60 * GiB, allocated=15 * GiB, reserved=16 * GiB, peak=17 * GiB):
        self.info = MemoryInfo(free=free, total=total)
        self.stats = MemoryStats(allocated=allocated, reserved=reserved, peak_allocated=peak)
        self.resets = 0

    def mem_get_info(self, index=0):
        return self.info

    def memory_stats(self, index=0):
        return self.stats

    def reset_peak_memory_stats(self, index=0):
        self.resets += 1


def test_budget_arithmetic():
    p = MemoryProfile(total=80 * GiB, weights=15 * GiB, peak_activation=2 * GiB, non_torch=GiB // 2,
                      graph_margin=GiB // 2)
    assert p.kv_budget(0.9) == int(72 * GiB) - 18 * GiB
    assert "left for the KV cache 54.00 GiB" in p.describe(0.9)
    assert p.kv_budget(0.2) < 0 and "left for the KV cache 0.00 GiB" in p.describe(0.2)


def test_gpu_blocks_capped_by_what_sequences_can_use():
    config = engine_config(max_model_len=1024, max_num_seqs=8)
    p = MemoryProfile(80 * GiB, 15 * GiB, 2 * GiB, 0, 0)
    assert gpu_num_blocks(config, p, bytes_per_block=1 << 20) == blocks_needed(config) == 8 * 64 + 1


def test_gpu_blocks_from_budget():
    config = engine_config(max_model_len=1024, max_num_seqs=10_000)
    p = MemoryProfile(total=100 * GiB, weights=40 * GiB, peak_activation=8 * GiB, non_torch=GiB, graph_margin=GiB)
    per_block = 2 << 20  # 2 MiB
    assert gpu_num_blocks(config, p, per_block) == (90 - 50) * GiB // per_block


def test_model_that_does_not_fit_gets_a_clear_error():
    config = engine_config(max_model_len=4096)
    p = MemoryProfile(total=80 * GiB, weights=70 * GiB, peak_activation=2 * GiB, non_torch=0, graph_margin=0)
    with pytest.raises(InsufficientMemoryError) as err:
        gpu_num_blocks(config, p, bytes_per_block=64 << 20)  # 257 blocks needed, 16 GiB
    message = str(err.value)
    for needle in ("max_model_len 4096 needs 16.06 GiB", "weights 70.00 GiB", "--max-model-len",
                   "--gpu-memory-utilization", "quantised", "tensor parallelism"):
        assert needle in message
    assert isinstance(err.value, ValueError)  # the CLI prints it as a one-line start-up error


def test_bad_utilization_is_rejected():
    with pytest.raises(ValueError, match="gpu-memory-utilization"):
        gpu_num_blocks(engine_config(util=1.5), MemoryProfile(GiB, 0, 0, 0, 0), 1024)


def test_cpu_budget_unchanged():
    config = engine_config(cpu_kv_cache_bytes=100 * 4096)
    assert cpu_num_blocks(config, 4096) == 100
    with pytest.raises(ValueError, match="kv-cache-memory-gb"):
        cpu_num_blocks(engine_config(cpu_kv_cache_bytes=4096), 4096)


def test_plan_summary():
    plan = KVCachePlan(num_blocks=1001, block_size=16, bytes_per_block=1 << 20, max_model_len=4000)
    assert plan.num_tokens == 16000 and plan.max_concurrency == 4.0
    assert "1001 blocks of 16 tokens" in plan.summary() and "max concurrency 4.00x" in plan.summary()


def test_graph_margin():
    assert graph_margin(False, 512, 152064, 4 * GiB, 8192) == 0
    logits = 512 * 152064 * 4
    assert graph_margin(True, 512, 152064, 4 * GiB, 8192) == logits + GiB // 4 + GRAPH_MARGIN_FLOOR
    assert graph_margin(True, 512, 100, 1000, 100) == 512 * 100 * 4 + 1000 + GRAPH_MARGIN_FLOOR


def test_graph_margin_adds_the_prefill_graphs_share():
    base = graph_margin(True, 512, 100, 1000, 1000)
    assert base == 512 * 100 * 4 + 512 + GRAPH_MARGIN_FLOOR
    assert graph_margin(True, 512, 100, 1000, 1000, prefill_tokens=256) == base + 256  # 256 tokens' share
    assert graph_margin(True, 512, 100, 1000, 1000, prefill_tokens=4000) == base + 1000  # at most the peak
    assert graph_margin(False, 512, 100, 1000, 1000, prefill_tokens=256) == 0


def test_profile_margin_counts_prefill_graphs_where_the_model_takes_them(monkeypatch):
    """profile_memory adds Tmax tokens' share (prefill_graph_tokens: 0 for this model's reference attention)."""
    import deepserve.engine.prefill_graph as prefill_graph

    config = engine_config(max_model_len=64, max_num_seqs=4, tokens=96)
    model = tiny_model(config)
    fake = FakeGpu(total=80 * GiB, free=60 * GiB, allocated=15 * GiB, reserved=16 * GiB, peak=17 * GiB)
    assert prefill_graph.prefill_graph_tokens(config, model) == 0
    monkeypatch.setattr(prefill_graph, "prefill_graph_tokens", lambda config, model: 48)
    p = profile_memory(model, config, fake, graphs=True)
    assert p.graph_margin == graph_margin(True, 512, 256, 2 * GiB, 96, prefill_tokens=48)
    assert p.graph_margin == graph_margin(True, 512, 256, 2 * GiB, 96) + GiB
    assert profile_memory(model, config, fake, graphs=False).graph_margin == 0


def test_profile_lengths():
    assert profile_lengths(engine_config(max_model_len=1024, tokens=2500)) == [1024, 1024, 452]
    assert profile_lengths(engine_config(max_model_len=1024, tokens=512)) == [512]
    assert profile_lengths(engine_config(max_model_len=100, max_num_seqs=2, tokens=512)) == [100, 100]


def test_oom_becomes_insufficient_memory():
    with pytest.raises(InsufficientMemoryError, match="out of memory while loading the weights.*80.00 GiB"):
        with oom_guard(FakeGpu(), "loading the weights"):
            raise MemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_profile_runs_the_model_and_reads_the_platform():
    config = engine_config(max_model_len=64, max_num_seqs=4, tokens=96)
    model = tiny_model(config)
    before = [layer.kv_cache for layer in attention_layers(model)]
    fake = FakeGpu(total=80 * GiB, free=60 * GiB, allocated=15 * GiB, reserved=16 * GiB, peak=17 * GiB)
    p = profile_memory(model, config, fake, graphs=True)
    assert (p.total, p.weights, p.peak_activation, p.non_torch) == (80 * GiB, 15 * GiB, 2 * GiB, 4 * GiB)
    assert p.graph_margin == graph_margin(True, 512, 256, 2 * GiB, 96)
    assert fake.resets == 1
    assert all(a is b for a, b in zip(before, [layer.kv_cache for layer in attention_layers(model)]))


def test_plan_kv_cache_logs_blocks_tokens_concurrency(caplog):
    config = engine_config(max_model_len=64, max_num_seqs=4, tokens=96)
    model = tiny_model(config)
    per_block = bytes_per_block(model, 16, torch.float32)
    fake = FakeGpu(total=1000 * per_block, free=1000 * per_block, allocated=0, reserved=0, peak=0)
    config = dataclasses.replace(config, max_graph_batch_size=0)
    with caplog.at_level(logging.INFO):
        plan = plan_kv_cache(config, model, fake, graphs=False)
    assert plan.num_blocks == blocks_needed(config) == 4 * 4 + 1
    assert "KV cache: 17 blocks of 16 tokens" in caplog.text and "max concurrency 4.00x" in caplog.text


def test_plan_kv_cache_refuses_a_card_too_small():
    config = engine_config(max_model_len=64, max_num_seqs=4, tokens=96)
    model = tiny_model(config)
    per_block = bytes_per_block(model, 16, torch.float32)
    fake = FakeGpu(total=3 * per_block, free=3 * per_block, allocated=0, reserved=0, peak=0)
    with pytest.raises(InsufficientMemoryError, match="--max-model-len"):
        plan_kv_cache(config, model, fake, graphs=False)


# ------------------------------------------------------------------------------- 8-bit KV cache

HEAD_128 = {**TINY, "hidden_size": 256, "num_attention_heads": 2, "num_key_value_heads": 1}  # head_dim 128


def test_bytes_per_block_of_an_8bit_cache():
    """Per layer and block: 2 (K, V) x 16 tokens x H_kv x D elements, + 4 bytes per (K|V, token, head)
    row when 8-bit. head_dim 128: 2 x 128 / (128 + 4) = 1.94x the blocks of bf16 in the same bytes."""
    config = engine_config()
    model = build_model(model_class(config.model_config), ModelConfig.from_hf_dict(HEAD_128), "auto", "cpu",
                        torch.bfloat16)
    elements = 2 * 2 * 16 * 1 * 128  # layers x (K, V) x tokens x H_kv x D
    assert bytes_per_block(model, 16, torch.bfloat16) == elements * 2
    assert bytes_per_block(model, 16, torch.int8) == elements + 2 * 2 * 16 * 1 * 4
    assert bytes_per_block(model, 16, torch.float8_e4m3fn) == bytes_per_block(model, 16, torch.int8)
    assert bytes_per_block(model, 16, torch.bfloat16) * 132 == bytes_per_block(model, 16, torch.int8) * 256


def test_8bit_cache_nearly_doubles_the_blocks_and_says_so(caplog):
    """The same (fake) GPU budget, bf16 model: auto vs --kv-cache-dtype int8 (the profile forward
    runs over a temporary int8 cache too)."""
    raw = {**HEAD_128, "torch_dtype": "bfloat16"}
    configs = {kv: dataclasses.replace(
        engine_config(max_model_len=64, max_num_seqs=10_000, tokens=96, kv_cache_dtype=kv),
        model_config=ModelConfig.from_hf_dict(raw), max_graph_batch_size=0) for kv in ("auto", "int8")}
    model = build_model(model_class(configs["auto"].model_config), configs["auto"].model_config, "auto", "cpu",
                        torch.bfloat16)
    fill_dummy_weights(model)
    bf16 = bytes_per_block(model, 16, torch.bfloat16)
    fake = FakeGpu(total=1000 * bf16, free=1000 * bf16, allocated=0, reserved=0, peak=0)
    with caplog.at_level(logging.INFO):
        auto, int8 = (plan_kv_cache(configs[kv], model.eval(), fake, graphs=False) for kv in ("auto", "int8"))
    assert auto.num_blocks == 900 and auto.dtype == torch.bfloat16  # 0.9 x 1000 blocks of bf16
    assert int8.num_blocks == 900 * bf16 // bytes_per_block(model, 16, torch.int8) == 1745
    assert int8.max_concurrency / auto.max_concurrency == pytest.approx(1744 / 899)
    assert "KV cache: 1745 blocks of 16 tokens" in caplog.text
    assert "int8 + float32 scales per token and head" in caplog.text
