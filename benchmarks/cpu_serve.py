"""W-serve on CPU: the bundled default model behind `deepserve serve` vs the offline engine.

The same requests (random token ids, input 32, output 64, EOS ignored) run twice in this one
process's session, one after the other:
  * through the HTTP server (a real `deepserve serve` subprocess on loopback), streamed, driven by
    `deepserve bench serve`'s load generator at a fixed concurrency;
  * through the offline engine (`LLM.generate`) with max_num_seqs equal to that concurrency.
Appends both figures to benchmarks/results/cpu.jsonl (see ../shared/BENCHMARKS.md); the issue's
target is server output tok/s >= 90% of the offline engine's at concurrency 8.

    .venv/bin/python benchmarks/cpu_serve.py [--concurrency 8] [--num-requests 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from cpu_default import RESULTS, common_fields, random_prompts  # noqa: E402

INPUT_LEN, OUTPUT_LEN = 32, 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, concurrency: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "deepserve", "serve", "--port", str(port), "--max-num-seqs", str(concurrency)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not become ready in 300 s")


def run_server_bench(prompts: list[list[int]], concurrency: int) -> dict:
    from deepserve.bench.serve import ServeBenchConfig, run_benchmark
    from deepserve.bench.serve_report import summarize

    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p, "max_tokens": OUTPUT_LEN}) + "\n")
    port = free_port()
    proc = start_server(port, concurrency)
    try:
        config = ServeBenchConfig(base_url=f"http://127.0.0.1:{port}", num_requests=len(prompts),
                                  concurrency=concurrency, prompt_file=f.name, output_len=OUTPUT_LEN,
                                  input_len=INPUT_LEN, prompt_kind="token-ids")
        asyncio.run(run_benchmark(config))  # warm-up pass
        return summarize(asyncio.run(run_benchmark(config)), config)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        os.unlink(f.name)


def run_offline(prompts: list[list[int]], concurrency: int) -> float:
    from deepserve import LLM, SamplingParams

    llm = LLM(max_num_seqs=concurrency, kv_cache_memory_gb=0.25)
    params = SamplingParams(max_tokens=OUTPUT_LEN, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:concurrency], params)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == OUTPUT_LEN for o in outs)
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--num-requests", type=int, default=32)
    args = parser.parse_args()
    prompts = random_prompts(args.num_requests, 49152, seed=11)
    common = common_fields() | {"workload": "W-serve", "batch": args.concurrency}
    served = run_server_bench(prompts, args.concurrency)
    offline_wall = run_offline(prompts, args.concurrency)
    offline_tok_s = args.num_requests * OUTPUT_LEN / offline_wall
    import deepserve

    rows = [
        common | {"engine": "deepserve-server", "engine_version": deepserve.__version__,
                  **{k: served[k] for k in served if k.endswith(("_ms_p50", "_ms_p90", "_ms_p99", "tok_s"))},
                  "wall_s": served["wall_s"], "completed": served["completed"],
                  "notes": f"streamed, concurrency {args.concurrency}, {args.num_requests} requests, "
                           f"input {INPUT_LEN} ids, output {OUTPUT_LEN}, EOS ignored"},
        common | {"engine": "deepserve-offline", "engine_version": deepserve.__version__,
                  "output_tok_s": round(offline_tok_s, 2), "wall_s": round(offline_wall, 3),
                  "notes": f"LLM.generate, max_num_seqs {args.concurrency}, same prompts"},
    ]
    rows[0]["ratio_to_offline"] = round(served["output_tok_s"] / offline_tok_s, 3)
    with RESULTS.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"server  {served['output_tok_s']:.1f} output tok/s (TTFT p50 {served['ttft_ms_p50']:.0f} ms, "
          f"TPOT p50 {served['tpot_ms_p50']:.1f} ms)")
    print(f"offline {offline_tok_s:.1f} output tok/s -> ratio {rows[0]['ratio_to_offline']}")


if __name__ == "__main__":
    main()
