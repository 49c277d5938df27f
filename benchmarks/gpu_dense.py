"""Dense models on one GPU, in one call: the card's ceilings, deepserve W-offline and W-b1, and HF
transformers W-b1 (eager, then static cache + torch.compile), all with dummy weights of the
shapes in benchmarks/configs. Every figure is appended to benchmarks/results/gpu.jsonl with one
run_id (see ../shared/BENCHMARKS.md); a table is printed at the end.

    python benchmarks/gpu_dense.py [--shapes qwen-7b,qwen-1.5b,llama-8b] [--budget-s 540]
                                   [--skip-hf] [--skip-compile] [--skip-prefix] [--result-file PATH]

Each step runs in a child process with a deadline taken from what is left of --budget-s, so the
whole run fits the budget; a step that would not fit is skipped and says so. Order: ceilings,
then for the first shape deepserve throughput + latency, W-prefix with the prefix cache on and off,
and HF eager, then the other shapes,
then HF static cache + compile (slowest to warm up) last.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # deepserve from this checkout, installed or not
CONFIGS = REPO / "benchmarks" / "configs"
RESULTS = REPO / "benchmarks" / "results" / "gpu.jsonl"
B1_INPUT, B1_OUTPUT = 128, 256


# ------------------------------------------------------------------------------- children


def ceilings(result_file: str, run_id: str) -> None:
    """Copy bandwidth (read + write counted) and the 8192^3 bf16 matmul rate, medians of CUDA-event timings."""
    import torch

    from deepserve.bench.offline import append_record, environment_fields

    def timed(fn, reps: int) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        return statistics.median(times)

    nbytes = 4 << 30
    src = torch.randn(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src), 20)
    del src, dst
    n = 8192
    a, b = (torch.randn(n, n, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    mm_s = timed(lambda: a @ b, 20)
    env = environment_fields(torch.cuda.get_device_name(), run_id)
    common = {**env, "engine": "torch", "engine_version": torch.__version__, "model": None, "dtype": "bfloat16",
              "quant": "none", "tp": 1, "pp": 1, "ep": 1, "batch": None}
    append_record({**common, "workload": "ceiling-copy", "bandwidth_gbs": round(2 * nbytes / copy_s / 1e9, 1),
                   "notes": "device-to-device copy of 4 GiB, read + write counted, median of 20"}, result_file)
    append_record({**common, "workload": "ceiling-matmul", "tflops": round(2 * n ** 3 / mm_s / 1e12, 1),
                   "notes": "8192^3 bf16 matmul, median of 20"}, result_file)


def hf_b1(shape: str, mode: str, bandwidth_gbs: float | None, result_file: str, run_id: str) -> None:
    """HF transformers W-b1 on a dummy-weight model of `shape`: eager, or static cache + compile."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    from deepserve.bench.offline import append_record, environment_fields

    config = AutoConfig.from_pretrained(CONFIGS / shape)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    if mode == "compile":
        model.generation_config.cache_implementation = "static"
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    ids = torch.randint(0, config.vocab_size, (1, B1_INPUT), device="cuda")
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=B1_OUTPUT, min_new_tokens=B1_OUTPUT,
                  do_sample=False, pad_token_id=0)

    def run() -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, **kwargs)
        torch.cuda.synchronize()
        assert out.shape[1] == B1_INPUT + B1_OUTPUT
        return time.perf_counter() - start

    for _ in range(2 if mode == "compile" else 1):
        run()
    wall = statistics.median(run() for _ in range(3))
    ms_per_token = 1000 * wall / B1_OUTPUT  # includes the prefill: HF gives no per-step split
    record = {**environment_fields(torch.cuda.get_device_name(), run_id), "engine": "transformers",
              "engine_version": transformers.__version__, "model": shape, "dtype": "bfloat16", "quant": "none",
              "tp": 1, "pp": 1, "ep": 1, "workload": "W-b1", "batch": 1, "input_len": B1_INPUT,
              "output_len": B1_OUTPUT, "wall_s": round(wall, 4), "ms_per_token": round(ms_per_token, 4),
              "output_tok_s": round(B1_OUTPUT / wall, 2),
              "notes": f"generate(), {'static cache + torch.compile reduce-overhead' if mode == 'compile' else 'eager, dynamic cache'}"
                       f", greedy, min_new_tokens={B1_OUTPUT}; median of 3; ms_per_token = wall / output tokens"}
    if bandwidth_gbs:
        step = hf_step_bytes(model, config)
        roofline = bandwidth_gbs * 1e9 / step
        record |= {"roofline_tok_s": round(roofline, 2), "roofline_fraction": round(record["output_tok_s"] / roofline, 4),
                   "bytes_per_step": int(step), "bandwidth_gbs": bandwidth_gbs}
    append_record(record, result_file)


def hf_step_bytes(model, config) -> float:
    """Weights read per decode step (input embedding excluded unless tied) + KV at the mean context."""
    params = {id(p): p for p in model.parameters()}
    embed = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in params.values())
    if not getattr(config, "tie_word_embeddings", False):
        total -= embed.numel() * embed.element_size()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 2
    return total + (B1_INPUT + B1_OUTPUT / 2) * kv_per_token


# ------------------------------------------------------------------------------- the driver


class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def run_step(name: str, cmd: list[str], budget: Budget, cap_s: float, min_s: float = 30) -> bool:
    """Run a child with timeout min(cap_s, budget left); False when skipped, failed or timed out."""
    timeout = min(cap_s, budget.left() - 5)
    if timeout < min_s:
        print(f"[skip] {name}: {budget.left():.0f} s left of the budget", flush=True)
        return False
    print(f"[run ] {name} (deadline {timeout:.0f} s)", flush=True)
    start = time.monotonic()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=env)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        print(f"[time] {name}: killed after {timeout:.0f} s\n{_tail(out)}", flush=True)
        return False
    status = "done" if proc.returncode == 0 else f"FAIL rc={proc.returncode}"
    print(f"[{status[:4].lower()}] {name} in {time.monotonic() - start:.0f} s", flush=True)
    if proc.returncode != 0:
        print(_tail(out), flush=True)
    return proc.returncode == 0


def _tail(text: str | None, lines: int = 25) -> str:
    return "\n".join((text or "").splitlines()[-lines:])


def records(path: Path, run_id: str) -> list[dict]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("run_id") == run_id]


def bandwidth(path: Path, run_id: str) -> float | None:
    return next((r["bandwidth_gbs"] for r in records(path, run_id) if r["workload"] == "ceiling-copy"), None)


def print_table(path: Path, run_id: str) -> None:
    rows = records(path, run_id)
    print(f"\nrun {run_id} on {rows[0]['gpu'] if rows else '?'} -> {path}")
    print(f"{'engine':<13}{'model':<11}{'workload':<15}{'batch':>6}{'out tok/s':>11}{'tot tok/s':>11}"
          f"{'ms/tok':>9}{'roofline':>9}  other")
    for r in rows:
        other = {k: r[k] for k in ("bandwidth_gbs", "tflops", "wall_s", "cuda_graphs", "ttft_ms_p50", "prefix_caching",
                                   "quant") if k in r}
        print(f"{r['engine']:<13}{str(r['model']):<11}{r['workload']:<15}{str(r.get('batch') or ''):>6}"
              f"{_num(r.get('output_tok_s')):>11}{_num(r.get('total_tok_s')):>11}{_num(r.get('ms_per_token')):>9}"
              f"{_num(r.get('roofline_fraction')):>9}  {other}")


def _num(value) -> str:
    return "" if value is None else f"{value:.3g}" if isinstance(value, float) and value < 10 else f"{value}"


def bench_cmd(kind: str, shape: str, args: argparse.Namespace, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "deepserve.bench.offline", kind, "--model", shape, "--load-format", "dummy",
            "--result-file", args.result_file, "--run-id", args.run_id, *extra, *args.engine_arg]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="qwen-7b", help="comma-separated names under benchmarks/configs")
    p.add_argument("--budget-s", type=float, default=540.0, help="the whole run, seconds")
    p.add_argument("--result-file", default=str(RESULTS))
    p.add_argument("--run-id", default=uuid.uuid4().hex[:12])
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--skip-prefix", action="store_true", help="no W-prefix (cache on / off) for the first shape")
    p.add_argument("--skip-compile", action="store_true", help="HF eager only")
    p.add_argument("--engine-arg", action="append", default=[],
                   help="extra argument for deepserve's benchmarks (repeat), e.g. --engine-arg=--enforce-eager")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    budget, me = Budget(args.budget_s), [sys.executable, str(Path(__file__).resolve())]
    common = ["--result-file", args.result_file, "--run-id", args.run_id]
    run_step("ceilings", me + common + ["--child", "ceilings"], budget, cap_s=120)
    bw = bandwidth(Path(args.result_file), args.run_id)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    for i, shape in enumerate(shapes):
        run_step(f"deepserve W-offline {shape}", bench_cmd("throughput", shape, args, []), budget, cap_s=300)
        run_step(f"deepserve W-b1 {shape}", bench_cmd("latency", shape, args,
                 ["--roofline-bandwidth-gbs", str(bw)] if bw else []), budget, cap_s=240)
        if i == 0 and not args.skip_prefix:
            for flag in ([], ["--no-prefix-caching"]):
                run_step(f"deepserve W-prefix {shape} {'cache off' if flag else 'cache on'}",
                         bench_cmd("prefix", shape, args, flag), budget, cap_s=180)
        if i == 0 and not args.skip_hf:
            run_step(f"transformers W-b1 eager {shape}", me + common + ["--child", "hf", shape, "eager", str(bw)],
                     budget, cap_s=240)
    if shapes and not (args.skip_hf or args.skip_compile):
        run_step(f"transformers W-b1 compile {shapes[0]}", me + common + ["--child", "hf", shapes[0], "compile", str(bw)],
                 budget, cap_s=420, min_s=90)
    print_table(Path(args.result_file), args.run_id)


def child(args: argparse.Namespace) -> None:
    kind, *rest = args.child
    if kind == "ceilings":
        ceilings(args.result_file, args.run_id)
    elif kind == "hf":
        shape, mode, bw = rest
        hf_b1(shape, mode, None if bw == "None" else float(bw), args.result_file, args.run_id)
    else:
        raise SystemExit(f"unknown child step {kind!r}")


if __name__ == "__main__":
    main()
