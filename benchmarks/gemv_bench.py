"""What the decode GEMV micro-benchmarks (kernels_gemv.py, kernels_head_gemv.py) share: timing as CUDA-graph
replays over enough weight copies that one replay streams more than COLD_BYTES (so the weights come from HBM
and not from the 50 MB L2, as in a decode step; median of 15 replays, divided by the copies), the records'
common BENCHMARKS.md fields, a table row's GB/s and speedup, the config sweep's ranking, and the command line
(the table after the copy-bandwidth ceiling, or --sweep)."""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path
from typing import Callable, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_dense, gpu_quant as scripts or imported
from gpu_dense import REPO, bandwidth, ceilings  # noqa: E402
from gpu_quant import time_ms  # noqa: E402

sys.path.insert(0, str(REPO))  # deepserve from this checkout
DEVICE = "cuda"
COLD_BYTES = 160 << 20
MIN_COPIES = 4  # several calls per graph: the graph launch's own latency is spread over them


def copy_count(nbytes: int) -> int:
    """Copies of nbytes of weights that stream more than COLD_BYTES in all, at least MIN_COPIES."""
    return max(MIN_COPIES, -(-COLD_BYTES // nbytes))


def timed_us(make_fn, copies: list) -> float | None:
    """us per call of make_fn(copy) (a closure per weight copy); None (and a message) when it fails."""
    try:
        return 1e3 * time_ms([make_fn(c) for c in copies])
    except Exception as exc:  # noqa: BLE001 - a compile, launch or capture failure of one candidate
        print(f"    failed: {exc!r}"[:300], file=sys.stderr, flush=True)
        return None


def record(env: dict, workload: str, model: str, layer: str, batch: int, copies: list, **dims) -> dict:
    """The BENCHMARKS.md fields shared by the records; dims (k, n, ...) follow the layer."""
    return {**env, "engine": "deepserve", "engine_version": None, "model": model, "dtype": "bfloat16",
            "quant": "none", "tp": 1, "pp": 1, "ep": 1, "workload": workload, "batch": batch, "layer": layer,
            **dims, "copies": len(copies)}


def rel_err(got, ref) -> float:
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


def checked_err(name: str, got_fn: Callable, ref_fn: Callable) -> float | None:
    """rel_err(got_fn(), ref_fn()); None (and a message) when it fails: the reference is still timed."""
    try:
        return rel_err(got_fn(), ref_fn())
    except Exception as exc:  # noqa: BLE001 - reported; the reference is still timed
        print(f"    {name} failed: {exc!r}"[:300], file=sys.stderr, flush=True)
        return None


class Speeds(NamedTuple):
    """A table row's figures; None where a timing failed."""
    ours_gbs: float | None
    ref_gbs: float | None
    speedup: float | None  # ref time / our time
    of_copy: float | None  # our GB/s over the run's copy bandwidth


def speeds(nbytes: int, ours: float | None, ref: float | None, copy_gbs: float | None) -> Speeds:
    """GB/s = nbytes of weights / time (us) for ours and the reference, the speedup and our share of copy_gbs."""
    ours_gbs, ref_gbs = (None if us is None else round(nbytes / us / 1e3, 1) for us in (ours, ref))
    speedup = None if ours is None or ref is None else round(ref / ours, 3)
    share = None if ours_gbs is None or not copy_gbs else round(ours_gbs / copy_gbs, 3)
    return Speeds(ours_gbs, ref_gbs, speedup, share)


def add_step(step_us: dict, key: tuple, calls: int, ours: float, ref: float) -> None:
    """step_us[key] = [ours, ref] us per decode step, plus calls x this row's times."""
    totals = step_us.setdefault(key, [0.0, 0.0])
    totals[0], totals[1] = totals[0] + calls * ours, totals[1] + calls * ref


class Sweep(NamedTuple):
    """The timed configs of one shape, fastest first, and the table's choice."""
    times: dict  # config -> us
    ranked: list  # configs by time
    table: tuple
    table_us: float | None  # None when the table's config failed

    @property
    def best(self):
        return self.ranked[0]

    def top(self, count: int = 3) -> str:
        return ", ".join(f"{tuple(c)} {self.times[c]:.2f}" for c in self.ranked[:count])

    def fields(self, config: str, **best_extra) -> dict:
        """The record's sweep fields and notes; best_extra follow best_us; config names a config's fields."""
        return {"best_config": list(self.best), "best_us": rounded(self.times[self.best]), **best_extra,
                "table_config": list(self.table), "table_us": rounded(self.table_us),
                "ranked": [[list(c), rounded(self.times[c])] for c in self.ranked],
                "notes": f"config = ({config}); CUDA-graph replays over cold weight copies, median of 15"}


def time_configs(table, candidates: list, time_of: Callable) -> Sweep | None:
    """time_of(config) -> us | None for the table's config, then the other candidates; None if all failed."""
    times = {}
    for cfg in [table] + [c for c in candidates if c != table]:
        us = time_of(cfg)
        if us is not None:
            times[cfg] = us
    if not times:
        return None
    return Sweep(times, sorted(times, key=times.get), table, times.get(table))


def rounded(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def fmt(v: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}s}" if v is None else f"{v:{width}.{digits}f}"


class Cli(NamedTuple):
    """What differs between the scripts' command lines."""
    doc: str  # the script's docstring: its first line is the description
    results: Path  # --json's default
    models: str  # --shapes' default
    models_help: str
    rows: str  # "ms" | "ts": --ms / --sweep-ms, the table's and the sweep's rows of x
    rows_help: str
    sweep_help: str
    sweep_rows: str  # --sweep-ms's default
    sweep_rows_help: str
    weights: tuple[str, ...] = ("bf16",)  # --weights choices for --sweep (the first is the default)


def main(cli: Cli, bench: Callable, sweep: Callable) -> None:
    """bench(models, rows, result_file, run_id, copy_gbs) after the ceilings, or sweep(models, rows, result_file,
    run_id) with --sweep."""
    parser = argparse.ArgumentParser(description=cli.doc.splitlines()[0])
    parser.add_argument("--shapes", default=cli.models, help=cli.models_help)
    parser.add_argument(f"--{cli.rows}", default="1,2,4", help=cli.rows_help)
    parser.add_argument("--sweep", action="store_true", help=cli.sweep_help)
    parser.add_argument(f"--sweep-{cli.rows}", default=cli.sweep_rows, help=cli.sweep_rows_help)
    parser.add_argument("--json", default=str(cli.results), help="records are appended here ('' for none)")
    parser.add_argument("--run-id", default=uuid.uuid4().hex[:12])
    if len(cli.weights) > 1:
        parser.add_argument("--weights", choices=cli.weights, default=cli.weights[0],
                            help="weight dtype of the swept kernel (--sweep)")
    args = parser.parse_args()
    import torch

    models = args.shapes.split(",")
    with torch.inference_mode():
        if args.sweep:
            extra = {"weights": args.weights} if len(cli.weights) > 1 else {}
            sweep(models, [int(v) for v in getattr(args, f"sweep_{cli.rows}").split(",")], args.json, args.run_id,
                  **extra)
            return
        copy_gbs = None
        if args.json:
            ceilings(args.json, args.run_id)
            copy_gbs = bandwidth(Path(args.json), args.run_id)
            print(f"device-to-device copy: {copy_gbs} GB/s (read + write)")
        bench(models, [int(v) for v in getattr(args, cli.rows).split(",")], args.json, args.run_id, copy_gbs)
    print(f"\nrun {args.run_id} -> {args.json or '(not recorded)'}")
