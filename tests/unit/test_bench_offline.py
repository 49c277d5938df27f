"""Offline benchmarks (W-offline, W-b1) on a tiny dummy-weight model, CPU only."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from deepserve.bench import offline
from deepserve.bench.offline import (RunTiming, build_parser, latency_figures, resolve_model_arg,
                                     throughput_figures, weight_bytes_read)

TINY = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 256, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256, "eos_token_id": 1}
REPO = Path(__file__).resolve().parents[2]
SERVER_PACKAGES = ("fastapi", "uvicorn", "pydantic", "msgspec", "zmq", "prometheus_client", "rich", "gguf")


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny-shape"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY))
    return folder  # config.json only: no weights, no tokenizer


def test_shape_names_resolve_to_benchmark_configs():
    for shape in ("qwen-1.5b", "qwen-7b", "llama-8b", "qwen-32b", "v2-lite"):
        assert Path(resolve_model_arg(shape), "config.json").is_file()
    assert resolve_model_arg("/no/such/folder") == "/no/such/folder"
    assert resolve_model_arg(None) is None


def test_throughput_defaults_follow_w_offline():
    ns = build_parser().parse_args(["throughput", "--model", "qwen-7b"])
    assert (ns.num_prompts, ns.input_len, ns.output_len, ns.max_num_seqs) == (256, 512, 256, 256)
    ns = build_parser().parse_args(["latency", "--model", "qwen-7b"])
    assert (ns.batch_size, ns.input_len, ns.output_len) == (1, 128, 256)
    assert offline.engine_args(ns).max_model_len == 384


def test_figures_arithmetic():
    t = RunTiming(wall_s=2.0, output_tokens=1000, first_token_s=[0.1, 0.2, 0.3])
    assert throughput_figures(t, num_prompts=4, input_len=500) == {
        "wall_s": 2.0, "output_tok_s": 500.0, "total_tok_s": 1500.0, "ttft_ms_p50": 200.0}
    runs = [RunTiming(1.1, 11, [0.1]), RunTiming(1.2, 11, [0.2]), RunTiming(2.0, 11, [1.0])]
    f = latency_figures(runs, batch=1, output_len=11)
    assert f["ms_per_token"] == 100.0 and f["decode_tok_s"] == 10.0 and f["wall_s"] == 1.2


def test_weight_bytes_skip_untied_embedding(tiny_folder):
    from deepserve.engine.args import EngineArgs
    from deepserve.loader.model_loader import load_model

    model = load_model(EngineArgs(model=str(tiny_folder), load_format="dummy").create_engine_config())
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.model.embed_tokens.weight
    assert weight_bytes_read(model, batch=1) == total - embed.numel() * embed.element_size()


def test_weight_bytes_int8_head_of_a_tied_model(tmp_path):
    """A tied model reads its embedding matrix whole as the head; with --quantize-lm-head the head is its own
    int8 matrix (+ float32 row scales) and the embedding is read a row per token: the step's bytes count the
    int8 head and not the float matrix."""
    from deepserve.engine.args import EngineArgs
    from deepserve.loader.model_loader import load_model
    from tests.tiny_checkpoints import make_tiny_llama

    folder = make_tiny_llama(tmp_path / "tied", tie_word_embeddings=True)
    flt = load_model(EngineArgs(model=str(folder)).create_engine_config(), progress=False)
    q8 = load_model(EngineArgs(model=str(folder), quantize_lm_head=True).create_engine_config(), progress=False)
    total = sum(p.numel() * p.element_size() for p in flt.parameters())  # the tied matrix once
    assert weight_bytes_read(flt, batch=1) == total
    vocab, hidden = flt.model.embed_tokens.weight.shape
    assert weight_bytes_read(q8, batch=1) == total - vocab * hidden * 4 + vocab * hidden + vocab * 4


def test_throughput_end_to_end(tiny_folder, tmp_path):
    results = tmp_path / "out" / "cpu.jsonl"
    ns = build_parser().parse_args(["throughput", "--model", str(tiny_folder), "--load-format", "dummy",
                                    "--num-prompts", "5", "--input-len", "8", "--output-len", "4",
                                    "--result-file", str(results), "--run-id", "abc"])
    assert offline.run(ns) == 0
    record = json.loads(results.read_text().splitlines()[-1])
    assert record["workload"] == "W-offline" and record["run_id"] == "abc" and record["model"] == "tiny-shape"
    assert record["engine"] == "deepserve" and record["batch"] == 5 and record["output_tok_s"] > 0
    assert record["total_tok_s"] == pytest.approx(record["output_tok_s"] * 3, rel=0.01)
    for key in ("date", "git_sha", "gpu", "driver", "torch", "triton", "dtype", "quant", "tp", "notes"):
        assert key in record
    assert (record["quant"], record["kv_cache_dtype"]) == ("none", "auto")


def test_quant_label_names_the_int8_head_and_an_8bit_kv_cache(tiny_folder):
    """A run with an 8-bit KV cache or the int8 head is labelled so: its figure is never read as the weight
    method's alone."""
    from deepserve.engine.args import EngineArgs

    def label(**kw):
        return offline.quant_label(EngineArgs(model=str(tiny_folder), **kw).create_engine_config())

    assert label() == "none"
    assert label(quantization="int8") == "int8"
    assert label(quantization="int8", kv_cache_dtype="int8") == "int8+kv-int8"
    assert label(kv_cache_dtype="fp8") == "none+kv-fp8"
    assert label(quantization="int8-weight-only", quantize_lm_head=True) == "int8-weight-only+int8-lm-head"


@pytest.mark.parametrize("warmup_len", [None, 2])
def test_throughput_warms_up_at_full_size_with_other_prompts(tiny_folder, tmp_path, monkeypatch, warmup_len):
    """The untimed warm-up has the timed run's request count and input length (so every prefill chunk
    and decode batch is compiled before timing), other prompts, and --warmup-output-len tokens (default:
    the timed --output-len)."""
    calls = []
    real_run = offline.Bench.run

    def recording_run(self, prompts, output_len):
        calls.append(([list(p) for p in prompts], output_len))
        return real_run(self, prompts, output_len)

    monkeypatch.setattr(offline.Bench, "run", recording_run)
    argv = ["throughput", "--model", str(tiny_folder), "--load-format", "dummy", "--num-prompts", "6",
            "--input-len", "8", "--output-len", "4", "--result-file", str(tmp_path / "cpu.jsonl")]
    offline.run_throughput(build_parser().parse_args(argv + ([] if warmup_len is None else
                                                             ["--warmup-output-len", str(warmup_len)])))
    (warm, warm_out), (timed, timed_out) = calls
    assert len(warm) == len(timed) == 6 and {len(p) for p in warm + timed} == {8}
    assert warm_out == (warmup_len or 4) and timed_out == 4
    assert not {tuple(p) for p in warm} & {tuple(p) for p in timed}
    with pytest.raises(ValueError, match="warmup-output-len"):
        offline.run_throughput(build_parser().parse_args(argv + ["--warmup-output-len", "0"]))


def test_throughput_num_iters_reports_the_median_run(tiny_folder, tmp_path, monkeypatch):
    """--num-iters N: one warm-up, then N timed runs on N sets of new prompts; the record's figures are the
    median run's (by wall time) and runs_output_tok_s lists every run; N < 1 is refused."""
    walls = iter([9.0, 2.0, 8.0, 4.0])  # warm-up, then three timed runs: the median wall is 4.0
    real_run = offline.Bench.run
    seen = []

    def timed_run(self, prompts, output_len):
        t = real_run(self, prompts, output_len)
        seen.append(tuple(map(tuple, prompts)))
        return offline.RunTiming(next(walls), t.output_tokens, t.first_token_s)

    monkeypatch.setattr(offline.Bench, "run", timed_run)
    results = tmp_path / "cpu.jsonl"
    argv = ["throughput", "--model", str(tiny_folder), "--load-format", "dummy", "--num-prompts", "3",
            "--input-len", "8", "--output-len", "4", "--result-file", str(results)]
    offline.run_throughput(build_parser().parse_args(argv + ["--num-iters", "3"]))
    record = json.loads(results.read_text().splitlines()[-1])
    assert len(seen) == 4 and len(set(seen)) == 4  # other prompts every run
    assert record["wall_s"] == 4.0 and record["output_tok_s"] == 3.0  # 12 tokens / 4 s
    assert record["runs_output_tok_s"] == [6.0, 1.5, 3.0] and "median of 3" in record["notes"]
    with pytest.raises(ValueError, match="num-iters"):
        offline.run_throughput(build_parser().parse_args(argv + ["--num-iters", "0"]))


def test_latency_end_to_end_with_roofline(tiny_folder, tmp_path):
    results = tmp_path / "cpu.jsonl"
    ns = build_parser().parse_args(["latency", "--model", str(tiny_folder), "--load-format", "dummy",
                                    "--input-len", "8", "--output-len", "5", "--num-iters", "2",
                                    "--roofline-bandwidth-gbs", "50", "--result-file", str(results)])
    record = offline.run_latency(ns)
    assert record["workload"] == "W-b1" and record["batch"] == 1
    assert 0 < record["roofline_fraction"] and record["roofline_tok_s"] > 0 and record["ms_per_token"] > 0
    assert json.loads(results.read_text())["ms_per_token"] == record["ms_per_token"]


@pytest.mark.parametrize("caching", [True, False])
def test_prefix_end_to_end(tiny_folder, tmp_path, caching):
    """W-prefix: with caching on, the timed requests reuse the prefix the untimed one cached."""
    results = tmp_path / "cpu.jsonl"
    argv = ["prefix", "--model", str(tiny_folder), "--load-format", "dummy", "--prefix-len", "48",
            "--input-len", "8", "--output-len", "3", "--num-prompts", "4", "--result-file", str(results)]
    record = offline.run_prefix(build_parser().parse_args(argv + ([] if caching else ["--no-prefix-caching"])))
    assert record["workload"] == "W-prefix" and record["prefix_caching"] is caching and record["batch"] == 4
    assert record["total_tok_s"] == pytest.approx(record["output_tok_s"] * (48 + 8 + 3) / 3, rel=0.01)
    # 48 of each timed request's 56 prompt tokens (3 blocks of 16) hit; the untimed one missed.
    assert record["prefix_hit_rate"] == (pytest.approx(4 * 48 / (5 * 56), abs=1e-3) if caching else 0.0)
    assert json.loads(results.read_text())["ttft_ms_p50"] == record["ttft_ms_p50"]


def test_offline_bench_imports_no_server_package(tiny_folder):
    """The GPU machine has torch/triton/numpy/transformers/safetensors/tokenizers/jinja2 only."""
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {SERVER_PACKAGES!r}:
                    raise ImportError("blocked " + name)
        sys.meta_path.insert(0, Block())
        from deepserve.bench.offline import main
        sys.exit(main(["latency", "--model", {str(tiny_folder)!r}, "--load-format", "dummy",
                       "--input-len", "4", "--output-len", "2", "--num-iters", "1"]))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "W-b1" in out.stdout


def test_weight_bytes_folded_shared_experts_read_whole():
    """A stack with shared experts folded in (rows past n_routed_experts) reads those rows whole and
    the routed rows by the batch's share: the same bytes as the unfolded layer."""
    from types import SimpleNamespace

    from torch import nn

    def model_with(stack_rows: int, shared_rows: int) -> nn.Module:
        m = nn.Module()
        m.config = SimpleNamespace(n_routed_experts=8, num_experts_per_tok=2, tie_word_embeddings=False)
        m.experts = nn.Module()
        m.experts.w13 = nn.Parameter(torch.zeros(stack_rows, 4, 3))
        m.shared_experts = nn.Module()
        m.shared_experts.w = nn.Parameter(torch.zeros(shared_rows, 4, 3))
        return m

    per_expert = 4 * 3 * 4  # float32 bytes
    unfolded = weight_bytes_read(model_with(8, 2), batch=1)  # shared MLP apart: 2 whole + 8 * 2/8 routed
    folded = weight_bytes_read(model_with(10, 0), batch=1)
    assert unfolded == folded == per_expert * (2 + 2)
    assert weight_bytes_read(model_with(10, 0), batch=8) == per_expert * 10  # every routed expert hit
