"""Decode CUDA graphs: ladder, padding, slicing and routing on CPU with an eager stand-in for
capture; graph-vs-eager equality on a GPU (gpu-marked)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from deepserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from deepserve.engine.cuda_graph import (PAD_SEQ_LEN, PAD_SLOT, DecodeGraphs, EagerCapturer, StaticInputs,
                                         capture_sizes, padded_size, supports_graphs)
from deepserve.engine.engine_core import EngineCore
from deepserve.engine.model_runner import ModelRunner
from deepserve.forward_context import build_forward_context, forward_context, get_forward_context
from deepserve.layers.attention import Attention, write_kv
from deepserve.loader.dummy import fill_dummy_weights
from deepserve.loader.model_loader import build_model, model_class
from deepserve.sampling_params import SamplingParams

TINY = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256}


def tiny(device="cpu", dtype=torch.float32, max_num_seqs=32, max_graph_batch_size=512, enforce_eager=True):
    config = EngineConfig(model="tiny", model_config=ModelConfig.from_hf_dict(TINY), device=device,
                          cache=CacheConfig(num_blocks=200),
                          scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_model_len=256),
                          enforce_eager=enforce_eager, max_graph_batch_size=max_graph_batch_size).resolve()
    model = build_model(model_class(config.model_config), config.model_config, "auto", device, dtype)
    fill_dummy_weights(model, seed=1)
    return config, model.eval()


# ------------------------------------------------------------------------------- ladder


@pytest.mark.parametrize("max_num_seqs, cap, expected", [
    (64, 512, (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)),
    (20, 512, (1, 2, 4, 8, 16, 20)),
    (3, 512, (1, 2, 3)),
    (256, 32, (1, 2, 4, 8, 16, 24, 32)),
    (256, 12, (1, 2, 4, 8, 12)),
    (0, 512, ()),
])
def test_capture_sizes(max_num_seqs, cap, expected):
    assert capture_sizes(max_num_seqs, cap) == expected


def test_padded_size():
    sizes = capture_sizes(64, 512)
    assert [padded_size(sizes, b) for b in (1, 3, 5, 9, 17, 24, 25, 64)] == [1, 4, 8, 16, 24, 24, 32, 64]
    assert padded_size(sizes, 65) is None


# ------------------------------------------------------------------------------- static inputs


def test_fill_pads_rows_and_columns():
    static = StaticInputs.allocate(max_bs=8, max_blocks=6, device="cpu")
    wide = build_forward_context([1] * 5, [90] * 5, [[9, 9, 9, 9, 9, 9]] * 5, block_size=16)
    static.fill(torch.tensor([1] * 5), wide, padded=8)  # an earlier, wider and larger batch
    ctx = build_forward_context([1, 1, 1], [5, 17, 33], [[1], [2, 3], [4, 5, 6]], block_size=16)
    static.fill(torch.tensor([7, 8, 9]), ctx, padded=4)
    assert static.input_ids[:4].tolist() == [7, 8, 9, 0]
    assert static.positions[:4].tolist() == [4, 16, 32, 0]
    assert static.slot_mapping[:4].tolist() == [16 + 4, 3 * 16 + 0, 6 * 16 + 0, PAD_SLOT]
    assert static.seq_lens[:4].tolist() == [5, 17, 33, PAD_SEQ_LEN]
    # Up to the batch's widest table (3 blocks): the tables, zero-padded; the padding row is zeros.
    assert static.block_tables[:4, :3].tolist() == [[1, 0, 0], [2, 3, 0], [4, 5, 6], [0, 0, 0]]
    # Past it, stale ids stay: no row reads past its own blocks (seq_len 33 -> 3 blocks).
    assert static.block_tables[0, 3:].tolist() == [9, 9, 9]
    assert static.query_start_loc.tolist() == list(range(9))
    too_wide = build_forward_context([1], [200], [list(range(1, 14))], block_size=16)
    with pytest.raises(ValueError, match="exceeds the captured"):
        static.fill(torch.tensor([1]), too_wide, padded=1)


def test_capture_context_is_static_and_worst_case():
    graphs = DecodeGraphs((1, 2, 4), max_blocks_per_seq=4, block_size=16, max_model_len=64, device="cpu")
    seen = {}

    def step(ids, positions):
        ctx = get_forward_context()
        seen[ids.shape[0]] = ctx
        assert ctx.positions.data_ptr() == graphs.static.positions.data_ptr()
        return torch.zeros(ids.shape[0], 3)

    graphs.capture(step, EagerCapturer())
    assert sorted(seen) == [1, 2, 4]
    ctx = seen[4]
    assert ctx.query_lens_cpu == (1,) * 4 and ctx.seq_lens_cpu == (64,) * 4 and ctx.is_decode_only
    assert ctx.block_tables.shape == (4, 4) and ctx.query_start_loc.shape == (5,)


def test_can_run_only_decode_batches_that_fit():
    graphs = DecodeGraphs((1, 2, 4), 4, 16, 64, "cpu")
    assert graphs.can_run([1, 1, 1])
    assert not graphs.can_run([1, 2])  # mixed
    assert not graphs.can_run([1] * 5)  # larger than the largest graph
    assert not graphs.can_run([])
    with pytest.raises(ValueError, match="ascending"):
        DecodeGraphs((4, 2), 4, 16, 64, "cpu")


def test_run_slices_the_padded_output():
    graphs = DecodeGraphs((1, 2, 4, 8), 4, 16, 64, "cpu")
    graphs.capture(lambda ids, pos: torch.stack([ids, pos], dim=1) * 10, EagerCapturer())
    ctx = build_forward_context([1] * 3, [3, 4, 5], [[1], [2], [3]], block_size=16)
    out = graphs.run(torch.tensor([5, 6, 7]), ctx)
    assert out.tolist() == [[50, 20], [60, 30], [70, 40]]


def test_reference_kv_write_skips_negative_slots():
    cache = torch.randn(2, 4, 4, 2, 8)
    before = cache.clone()
    k, v = torch.ones(3, 2, 8), torch.full((3, 2, 8), 2.0)
    write_kv(cache, k, v, torch.tensor([PAD_SLOT, 5, PAD_SLOT]))
    flat, old = cache.view(2, 16, 2, 8), before.view(2, 16, 2, 8)
    assert torch.equal(flat[0, 5], k[1]) and torch.equal(flat[1, 5], v[1])
    keep = [s for s in range(16) if s != 5]
    assert torch.equal(flat[:, keep], old[:, keep])  # slot 0 and the last slot untouched


# ------------------------------------------------------------------------------- through the engine


def generate(core: EngineCore, prompts: list[list[int]], max_tokens: int) -> dict[str, list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        core.add_request(str(i), p, params)
    out: dict[str, list[int]] = {}
    while core.has_unfinished():
        for o in core.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    return out


@pytest.mark.parametrize("async_scheduling", ["off", "on"])
def test_engine_with_eager_capture_matches_plain_engine(async_scheduling):
    """Same greedy tokens with decode batches going through padded static buffers (5 requests:
    batches of 5 padded to 8, then fewer as requests finish at different lengths); with async
    scheduling the pending inputs are written into the static buffers after the fill."""
    prompts = [[(7 * i + j) % 256 for j in range(n)] for i, n in enumerate([3, 17, 30, 5, 40])]
    config, model = tiny()
    expected = generate(EngineCore(config, model), prompts, 12)

    config, model = tiny()
    core = EngineCore(dataclasses.replace(config, async_scheduling=async_scheduling), model)
    assert core.async_scheduling is (async_scheduling == "on")
    sizes = capture_sizes(config.scheduler.max_num_seqs, config.max_graph_batch_size)
    graphs = DecodeGraphs(sizes, 16, 16, config.max_model_len, "cpu")
    core.runner.capture_decode_graphs(graphs, EagerCapturer())
    replays = []
    original = graphs.run
    graphs.run = lambda ids, ctx, *rest: replays.append(ctx.num_seqs) or original(ids, ctx, *rest)
    assert generate(core, prompts, 12) == expected
    assert replays and max(replays) == 5  # decode steps replayed; prefills ran eagerly


def test_eager_engine_on_cpu_has_no_graphs():
    config, model = tiny(enforce_eager=False)
    core = EngineCore(config, model)
    assert core.runner.graphs is None  # the CPU platform does not capture


def test_graph_safety_is_declared_by_the_attention_backend(monkeypatch):
    _, model = tiny()
    assert supports_graphs(model) == bool(getattr(Attention, "supports_cuda_graph", False))
    monkeypatch.setattr(Attention, "supports_cuda_graph", True, raising=False)
    assert supports_graphs(model)


# ------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 3, 17])
def test_graph_replay_equals_eager_on_gpu(batch, monkeypatch):
    from deepserve.engine.cuda_graph import CudaGraphCapturer

    monkeypatch.setattr(Attention, "supports_cuda_graph", True, raising=False)  # the reference backend
    config, model = tiny(device="cuda", dtype=torch.float32)
    runner = ModelRunner(model, num_blocks=256, block_size=16, device="cuda")
    sizes = capture_sizes(32, 512)
    graphs = DecodeGraphs(sizes, 16, 16, config.max_model_len, "cuda")
    runner.capture_decode_graphs(graphs, CudaGraphCapturer())
    gen = torch.Generator().manual_seed(batch)
    lens = torch.randint(1, 200, (batch,), generator=gen).tolist()
    tables = [list(range(1 + 14 * i, 1 + 14 * i + (n + 16) // 16)) for i, n in enumerate(lens)]  # room for +1
    prefill = build_forward_context(lens, lens, tables, 16, "cuda")  # fill the KV cache
    ids = torch.randint(0, 256, (sum(lens),), generator=gen).cuda()
    with torch.inference_mode(), forward_context(prefill):
        model(ids, prefill.positions)
    decode_lens = [n + 1 for n in lens]
    step_ids = torch.randint(0, 256, (batch,), generator=gen)
    host = build_forward_context([1] * batch, decode_lens, tables, 16, "cpu")
    dev = build_forward_context([1] * batch, decode_lens, tables, 16, "cuda")
    with torch.inference_mode():
        with forward_context(dev):
            eager = runner._decode_step(step_ids.cuda(), dev.positions)
        replayed = graphs.run(step_ids, host).clone()
        torch.cuda.synchronize()
    assert replayed.shape == eager.shape == (batch, 256)
    torch.testing.assert_close(replayed, eager, atol=2e-3, rtol=2e-3)
    assert torch.equal(replayed.argmax(-1), eager.argmax(-1))


@pytest.mark.gpu
def test_graph_logits_keep_the_model_dtype_on_gpu(monkeypatch):
    """A bf16 model's decode graph returns bf16 logits (no float32 copy inside the graph), equal to
    `_decode_step` run eagerly within bf16 rounding (ModelRunner's eager batches keep float32 logits)."""
    from deepserve.engine.cuda_graph import CudaGraphCapturer

    monkeypatch.setattr(Attention, "supports_cuda_graph", True, raising=False)
    config, model = tiny(device="cuda", dtype=torch.bfloat16)
    runner = ModelRunner(model, num_blocks=64, block_size=16, device="cuda")
    graphs = DecodeGraphs(capture_sizes(8, 512), 4, 16, config.max_model_len, "cuda")
    runner.capture_decode_graphs(graphs, CudaGraphCapturer())
    lens = [5, 9, 30]
    tables = [[1 + 4 * i + j for j in range(4)] for i in range(len(lens))]
    prefill = build_forward_context(lens, lens, tables, 16, "cuda")  # fill the KV cache
    with torch.inference_mode(), forward_context(prefill):
        model(torch.arange(sum(lens), device="cuda") % 256, prefill.positions)
    ids = torch.arange(len(lens)) * 7 % 256
    decode_lens = [n + 1 for n in lens]
    host = build_forward_context([1] * 3, decode_lens, tables, 16, "cpu")
    dev = build_forward_context([1] * 3, decode_lens, tables, 16, "cuda")
    with torch.inference_mode():
        with forward_context(dev):
            eager = runner._decode_step(ids.cuda(), dev.positions)
        replayed = graphs.run(ids, host).clone()
        torch.cuda.synchronize()
    assert replayed.dtype == eager.dtype == torch.bfloat16
    torch.testing.assert_close(replayed.float(), eager.float(), atol=3e-2, rtol=2e-2)


@pytest.mark.gpu
def test_engine_captures_graphs_on_gpu(monkeypatch):
    monkeypatch.setattr(Attention, "supports_cuda_graph", True, raising=False)
    prompts = [[(5 * i + j) % 256 for j in range(n)] for i, n in enumerate([3, 17, 30])]
    config, model = tiny(device="cuda", enforce_eager=True)
    expected = generate(EngineCore(config, model), prompts, 8)
    config, model = tiny(device="cuda", enforce_eager=False, max_num_seqs=8)
    core = EngineCore(config, model)
    assert core.runner.graphs is not None and core.runner.graphs.sizes == (1, 2, 4, 8)
    assert generate(core, prompts, 8) == expected
