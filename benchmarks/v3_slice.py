"""DeepSeek-V3 at full width on one GPU: decode time per MoE layer, extrapolated to 61 layers.

    python benchmarks/v3_slice.py [--batches 1,32,128] [--output-len 32] [--result-file PATH]

The full model does not fit one GPU, so this loads two slices of `benchmarks/configs/v3-slice`
(dummy weights, bf16, CUDA graphs): A = 3 dense + 2 MoE layers, B = 3 dense + 1 MoE layer. At
each batch size it measures the decode step time (ms per step after the first token, median of 3
runs of random prompts of --input-len tokens) of both; then

    per MoE layer            = step(A) - step(B)          (MLA attention + routed/shared experts)
    61 layers (extrapolated) = step(B) + 57 x per MoE layer   (3 dense + 58 MoE, as V3 has)

Records go to --result-file with workload "W-v3-slice", the measured figures and the
extrapolation labelled as such. Runs each slice in a child process (one model in memory at a time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BASE = REPO / "benchmarks" / "configs" / "v3-slice"
RESULTS = REPO / "benchmarks" / "results" / "gpu.jsonl"
V3_LAYERS, V3_DENSE = 61, 3


def measure(folder: str, batches: list[int], input_len: int, output_len: int) -> dict[int, float]:
    """Child: decode ms per step at each batch size for the slice in `folder`."""
    from deepserve.bench.offline import Bench
    from deepserve.engine.args import EngineArgs

    args = EngineArgs(model=folder, load_format="dummy", max_num_seqs=max(batches), max_model_len=input_len + output_len,
                      max_num_batched_tokens=max(2048, max(batches) * input_len))
    bench = Bench.load(args)
    result = {}
    for batch in batches:
        bench.run(bench.random_prompts(batch, input_len, seed=1), output_len)  # warm-up at this size
        steps = []
        for i in range(3):
            t = bench.run(bench.random_prompts(batch, input_len, seed=10 + i), output_len)
            steps.append(1000 * (t.wall_s - t.first_token_s[-1]) / (output_len - 1))
        result[batch] = statistics.median(steps)
    return result


def slice_folder(root: Path, moe_layers: int) -> str:
    config = json.loads((BASE / "config.json").read_text())
    config["num_hidden_layers"] = V3_DENSE + moe_layers
    folder = root / f"v3-slice-{moe_layers}moe"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def run_child(folder: str, ns: argparse.Namespace) -> dict[int, float]:
    out = subprocess.run([sys.executable, __file__, "--child", folder, "--batches", ns.batches,
                          "--input-len", str(ns.input_len), "--output-len", str(ns.output_len)],
                         capture_output=True, text=True, cwd=REPO, timeout=ns.timeout)
    if out.returncode != 0:
        raise SystemExit(f"slice {folder} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return {int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,32,128")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--result-file", default=str(RESULTS))
    p.add_argument("--run-id", default=uuid.uuid4().hex[:12])
    p.add_argument("--timeout", type=float, default=240)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ns = p.parse_args()
    batches = [int(b) for b in ns.batches.split(",")]
    if ns.child:
        print(json.dumps(measure(ns.child, batches, ns.input_len, ns.output_len)))
        return
    import torch

    from deepserve.bench.offline import append_record, environment_fields

    with tempfile.TemporaryDirectory() as tmp:
        two = run_child(slice_folder(Path(tmp), 2), ns)
        one = run_child(slice_folder(Path(tmp), 1), ns)
    env = environment_fields(torch.cuda.get_device_name(), ns.run_id)
    print(f"{'batch':>6}{'A: 3+2 ms':>11}{'B: 3+1 ms':>11}{'per MoE layer':>15}{'61 layers (extrap.)':>21}")
    for batch in batches:
        per_layer = two[batch] - one[batch]
        full = one[batch] + (V3_LAYERS - V3_DENSE - 1) * per_layer
        print(f"{batch:>6}{two[batch]:>11.3f}{one[batch]:>11.3f}{per_layer:>15.3f}{full:>21.2f}")
        append_record({**env, "engine": "deepserve", "engine_version": None, "model": "v3-slice", "dtype": "bfloat16",
                       "quant": "none", "tp": 1, "pp": 1, "ep": 1, "workload": "W-v3-slice", "batch": batch,
                       "input_len": ns.input_len, "output_len": ns.output_len,
                       "step_ms_3dense_2moe": round(two[batch], 4), "step_ms_3dense_1moe": round(one[batch], 4),
                       "moe_layer_ms": round(per_layer, 4), "extrapolated_61_layer_step_ms": round(full, 3),
                       "notes": "decode ms per step (median of 3 runs, CUDA graphs, dummy weights); per MoE layer = "
                                "difference of the 2-MoE and 1-MoE slices; 61-layer figure EXTRAPOLATED as "
                                "step(3 dense + 1 MoE) + 57 x per-MoE-layer, not measured"}, ns.result_file)


if __name__ == "__main__":
    main()
