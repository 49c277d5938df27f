"""W-cpu: the bundled default model on this machine's CPU cores, deepserve vs HF transformers.

Batch 1 and batch 8, input 32 random token ids, output 64 tokens (EOS ignored), greedy, float32.
Both engines load the same weights (the safetensors folder deepserve converts the GGUF into), run
in this one process, one after the other, after a warm-up. Appends one line per engine and batch
to benchmarks/results/cpu.jsonl (see ../shared/BENCHMARKS.md).

    .venv/bin/python benchmarks/cpu_default.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import torch

INPUT_LEN, OUTPUT_LEN = 32, 64
RESULTS = Path(__file__).parent / "results" / "cpu.jsonl"


def random_prompts(batch: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (batch, INPUT_LEN), generator=gen).tolist()


def time_deepserve(llm, prompts: list[list[int]]) -> float:
    from deepserve import SamplingParams

    params = SamplingParams(max_tokens=OUTPUT_LEN, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == OUTPUT_LEN for o in outs)
    return wall


def time_transformers(model, prompts: list[list[int]]) -> float:
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=OUTPUT_LEN,
                             min_new_tokens=OUTPUT_LEN, do_sample=False, pad_token_id=0)
    wall = time.perf_counter() - start
    assert out.shape[1] == INPUT_LEN + OUTPUT_LEN
    return wall


def median_wall(fn, *args, repeats: int) -> float:
    fn(*args)  # warm-up
    return statistics.median(fn(*args) for _ in range(repeats))


def record(engine: str, version: str, batch: int, wall: float, common: dict) -> dict:
    return {**common, "engine": engine, "engine_version": version, "batch": batch, "wall_s": round(wall, 3),
            "output_tok_s": round(batch * OUTPUT_LEN / wall, 2),
            "total_tok_s": round(batch * (INPUT_LEN + OUTPUT_LEN) / wall, 2)}


def common_fields() -> dict:
    import transformers

    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"run_id": uuid.uuid4().hex[:12], "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "git_sha": sha, "gpu": f"cpu-{os.cpu_count()}", "driver": None, "torch": torch.__version__,
            "triton": triton_version, "model": "smollm2-135m", "dtype": "float32", "quant": "none",
            "tp": 1, "pp": 1, "ep": 1, "workload": "W-cpu", "transformers": transformers.__version__,
            "notes": f"input {INPUT_LEN} random ids, output {OUTPUT_LEN}, greedy, EOS ignored, median of repeats"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()

    import deepserve
    from deepserve import LLM
    from transformers import AutoModelForCausalLM

    llm = LLM(max_num_seqs=16, kv_cache_memory_gb=0.25)
    hf = AutoModelForCausalLM.from_pretrained(llm.engine.config.model, dtype=torch.float32).eval()
    common = common_fields()
    rows = []
    for batch in args.batches:
        prompts = random_prompts(batch, llm.engine.config.model_config.vocab_size, seed=batch)
        rows.append(record("deepserve", deepserve.__version__, batch,
                           median_wall(time_deepserve, llm, prompts, repeats=args.repeats), common))
        rows.append(record("transformers", common["transformers"], batch,
                           median_wall(time_transformers, hf, prompts, repeats=args.repeats), common))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    for row in rows:
        print(f"{row['engine']:>12} batch {row['batch']}: {row['output_tok_s']:8.1f} output tok/s "
              f"({row['wall_s']} s)")


if __name__ == "__main__":
    main()
