"""Decode CUDA graphs with MLA + MoE (the bundled tiny DeepSeek-V3), on CPU with the eager stand-in
for capture: MLAAttention declares itself graph-safe, and a decode batch replayed through the padded
static buffers (capture context at max_model_len, padding rows with slot -1 and seq_len 1) gives the
logits of the eager step."""

from __future__ import annotations

import pytest
import torch

from deepserve.engine.args import EngineArgs
from deepserve.engine.cuda_graph import DecodeGraphs, EagerCapturer, capture_sizes, supports_graphs
from deepserve.engine.engine_core import EngineCore
from deepserve.engine.kv_cache import attention_layers
from deepserve.engine.model_runner import ModelRunner
from deepserve.forward_context import build_forward_context, forward_context
from deepserve.layers.mla import MLAAttention
from deepserve.loader.model_loader import load_model
from deepserve.sampling_params import SamplingParams
from tests.kernels.interpret import load_kernel_module

MAX_LEN, BLOCK = 256, 16


def tiny_v3(attention_mode: str = "auto", device: str = "cpu", **args):
    config = EngineArgs(model="tiny-deepseek-v3", device=device, dtype="float32", max_model_len=MAX_LEN,
                        num_kv_blocks=120, max_num_seqs=8, enforce_eager=True, attention_mode=attention_mode,
                        **args).create_engine_config()
    return config, load_model(config, progress=False)


@pytest.fixture(scope="module")
def v3():
    return tiny_v3()


def test_mla_layers_declare_graph_safety(v3):
    _, model = v3
    layers = attention_layers(model)
    assert layers and all(isinstance(layer, MLAAttention) for layer in layers)
    assert supports_graphs(model)
    _, naive = tiny_v3("naive")
    assert not supports_graphs(naive)  # naive decode sizes its gathers from the host lengths


def replay_vs_eager(model, device: str, capturer, max_num_seqs: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill 5 sequences eagerly, then one decode step: (replayed through the batch-8 graph, eager)
    logits [5, V], both from the same cache contents. max_num_seqs > 0: the runner binds split-K counters
    (the decode kernel merges its splits itself); they are zero again afterwards."""
    runner = ModelRunner(model, num_blocks=120, block_size=BLOCK, device=device, max_num_seqs=max_num_seqs)
    graphs = DecodeGraphs((8,), MAX_LEN // BLOCK, BLOCK, MAX_LEN, device)
    runner.capture_decode_graphs(graphs, capturer)
    gen = torch.Generator().manual_seed(0)
    lens = [3, 17, 40, 1, 16]
    tables = [list(range(1 + 4 * i, 1 + 4 * i + (n + BLOCK) // BLOCK)) for i, n in enumerate(lens)]  # room for +1
    prefill = build_forward_context(lens, lens, tables, BLOCK, device)
    with torch.inference_mode(), forward_context(prefill):
        model(torch.randint(0, 8192, (sum(lens),), generator=gen).to(device), prefill.positions)
    host = build_forward_context([1] * len(lens), [n + 1 for n in lens], tables, BLOCK)
    decode = build_forward_context([1] * len(lens), [n + 1 for n in lens], tables, BLOCK, device)
    ids = torch.randint(0, 8192, (len(lens),), generator=gen)
    caches = [c.clone() for c in runner.kv_caches]
    with torch.inference_mode(), forward_context(decode):
        eager = runner._decode_step(ids.to(device), decode.positions).cpu()
    for cache, saved in zip(runner.kv_caches, caches):
        cache.copy_(saved)  # the replay writes the same new latents again
    with torch.inference_mode():
        replayed = graphs.run(ids, host).cpu()  # padded to 8 rows
    assert replayed.shape == eager.shape == (5, 8192)
    for layer in attention_layers(model):
        assert not layer.split_counters.any()
        assert max_num_seqs == 0 or layer.split_counters.shape[0] == max_num_seqs
    return replayed, eager


@pytest.mark.parametrize("triton_route, max_num_seqs", [(False, 0), (True, 0), (True, 8)],
                         ids=["torch", "triton-interpreted", "triton-fused-merge"])
def test_decode_replay_equals_eager_logits(v3, triton_route, max_num_seqs, monkeypatch):
    """triton_route: the MLA layers take their GPU route (cache-write and decode kernels, the split count
    from max(seq_lens_cpu) = max_model_len at capture: 2 splits here), under the Triton interpreter;
    max_num_seqs 8: with split-K counters bound, so the captured decode merges inside its kernel."""
    _, model = v3
    if triton_route:
        load_kernel_module("mla_decode_attention"), load_kernel_module("mla_norm_rope_write")
        monkeypatch.setattr(MLAAttention, "_on_triton", lambda self, t: True)
    for layer in attention_layers(model):  # the model is shared: unbind the counters again afterwards
        monkeypatch.setattr(layer, "split_counters", layer.split_counters)
    replayed, eager = replay_vs_eager(model, "cpu", EagerCapturer(), max_num_seqs)
    torch.testing.assert_close(replayed, eager, atol=1e-4, rtol=1e-4)
    assert torch.equal(replayed.argmax(-1), eager.argmax(-1))


@pytest.mark.gpu
@pytest.mark.parametrize("max_num_seqs", [0, 8], ids=["two-launch-merge", "fused-merge"])
def test_gpu_decode_graph_replay_equals_eager_logits(max_num_seqs):
    """Real CUDA graphs (MLA decode kernel, fused MoE, rotary, norms) in float32: replay == eager."""
    from deepserve.engine.cuda_graph import CudaGraphCapturer

    _, model = tiny_v3(device="cuda")
    replayed, eager = replay_vs_eager(model, "cuda", CudaGraphCapturer(), max_num_seqs)
    torch.testing.assert_close(replayed, eager, atol=2e-3, rtol=2e-3)
    assert torch.equal(replayed.argmax(-1), eager.argmax(-1))


def test_engine_with_eager_capture_matches_plain_engine():
    """Greedy tokens of 5 requests (decode batches of 5 padded to 8, fewer as requests finish)."""
    prompts = [[(7 * i + j) % 8192 + 2 for j in range(n)] for i, n in enumerate([3, 17, 30, 5, 40])]
    params = [SamplingParams(max_tokens=6 + 2 * i, temperature=0.0, ignore_eos=True) for i in range(5)]

    def generate(core: EngineCore) -> dict[str, list[int]]:
        for i, (p, sp) in enumerate(zip(prompts, params)):
            core.add_request(str(i), p, sp)
        out: dict[str, list[int]] = {}
        while core.has_unfinished():
            for o in core.step():
                out.setdefault(o.request_id, []).extend(o.new_token_ids)
        return out

    config, model = tiny_v3()
    expected = generate(EngineCore(config, model))
    core = EngineCore(config, model)
    graphs = DecodeGraphs(capture_sizes(8, 512), MAX_LEN // BLOCK, BLOCK, MAX_LEN, "cpu")
    core.runner.capture_decode_graphs(graphs, EagerCapturer())
    replays = []
    original = graphs.run
    graphs.run = lambda ids, ctx, *rest: replays.append(ctx.num_seqs) or original(ids, ctx, *rest)
    assert generate(core) == expected
    assert replays and max(replays) == 5
