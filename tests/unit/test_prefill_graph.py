"""Prefill CUDA graphs (deepserve/engine/prefill_graph.py): ladder, routing rules and the padded
two-sequence layout on CPU; through the engine with the eager stand-in for capture and TritonAttention
under the Triton interpreter (the reference backend reads host tuples, so it is not graph-safe); graph vs
eager on a GPU (gpu-marked)."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from deepserve.config import CacheConfig, ConfigError, EngineConfig, ModelConfig, SchedulerConfig
from deepserve.engine.cuda_graph import PAD_SLOT, EagerCapturer
from deepserve.engine.engine_core import EngineCore
from deepserve.engine.prefill_graph import (PrefillGraphs, PrefillInputs, prefill_capture_sizes, prefill_graph_tokens,
                                            supports_prefill_graphs)
from deepserve.forward_context import build_forward_context, get_forward_context
from deepserve.layers.attention import Attention
from deepserve.loader.dummy import fill_dummy_weights
from deepserve.loader.model_loader import build_model, model_class
from tests.kernels.paged_cases import triton_attention_module
from tests.unit.test_cuda_graph import TINY, generate

BLOCK = 16

# ------------------------------------------------------------------------------- ladder and routing


@pytest.mark.parametrize("cap, expected", [
    (256, (16, 32, 64, 128, 256)),
    (100, (16, 32, 64, 100)),
    (16, (16,)),
    (8, (8,)),
    (2, (2,)),
    (1, ()),
    (0, ()),
])
def test_prefill_capture_sizes(cap, expected):
    assert prefill_capture_sizes(cap) == expected


def test_can_run_one_sequence_of_2_to_max_tokens():
    graphs = PrefillGraphs(prefill_capture_sizes(100), 8, BLOCK, 128, "cpu")
    assert graphs.can_run([2]) and graphs.can_run([17]) and graphs.can_run([100])
    assert not graphs.can_run([1])  # a decode
    assert not graphs.can_run([101])  # larger than the largest graph
    assert not graphs.can_run([5, 5]) and not graphs.can_run([])
    with pytest.raises(ValueError, match="ascending"):
        PrefillGraphs((32, 16), 8, BLOCK, 128, "cpu")


def test_run_picks_the_smallest_padded_size_and_slices():
    graphs = PrefillGraphs(prefill_capture_sizes(100), 8, BLOCK, 128, "cpu")
    graphs.capture(lambda ids, pos: torch.stack([ids, pos], dim=1) * 10, EagerCapturer())
    used = {}
    for n in (2, 16, 17, 33, 64, 65, 100):
        ctx = build_forward_context([n], [n + 3], [[1] * 8], BLOCK)
        out = graphs.run(torch.arange(n) + 1, ctx)
        used[n] = int(graphs.static.query_start_loc[2])  # the padded size T
        assert out.tolist() == [[10 * (i + 1), 10 * (i + 3)] for i in range(n)]
    assert used == {2: 16, 16: 16, 17: 32, 33: 64, 64: 64, 65: 100, 100: 100}
    with pytest.raises(ValueError, match="no captured prefill graph"):
        graphs.run(torch.arange(101), build_forward_context([101], [101], [[1] * 8], BLOCK))


# ------------------------------------------------------------------------------- the fill


def test_fill_lays_out_the_chunk_and_the_padding_sequence():
    static = PrefillInputs.allocate(max_tokens=32, max_blocks=6, device="cpu")
    wide = build_forward_context([30], [90], [[9, 9, 9, 9, 9, 9]], BLOCK)
    static.fill(torch.arange(30), wide, padded=32)  # an earlier, wider and longer chunk
    ctx = build_forward_context([5], [5], [[4]], BLOCK)  # a first chunk of 5 tokens, padded to 16
    static.fill(torch.tensor([11, 12, 13, 14, 15]), ctx, padded=16)
    assert static.input_ids[:16].tolist() == [11, 12, 13, 14, 15] + [0] * 11
    assert static.positions[:16].tolist() == [0, 1, 2, 3, 4] + list(range(11))
    assert static.slot_mapping[:16].tolist() == [64, 65, 66, 67, 68] + [PAD_SLOT] * 11
    assert static.query_start_loc.tolist() == [0, 5, 16]
    assert static.seq_lens.tolist() == [5, 11]
    assert static.block_tables.tolist() == [[4, 0, 0, 0, 0, 0], [0] * 6]  # the old row's columns cleared


def test_fill_of_a_later_chunk_and_of_an_exact_fit():
    static = PrefillInputs.allocate(max_tokens=32, max_blocks=6, device="cpu")
    ctx = build_forward_context([3], [35], [[7, 2, 5]], BLOCK)  # start 32 (a prefix-cache hit), 3 new tokens
    static.fill(torch.tensor([1, 2, 3]), ctx, padded=16)
    assert static.positions[:4].tolist() == [32, 33, 34, 0]
    assert static.slot_mapping[:4].tolist() == [80, 81, 82, PAD_SLOT]
    assert static.seq_lens.tolist() == [35, 13] and static.query_start_loc.tolist() == [0, 3, 16]
    assert static.block_tables[0, :4].tolist() == [7, 2, 5, 0]
    exact = build_forward_context([16], [20], [[3, 8]], BLOCK)
    static.fill(torch.arange(16), exact, padded=16)
    assert static.query_start_loc.tolist() == [0, 16, 16] and static.seq_lens.tolist() == [20, 0]  # empty padding


def test_fill_refuses_what_no_graph_takes():
    static = PrefillInputs.allocate(max_tokens=32, max_blocks=2, device="cpu")
    too_wide = build_forward_context([4], [40], [[1, 2, 3]], BLOCK)
    with pytest.raises(ValueError, match="exceeds the captured"):
        static.fill(torch.arange(4), too_wide, padded=16)
    two = build_forward_context([2, 2], [2, 2], [[1], [2]], BLOCK)
    with pytest.raises(ValueError, match="one sequence"):
        static.fill(torch.arange(4), two, padded=16)
    with pytest.raises(ValueError, match="one sequence"):
        static.fill(torch.arange(20), build_forward_context([20], [20], [[1, 2]], BLOCK), padded=16)


def test_capture_context_is_static_two_sequences_not_decode():
    graphs = PrefillGraphs((16, 32), max_blocks_per_seq=4, block_size=BLOCK, max_model_len=64, device="cpu")
    seen = {}

    def forward(ids, positions):
        ctx = get_forward_context()
        seen[ids.shape[0]] = (ctx, ctx.query_start_loc.tolist(), ctx.seq_lens.tolist(), ctx.slot_mapping.tolist())
        assert ctx.positions.data_ptr() == graphs.static.positions.data_ptr()
        return torch.zeros(ids.shape[0], 3)

    graphs.capture(forward, EagerCapturer())
    assert sorted(seen) == [16, 32]
    ctx, starts, seq_lens, slots = seen[16]
    assert not ctx.is_decode_only and ctx.num_seqs == 2
    assert ctx.query_lens_cpu == (16, 0) and ctx.seq_lens_cpu == (64, 0)
    assert ctx.block_tables.shape == (2, 4) and ctx.positions.shape == (16,)
    assert starts == [0, 16, 16] and seq_lens == [16, 0] and slots == [PAD_SLOT] * 16  # writes nowhere


def test_pending_inputs_are_gathered_after_the_fill():
    graphs = PrefillGraphs((16,), 4, BLOCK, 64, "cpu")
    graphs.capture(lambda ids, pos: ids[:, None].clone(), EagerCapturer())
    ctx = build_forward_context([4], [4], [[1]], BLOCK)
    sampled = torch.tensor([70, 71, 72])
    out = graphs.run(torch.tensor([5, 6, 7, -1]), ctx, pending=([3], [2], sampled))
    assert out[:, 0].tolist() == [5, 6, 7, 72]


# ------------------------------------------------------------------------------- support


def tiny_config(max_prefill_graph_tokens=32, max_num_batched_tokens=2048, device="cpu", enforce_eager=True,
                **engine) -> EngineConfig:
    return EngineConfig(model="tiny", model_config=ModelConfig.from_hf_dict(TINY), device=device,
                        cache=CacheConfig(num_blocks=200),
                        scheduler=SchedulerConfig(max_num_seqs=2, max_model_len=256,
                                                  max_num_batched_tokens=max_num_batched_tokens),
                        enforce_eager=enforce_eager, max_prefill_graph_tokens=max_prefill_graph_tokens,
                        **engine).resolve()


def triton_model(config: EngineConfig, monkeypatch) -> torch.nn.Module:
    """The tiny Qwen2 with TritonAttention (kernels under the Triton interpreter on CPU)."""
    backend = triton_attention_module()
    monkeypatch.setattr("deepserve.layers.attention.attention_backend_cls", lambda device_type: backend.TritonAttention)
    model = build_model(model_class(config.model_config), config.model_config, "auto", config.device, torch.float32)
    fill_dummy_weights(model, seed=1)
    return model.eval()


def test_only_triton_attention_and_dense_models_support_prefill_graphs(monkeypatch):
    from deepserve.layers.moe import RoutedExperts

    config = tiny_config()
    plain = build_model(model_class(config.model_config), config.model_config, "auto", "cpu", torch.float32)
    assert not supports_prefill_graphs(plain) and not getattr(Attention, "supports_prefill_cuda_graph", False)
    assert prefill_graph_tokens(config, plain) == 0
    model = triton_model(config, monkeypatch)
    assert supports_prefill_graphs(model)
    assert prefill_graph_tokens(config, model) == 32
    assert prefill_graph_tokens(tiny_config(1000, max_num_batched_tokens=100), model) == 100  # the step budget
    assert prefill_graph_tokens(tiny_config(1000), model) == 256  # max_model_len
    assert prefill_graph_tokens(tiny_config(0), model) == 0
    model.moe = RoutedExperts(2, 64, 32, "silu")  # an MoE layer: excluded
    assert not supports_prefill_graphs(model)


def test_negative_cap_is_a_config_error():
    with pytest.raises(ConfigError, match="max_prefill_graph_tokens"):
        tiny_config(-1)


def test_cli_flag_reaches_the_engine_config():
    import argparse

    from deepserve.engine.args import EngineArgs
    from deepserve.engine.messages import decode_engine_config, encode_engine_config

    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    for flag, expected in (([], 256), (["--max-prefill-graph-tokens", "64"], 64),
                           (["--max-prefill-graph-tokens", "0"], 0)):
        ns = parser.parse_args(["--model", "tiny-deepseek-v3", "--device", "cpu", *flag])
        config = EngineArgs.from_cli_args(ns).create_engine_config()
        assert config.max_prefill_graph_tokens == expected
        assert decode_engine_config(encode_engine_config(config)) == config


# ------------------------------------------------------------------------------- through the engine


class NanTorch:
    """`torch` for the prefill-attention kernel module whose `empty_like` fills with NaN: a row of the
    attention output that no sequence owns stays NaN (and poisons the graph output's check below)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty_like(x, **kwargs):
        return torch.full_like(x, float("nan"), **kwargs)


class RecordingCapturer(EagerCapturer):
    """EagerCapturer that records every replay's full (padded) output."""

    def __init__(self):
        self.outputs: list[torch.Tensor] = []

    def capture(self, fn):
        fn()

        def replay():
            out = fn()
            self.outputs.append(out.clone())
            return out

        return replay


def graph_engine(config: EngineConfig, model, monkeypatch, caplog) -> tuple[EngineCore, RecordingCapturer, list]:
    """An engine whose `_capture_graphs` ran with the recording stand-in (decode and prefill graphs, one
    capturer); the chunk sizes n of every prefill replay are appended to the returned list."""
    core = EngineCore(config, model)
    capturer = RecordingCapturer()
    monkeypatch.setattr(core.platform, "graph_capturer", lambda: capturer, raising=False)
    with caplog.at_level(logging.INFO, logger="deepserve.engine.engine_core"):
        core._capture_graphs()
    assert core.runner.graphs is not None and core.runner.prefill_graphs is not None
    replays, run = [], core.runner.prefill_graphs.run
    core.runner.prefill_graphs.run = lambda ids, ctx, *rest: replays.append(ids.shape[0]) or run(ids, ctx, *rest)
    return core, capturer, replays


def prompts_of(lengths: list[int], seed: int) -> list[list[int]]:
    return [[(seed + 7 * i + 3 * j) % 256 for j in range(n)] for i, n in enumerate(lengths)]


LONE = prompts_of([3, 17, 32, 40], seed=1)  # one request at a time
SHARED = LONE[3][:32] + [9, 8, 7, 6, 5]  # 2 full blocks cached from the 40-token prompt
TOGETHER = prompts_of([5, 12], seed=2)  # one batch


def run_all(core: EngineCore) -> list:
    return [generate(core, [p], 2)["0"] for p in LONE + [SHARED]] + [generate(core, TOGETHER, 2)]


@pytest.fixture(scope="module")
def plain_tokens():
    """The greedy tokens of `run_all` on an engine without graphs (synchronous scheduling)."""
    config = tiny_config(32)
    with pytest.MonkeyPatch.context() as mp:
        return run_all(EngineCore(config, triton_model(config, mp)))


@pytest.mark.parametrize("async_scheduling", ["off", "on"])
def test_engine_with_prefill_graphs_matches_plain_engine(async_scheduling, plain_tokens, monkeypatch, caplog):
    """Same greedy tokens as an engine without graphs: lone prompts of 3..32 tokens replay the padded
    graphs (3 -> 16, 17 -> 32, 32 exactly), one of 40 (> Tmax) and two concurrent ones run eagerly, and a
    prompt sharing 32 tokens with an earlier one is a later chunk (start 32) replayed through a graph.
    Every padded graph output is finite, its padding rows included (NaN-filled attention output)."""
    backend = triton_attention_module()
    monkeypatch.setitem(backend.paged_prefill_attention.__globals__, "torch", NanTorch())
    config = dataclasses.replace(tiny_config(32), async_scheduling=async_scheduling)
    core, capturer, replays = graph_engine(config, triton_model(config, monkeypatch), monkeypatch, caplog)
    assert core.async_scheduling is (async_scheduling == "on")
    assert "captured 2 CUDA graphs for prefill chunks of 16..32 tokens" in caplog.text
    capturer.outputs.clear()
    assert run_all(core) == plain_tokens
    assert replays == [3, 17, 32, 5]  # the 40-token prompt and the concurrent batch ran eagerly
    prefill_outputs = [o for o in capturer.outputs if o.shape[0] in (16, 32)]
    assert len(prefill_outputs) == 4 and all(torch.isfinite(o).all() for o in prefill_outputs)


def test_chunked_prefill_replays_middle_and_last_chunks(monkeypatch, caplog):
    """A 45-token prompt under a 24-token step budget: chunks of 24 (a middle chunk: no logits; exactly a
    graph size: the padding sequence is empty) and 21 (padded to 24), both through graphs (Tmax capped at 24)."""
    config = tiny_config(256, max_num_batched_tokens=24)
    prompt = prompts_of([45], seed=3)
    expected = generate(EngineCore(config, triton_model(config, monkeypatch)), prompt, 2)
    core, _, replays = graph_engine(config, triton_model(config, monkeypatch), monkeypatch, caplog)
    assert core.runner.prefill_graphs.sizes == (16, 24)
    assert generate(core, prompt, 2) == expected
    assert replays == [24, 21]


# ------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_engine_replays_prefill_graphs_on_gpu():
    from tests.unit.test_cuda_graph import tiny

    lone = prompts_of([3, 17, 64, 100, 250], seed=4)
    shared = lone[4][:64] + [1, 2, 3, 4, 5, 6, 7]  # a prefix-cache hit of 4 blocks: start 64

    def run_all(core):
        return [generate(core, [p], 6)["0"] for p in lone + [shared]]

    config, model = tiny(device="cuda", enforce_eager=True, max_num_seqs=8)
    expected = run_all(EngineCore(config, model))
    config, model = tiny(device="cuda", enforce_eager=False, max_num_seqs=8)
    core = EngineCore(config, model)
    assert core.runner.prefill_graphs is not None and core.runner.prefill_graphs.sizes == (16, 32, 64, 128, 256)
    replays, run = [], core.runner.prefill_graphs.run
    core.runner.prefill_graphs.run = lambda ids, ctx, *rest: replays.append(ids.shape[0]) or run(ids, ctx, *rest)
    assert run_all(core) == expected
    assert replays == [3, 17, 64, 100, 250, 7]


@pytest.mark.gpu
@pytest.mark.parametrize("start", [0, 37])
def test_prefill_graph_hidden_states_equal_eager_on_gpu(start):
    from deepserve.engine.cuda_graph import CudaGraphCapturer
    from deepserve.engine.model_runner import ModelRunner
    from deepserve.forward_context import forward_context
    from tests.unit.test_cuda_graph import tiny

    config, model = tiny(device="cuda", dtype=torch.float32)
    runner = ModelRunner(model, num_blocks=64, block_size=BLOCK, device="cuda")
    graphs = PrefillGraphs(prefill_capture_sizes(128), 16, BLOCK, config.max_model_len, "cuda")
    runner.capture_prefill_graphs(graphs, CudaGraphCapturer())
    gen = torch.Generator().manual_seed(start)
    table = [5, 9, 2, 30, 17, 11, 40, 3, 22, 8, 13]  # 11 shuffled blocks: 176 slots
    if start:
        prefix = build_forward_context([start], [start], [table], BLOCK, "cuda")
        with torch.inference_mode(), forward_context(prefix):
            model(torch.randint(0, 256, (start,), generator=gen).cuda(), prefix.positions)
    for n in (2, 17, 64, 100):
        ids = torch.randint(0, 256, (n,), generator=gen)
        dev = build_forward_context([n], [start + n], [table], BLOCK, "cuda")
        with torch.inference_mode():
            with forward_context(dev):
                eager = model(ids.cuda(), dev.positions)
            host = build_forward_context([n], [start + n], [table], BLOCK)
            replayed = graphs.run(ids, host).clone()
            torch.cuda.synchronize()
        assert replayed.shape == eager.shape == (n, 64)
        torch.testing.assert_close(replayed, eager, atol=1e-4, rtol=1e-4)
