"""Offline benchmarks on an in-process EngineCore (token ids only: no tokenizer, no server).

    deepserve bench throughput --model qwen-7b --load-format dummy     W-offline: --num-prompts
        requests of --input-len random token ids, all submitted at once, --output-len tokens each
        (EOS ignored); output tok/s, total tok/s, wall s
    deepserve bench prefix --model qwen-7b --load-format dummy [--no-prefix-caching]   W-prefix:
        --num-prompts requests sharing a --prefix-len prefix + --input-len unique ids; TTFT
    deepserve bench latency --model qwen-7b --load-format dummy        W-b1: --batch-size 1,
        input 128, output 256; ms per output token, tok/s and, with --roofline-bandwidth-gbs, the
        fraction of the bandwidth roofline (bytes of weights + KV read per decode step / bandwidth)

--model is a checkpoint folder, or the name of a shape under benchmarks/configs (config.json
only, with --load-format dummy). Timing covers generation only: the model is loaded, the KV
cache planned, CUDA graphs captured and one warm-up batch run before the clock starts; the
device is synchronised before the clock is read. Each run appends one JSON line (the fields of
shared/BENCHMARKS.md) to --result-file. Imports only torch and deepserve's engine, so it runs where
the server's packages (fastapi, rich, ...) are not installed.

Also runnable as `python -m deepserve.bench.offline throughput|latency ...`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from deepserve.config import EngineConfig
from deepserve.engine.args import EngineArgs

SHAPES_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "configs"
THROUGHPUT_DEFAULTS = {"max_num_seqs": 256, "max_num_batched_tokens": 8192}


# ------------------------------------------------------------------------------- arguments


def add_common_args(p: argparse.ArgumentParser, input_len: int, output_len: int) -> None:
    EngineArgs.add_cli_args(p)
    g = p.add_argument_group("benchmark")
    g.add_argument("--input-len", type=int, default=input_len, help="prompt tokens (random ids)")
    g.add_argument("--output-len", type=int, default=output_len, help="generated tokens (EOS ignored)")
    g.add_argument("--result-file", default=None, help="append one JSON line here (BENCHMARKS.md fields)")
    g.add_argument("--run-id", default=None, help="pairs figures measured together (default: new)")
    g.add_argument("--shape-name", default=None, help="the `model` field (default: the folder's name)")
    g.add_argument("--notes", default="", help="free text for the record")


def add_throughput_args(p: argparse.ArgumentParser) -> None:
    add_common_args(p, input_len=512, output_len=256)
    p.set_defaults(**THROUGHPUT_DEFAULTS)
    p.add_argument("--num-prompts", type=int, default=256, help="requests, all submitted at once")
    p.add_argument("--warmup-output-len", type=int, default=None,
                   help="tokens per request of the untimed warm-up, which has the timed run's request count and "
                        "input length (other prompts), so every prefill chunk and decode batch the timed run "
                        "meets is compiled first (default: --output-len)")
    p.add_argument("--num-iters", type=int, default=1,
                   help="timed runs in this process, each on new prompts; the record has the median run's "
                        "figures and every run's output tok/s (runs_output_tok_s): repeat runs of one engine, for "
                        "workloads whose runs spread (a host-bound prefill)")


def add_latency_args(p: argparse.ArgumentParser) -> None:
    add_common_args(p, input_len=128, output_len=256)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--num-iters", type=int, default=5, help="timed runs (the median is reported)")
    p.add_argument("--num-iters-warmup", type=int, default=2)
    p.add_argument("--roofline-bandwidth-gbs", type=float, default=None,
                   help="memory bandwidth in GB/s (read+write copy rate) for the roofline fraction")


def add_prefix_args(p: argparse.ArgumentParser) -> None:
    add_common_args(p, input_len=128, output_len=128)
    p.set_defaults(**THROUGHPUT_DEFAULTS)
    p.add_argument("--prefix-len", type=int, default=2048, help="tokens every request shares")
    p.add_argument("--num-prompts", type=int, default=64, help="requests, all submitted at once")


OFFLINE_COMMANDS = ("throughput", "latency", "prefix")


def add_offline_commands(sub: Any) -> None:
    """The offline benchmark subcommands, on `deepserve bench` or this module's own parser."""
    add_throughput_args(sub.add_parser("throughput", help="W-offline: a batch of requests at once"))
    add_latency_args(sub.add_parser("latency", help="W-b1: one request, ms per token, roofline"))
    add_prefix_args(sub.add_parser("prefix", help="W-prefix: requests sharing a long prefix (run with "
                                                  "and without --no-prefix-caching)"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepserve bench", description="offline benchmarks")
    add_offline_commands(parser.add_subparsers(dest="bench_command", required=True))
    return parser


def resolve_model_arg(model: str | None) -> str | None:
    """A shape name under benchmarks/configs becomes that folder; anything else is unchanged."""
    if model and not Path(model).exists() and (SHAPES_DIR / model / "config.json").is_file():
        return str(SHAPES_DIR / model)
    return model


def engine_args(ns: argparse.Namespace) -> EngineArgs:
    args = EngineArgs.from_cli_args(ns)
    max_len = args.max_model_len or ns.input_len + ns.output_len
    return dataclasses.replace(args, model=resolve_model_arg(args.model), max_model_len=max_len)


# ------------------------------------------------------------------------------- the engine


@dataclass
class Bench:
    """A loaded engine core and what the records need to know about it."""

    core: Any  # EngineCore
    model: Any  # nn.Module
    config: Any  # EngineConfig
    platform: Any  # Platform

    @classmethod
    def load(cls, args: EngineArgs) -> "Bench":
        from deepserve.engine.engine_core import EngineCore
        from deepserve.engine.memory import oom_guard
        from deepserve.loader.model_loader import load_model
        from deepserve.platforms import get_platform

        config = args.create_engine_config()
        platform = get_platform(config.device)
        with oom_guard(platform, "loading the weights"):
            model = load_model(config, progress=False)
        return cls(EngineCore(config, model), model, config, platform)

    def random_prompts(self, count: int, length: int, seed: int) -> list[list[int]]:
        import torch

        gen = torch.Generator().manual_seed(seed)
        vocab = self.config.model_config.vocab_size
        return torch.randint(0, vocab, (count, length), generator=gen).tolist()

    def run(self, prompts: list[list[int]], output_len: int) -> "RunTiming":
        """Submit every prompt, step to the end; wall clock and per-request first-token times."""
        from deepserve.sampling_params import SamplingParams

        params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
        self.platform.synchronize()
        start = time.perf_counter()
        for i, prompt in enumerate(prompts):
            self.core.add_request(f"bench-{i}", prompt, params)
        first: dict[str, float] = {}
        produced = 0
        while self.core.has_unfinished():
            for out in self.core.step():
                produced += len(out.new_token_ids)
                first.setdefault(out.request_id, time.perf_counter() - start)
        self.platform.synchronize()
        return RunTiming(time.perf_counter() - start, produced, sorted(first.values()))

    @property
    def graphs_on(self) -> bool:
        return self.core.runner.graphs is not None


@dataclass(frozen=True)
class RunTiming:
    wall_s: float
    output_tokens: int
    first_token_s: list[float]  # per request, ascending


# ------------------------------------------------------------------------------- figures


def throughput_figures(t: RunTiming, num_prompts: int, input_len: int) -> dict[str, Any]:
    return {"wall_s": round(t.wall_s, 3), "output_tok_s": round(t.output_tokens / t.wall_s, 2),
            "total_tok_s": round((t.output_tokens + num_prompts * input_len) / t.wall_s, 2),
            "ttft_ms_p50": round(1000 * statistics.median(t.first_token_s), 2)}


def latency_figures(runs: list[RunTiming], batch: int, output_len: int) -> dict[str, Any]:
    """Median over runs; ms per token is the decode rate (after the first token)."""
    wall = statistics.median(r.wall_s for r in runs)
    ttft = statistics.median(r.first_token_s[-1] for r in runs)
    decode_s = statistics.median((r.wall_s - r.first_token_s[-1]) / max(1, output_len - 1) for r in runs)
    return {"wall_s": round(wall, 4), "ttft_ms_p50": round(1000 * ttft, 3),
            "ms_per_token": round(1000 * decode_s, 4), "output_tok_s": round(batch * output_len / wall, 2),
            "decode_tok_s": round(batch / decode_s, 2)}


def weight_bytes_read(model: Any, batch: int) -> int:
    """Bytes of parameters one decode step reads: all of them, except an input embedding that is not also
    an LM head's weight (only `batch` rows are read; a tied head quantised by --quantize-lm-head has its
    own) and, in MoE layers, the routed experts no token picked (at most batch x top_k of n_routed_experts).
    Shared experts folded into an expert stack (its rows past n_routed_experts) are read whole."""
    from deepserve.layers.embedding import LMHead, VocabEmbedding

    cfg = model.config
    expert_share = 1.0
    if getattr(cfg, "n_routed_experts", 0):
        expert_share = min(1.0, batch * cfg.num_experts_per_tok / cfg.n_routed_experts)
    heads = {id(m.weight) for m in model.modules() if isinstance(m, LMHead)}
    embeds = {id(m.weight) for m in model.modules()
              if isinstance(m, VocabEmbedding) and not isinstance(m, LMHead)} - heads
    total = 0.0
    for name, p in model.named_parameters():
        size = p.numel() * p.element_size()
        if id(p) in embeds:
            continue
        if ".experts." in f".{name}" and "shared_experts" not in name:
            routed = getattr(cfg, "n_routed_experts", 0) or p.shape[0]
            shared_rows = max(p.shape[0] - routed, 0) if p.dim() == 3 else 0  # folded shared experts
            size = size / p.shape[0] * (routed * expert_share + shared_rows) if p.dim() == 3 else size * expert_share
        total += size
    return int(total)


def roofline_figures(bench: Bench, batch: int, input_len: int, output_len: int, decode_tok_s: float,
                     bandwidth_gbs: float) -> dict[str, Any]:
    """Decode step time >= (weights read + KV read at the mean context) / bandwidth."""
    plan = bench.core.kv_plan
    kv_per_token = plan.bytes_per_block / plan.block_size
    mean_context = input_len + output_len / 2
    step_bytes = weight_bytes_read(bench.model, batch) + batch * mean_context * kv_per_token
    roofline_tok_s = batch * bandwidth_gbs * 1e9 / step_bytes
    return {"roofline_tok_s": round(roofline_tok_s, 2),
            "roofline_fraction": round(decode_tok_s / roofline_tok_s, 4),
            "bytes_per_step": int(step_bytes), "bandwidth_gbs": bandwidth_gbs}


# ------------------------------------------------------------------------------- records


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def environment_fields(device_name: str, run_id: str | None = None) -> dict[str, Any]:
    """run_id, date, git_sha, gpu, driver, torch, triton (BENCHMARKS.md)."""
    import torch

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"run_id": run_id or uuid.uuid4().hex[:12],
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "git_sha": git_sha(),
            "gpu": device_name, "driver": nvidia_driver() if device_name != "cpu" else None,
            "torch": torch.__version__, "triton": triton_version}


def base_record(ns: argparse.Namespace, bench: Bench, workload: str, batch: int) -> dict[str, Any]:
    import deepserve

    dtype = str(next(bench.model.parameters()).dtype).removeprefix("torch.")
    shape = ns.shape_name or Path(bench.config.model).name
    sched = bench.config.scheduler
    return {**environment_fields(bench.platform.device_name(), ns.run_id), "engine": "deepserve",
            "engine_version": deepserve.__version__, "model": shape, "dtype": dtype,
            "quant": quant_label(bench.config), "kv_cache_dtype": bench.config.cache.kv_cache_dtype,
            "tp": 1, "pp": 1, "ep": 1, "workload": workload, "batch": batch,
            "input_len": ns.input_len, "output_len": ns.output_len, "cuda_graphs": bench.graphs_on,
            "max_num_seqs": sched.max_num_seqs, "max_num_batched_tokens": sched.max_num_batched_tokens,
            "num_kv_blocks": bench.core.kv_plan.num_blocks,
            "load_format": bench.config.load_format}


def quant_label(config: EngineConfig) -> str:
    """The record's `quant`: the method, "+int8-lm-head" with --quantize-lm-head, "+kv-<dtype>" with an 8-bit KV
    cache (so a run with the 8-bit cache is never read as the weight method's alone)."""
    label = (config.quantization or "none") + ("+int8-lm-head" if config.quantize_lm_head else "")
    kv = config.cache.kv_cache_dtype
    return label + (f"+kv-{kv}" if kv != "auto" else "")


def append_record(record: dict[str, Any], path: str | None) -> None:
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------------------- commands


def run_throughput(ns: argparse.Namespace) -> dict[str, Any]:
    warm_len = ns.output_len if ns.warmup_output_len is None else ns.warmup_output_len
    if warm_len < 1:
        raise ValueError(f"--warmup-output-len must be >= 1, got {warm_len}")
    if ns.num_iters < 1:
        raise ValueError(f"--num-iters must be >= 1, got {ns.num_iters}")
    bench = Bench.load(engine_args(ns))
    # Warm-up at full size (other prompts: no prefix-cache hits). Triton compiles a kernel per block config
    # and the configs follow the token count, so the old warm-up (4 prompts, 8 tokens) left the big prefill
    # chunks' compiles to the timed run. The first run of a pair on a fresh machine was often the slower
    # one (V2-Lite int8, run s8i: 13,110 then 15,085 tok/s); that this removes it is not measured yet.
    bench.run(bench.random_prompts(ns.num_prompts, ns.input_len, seed=ns.seed + 1), warm_len)
    seeds = [ns.seed] + [ns.seed + 1000 + i for i in range(1, ns.num_iters)]  # new prompts every run
    timings = [bench.run(bench.random_prompts(ns.num_prompts, ns.input_len, seed), ns.output_len) for seed in seeds]
    expected = ns.num_prompts * ns.output_len
    for timing in timings:
        if timing.output_tokens != expected:
            raise RuntimeError(f"produced {timing.output_tokens} tokens, expected {expected}")
    median = sorted(timings, key=lambda t: t.wall_s)[(len(timings) - 1) // 2]  # the lower median: a run
    notes = (f"{ns.num_prompts} requests of {ns.input_len} random ids, output {ns.output_len}, greedy, "
             f"EOS ignored, all at once; generation only (load, graph capture and a warm-up of "
             f"{ns.num_prompts} x {ns.input_len} / {warm_len} other prompts excluded)"
             + (f"; the median of {len(timings)} timed runs on new prompts" if len(timings) > 1 else ""))
    record = {**base_record(ns, bench, "W-offline", ns.num_prompts),
              **throughput_figures(median, ns.num_prompts, ns.input_len),
              "num_prompts": ns.num_prompts, "notes": " ".join(filter(None, [notes, ns.notes]))}
    if len(timings) > 1:
        record["runs_output_tok_s"] = [round(t.output_tokens / t.wall_s, 2) for t in timings]
    append_record(record, ns.result_file)
    return record


def run_latency(ns: argparse.Namespace) -> dict[str, Any]:
    bench = Bench.load(engine_args(ns))
    # New random prompts every run: a repeated prompt would be a prefix-cache hit, not W-b1.
    for i in range(ns.num_iters_warmup):
        bench.run(bench.random_prompts(ns.batch_size, ns.input_len, ns.seed + 1000 + i), ns.output_len)
    runs = [bench.run(bench.random_prompts(ns.batch_size, ns.input_len, ns.seed + i), ns.output_len)
            for i in range(ns.num_iters)]
    figures = latency_figures(runs, ns.batch_size, ns.output_len)
    if ns.roofline_bandwidth_gbs:
        figures |= roofline_figures(bench, ns.batch_size, ns.input_len, ns.output_len,
                                    figures["decode_tok_s"], ns.roofline_bandwidth_gbs)
    notes = (f"batch {ns.batch_size}, input {ns.input_len} random ids, output {ns.output_len}, greedy, "
             f"EOS ignored; median of {ns.num_iters} runs; ms_per_token and roofline_fraction on the "
             f"decode steps (after the first token), KV read at the mean context")
    record = {**base_record(ns, bench, "W-b1", ns.batch_size), **figures,
              "notes": " ".join(filter(None, [notes, ns.notes]))}
    append_record(record, ns.result_file)
    return record


def run_prefix(ns: argparse.Namespace) -> dict[str, Any]:
    """W-prefix: one request with the shared prefix runs first (untimed: it fills the prefix cache
    when caching is on), then --num-prompts requests of prefix + --input-len unique tokens at once."""
    bench = Bench.load(engine_args(_with_input_len(ns, ns.prefix_len + ns.input_len)))
    prefix = bench.random_prompts(1, ns.prefix_len, ns.seed + 99)[0]
    bench.run([prefix + bench.random_prompts(1, ns.input_len, ns.seed + 98)[0]], 1)
    prompts = [prefix + tail for tail in bench.random_prompts(ns.num_prompts, ns.input_len, ns.seed)]
    timing = bench.run(prompts, ns.output_len)
    caching = bench.config.cache.enable_prefix_caching
    notes = (f"{ns.num_prompts} requests of a shared {ns.prefix_len}-token prefix + {ns.input_len} unique random "
             f"ids, output {ns.output_len}, all at once, after one untimed request with the prefix; prefix "
             f"caching {'on' if caching else 'off'}; ttft over the {ns.num_prompts} requests")
    record = {**base_record(ns, bench, "W-prefix", ns.num_prompts),
              **throughput_figures(timing, ns.num_prompts, ns.prefix_len + ns.input_len),
              "ttft_ms_p90": round(1000 * timing.first_token_s[int(0.9 * (len(timing.first_token_s) - 1))], 2),
              "prefix_len": ns.prefix_len, "prefix_caching": caching, "num_prompts": ns.num_prompts,
              "prefix_hit_rate": round(bench.core.block_manager.stats().prefix_hit_rate, 4),
              "notes": " ".join(filter(None, [notes, ns.notes]))}
    append_record(record, ns.result_file)
    return record


def _with_input_len(ns: argparse.Namespace, input_len: int) -> argparse.Namespace:
    """A copy of `ns` whose --input-len is `input_len` (max_model_len follows it)."""
    return argparse.Namespace(**{**vars(ns), "input_len": input_len})


def format_record(r: dict[str, Any]) -> str:
    keys = ("output_tok_s", "total_tok_s", "wall_s", "ttft_ms_p50", "ms_per_token", "roofline_fraction")
    shown = ", ".join(f"{k} {r[k]}" for k in keys if k in r)
    return f"{r['engine']} {r['model']} {r['workload']} batch {r['batch']} on {r['gpu']}: {shown}"


def run(ns: argparse.Namespace) -> int:
    """Run a parsed `bench throughput|latency` namespace; prints one summary line and the JSON."""
    command = {"throughput": run_throughput, "latency": run_latency, "prefix": run_prefix}[ns.bench_command]
    record = command(ns)
    print(format_record(record))
    print(json.dumps(record))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
