"""The offline benchmark records the --quantization it ran with (the `quant` field of BENCHMARKS.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deepserve.bench import offline
from deepserve.bench.offline import build_parser

TINY = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 256, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256, "eos_token_id": 1}


@pytest.mark.parametrize("method", ["int8-weight-only", "fp8", None])
def test_latency_record_names_the_quantization(tmp_path: Path, method):
    folder = tmp_path / "tiny-shape"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY))
    results = tmp_path / "cpu.jsonl"
    argv = ["latency", "--model", str(folder), "--load-format", "dummy", "--input-len", "8", "--output-len", "3",
            "--num-iters", "1", "--num-iters-warmup", "0", "--result-file", str(results)]
    record = offline.run_latency(build_parser().parse_args(argv + (["--quantization", method] if method else [])))
    assert record["quant"] == (method or "none")
    assert json.loads(results.read_text())["quant"] == record["quant"]
