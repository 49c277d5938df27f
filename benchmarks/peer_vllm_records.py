"""Turn the output of ../shared/peers/vllm/run_bench.sh into benchmark records (BENCHMARKS.md fields).

    python benchmarks/peer_vllm_records.py OUT_DIR --run-id RUN --gpu "NVIDIA H200" [--driver D]
        [--torch 2.11.0+cu130] [--result-file benchmarks/results/gpu.jsonl]

OUT_DIR holds <step>.log files, each ending with the JSON vLLM's `bench throughput|latency
--output-json` wrote. Throughput steps become W-offline records (output tok/s = requests x output
length / elapsed time, as deepserve counts it), latency steps W-b1 records (median latency of the
timed iterations; tok/s = output tokens / latency). The run id pairs them with deepserve's figures
measured on the same machine in the same session.
"""

from __future__ import annotations

import argparse
import json
import statistics
from datetime import datetime, timezone
from pathlib import Path

STEPS = {  # step -> (model shape, workload, input len, output len, requests)
    "qwen_thr": ("qwen-7b", "W-offline", 512, 256, 256), "qwen_lat": ("qwen-7b", "W-b1", 128, 256, 1),
    "v2_thr": ("v2-lite", "W-offline", 512, 256, 256), "v2_lat": ("v2-lite", "W-b1", 128, 256, 1),
    "qwen15_thr": ("qwen-1.5b", "W-offline", 512, 256, 256), "qwen15_lat": ("qwen-1.5b", "W-b1", 128, 256, 1),
    "llama_thr": ("llama-8b", "W-offline", 512, 256, 256), "llama_lat": ("llama-8b", "W-b1", 128, 256, 1),
}


def last_json(text: str) -> dict | None:
    """The JSON object run_bench.sh appended after the last `--- rc=` line (vLLM's --output-json,
    pretty-printed or not), or None when the step wrote none."""
    tail = text[text.rfind("--- rc="):] if "--- rc=" in text else text
    start = tail.find("{")
    if start < 0:
        return None
    try:
        return json.loads(tail[start:])
    except json.JSONDecodeError:
        return None


def record(step: str, data: dict, common: dict) -> dict:
    model, workload, input_len, output_len, requests = STEPS[step]
    base = {**common, "model": model, "workload": workload, "batch": requests, "input_len": input_len,
            "output_len": output_len}
    if workload == "W-offline":
        wall = data["elapsed_time"]
        return {**base, "wall_s": round(wall, 3), "output_tok_s": round(requests * output_len / wall, 2),
                "total_tok_s": round(requests * (input_len + output_len) / wall, 2),
                "notes": f"vllm bench throughput, random dataset {requests} x {input_len} in / {output_len} out, "
                         f"dummy weights, default mode (torch.compile + CUDA graphs)"}
    latencies = data.get("latencies") or [data["avg_latency"]]
    wall = statistics.median(latencies)
    return {**base, "wall_s": round(wall, 4), "output_tok_s": round(output_len / wall, 2),
            "ms_per_token": round(1000 * wall / output_len, 4),
            "notes": f"vllm bench latency, batch 1, {input_len} in / {output_len} out, median of {len(latencies)} "
                     f"iterations; ms_per_token = latency / output tokens (prefill included)"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--run-id", required=True)
    p.add_argument("--gpu", required=True)
    p.add_argument("--driver", default=None)
    p.add_argument("--torch", default="2.11.0+cu130")
    p.add_argument("--triton", default="3.6.0")
    p.add_argument("--result-file", default=str(Path(__file__).parent / "results" / "gpu.jsonl"))
    p.add_argument("--quant", default="none", help="the --quantization the logs ran with (e.g. fp8)")
    ns = p.parse_args()
    common = {"run_id": ns.run_id, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "git_sha": None,
              "gpu": ns.gpu, "driver": ns.driver, "torch": ns.torch, "triton": ns.triton, "engine": "vllm",
              "engine_version": "0.20.0", "dtype": "bfloat16", "quant": ns.quant, "tp": 1, "pp": 1, "ep": 1}
    with open(ns.result_file, "a", encoding="utf-8") as f:
        for step in STEPS:
            log = Path(ns.out_dir) / f"{step}.log"
            data = last_json(log.read_text()) if log.is_file() else None
            if data is None:
                continue
            rec = record(step, data, common)
            if ns.quant != "none":
                rec["notes"] += f"; --quantization {ns.quant}"
            f.write(json.dumps(rec) + "\n")
            print(f"{step:<11}{rec['model']:<10}{rec['workload']:<10}{rec['output_tok_s']:>10} out tok/s")


if __name__ == "__main__":
    main()
