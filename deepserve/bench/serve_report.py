"""Figures of one `bench serve` run: percentiles, throughput, goodput; JSON and a rich table.

`summarize(run, config)` returns one flat JSON-ready dict whose figure names follow
BENCHMARKS.md (`output_tok_s`, `total_tok_s`, `wall_s`, `ttft_ms_p50`, ...):

    workload, date, base_url, model, endpoint, num_requests, completed, failed, incomplete,
    request_rate ("inf" = all at once), concurrency (null = unbounded), max_in_flight,
    input_len, output_len, seed, wall_s, request_throughput (req/s), output_tok_s, total_tok_s,
    total_input_tokens, total_output_tokens,
    {ttft,tpot,itl,e2e}_ms_{mean,p50,p90,p99}   (null when nothing was measured),
    ttft_slo_ms, tpot_slo_ms, goodput_req_s, slo_attainment (good / completed), errors {msg: n}
"""

from __future__ import annotations

import datetime
import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, TextIO

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from deepserve.bench.serve import BenchRun, RequestResult, ServeBenchConfig

PERCENTILES = (50, 90, 99)
LATENCIES = ("ttft", "tpot", "itl", "e2e")
MAX_ERROR_KINDS = 5


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def latency_samples(ok: list[RequestResult]) -> dict[str, list[float]]:
    """Seconds per latency kind over successful requests (ITL: every gap of every request)."""
    return {"ttft": [r.ttft_s for r in ok], "tpot": [r.tpot_s for r in ok if r.tpot_s is not None],
            "itl": [gap for r in ok for gap in r.itl_s], "e2e": [r.e2e_s for r in ok]}


def latency_figures(samples: dict[str, list[float]]) -> dict[str, float | None]:
    figures: dict[str, float | None] = {}
    for kind in LATENCIES:
        values = samples[kind]
        figures[f"{kind}_ms_mean"] = _ms(sum(values) / len(values)) if values else None
        for q in PERCENTILES:
            figures[f"{kind}_ms_p{q}"] = _ms(percentile(values, q))
    return figures


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def is_good(result: RequestResult, ttft_slo_s: float, tpot_slo_s: float) -> bool:
    """Meets both SLOs (a one-token request has no TPOT and is judged on TTFT alone)."""
    tpot = result.tpot_s
    return result.ok and result.ttft_s <= ttft_slo_s and (tpot is None or tpot <= tpot_slo_s)


def throughput_figures(run: BenchRun, ok: list[RequestResult]) -> dict[str, float | int]:
    wall = max(run.wall_s, 1e-9)
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens or 0 for r in ok)
    return {"wall_s": round(run.wall_s, 4), "request_throughput": round(len(ok) / wall, 4),
            "output_tok_s": round(out_tokens / wall, 3), "total_tok_s": round((in_tokens + out_tokens) / wall, 3),
            "total_input_tokens": in_tokens, "total_output_tokens": out_tokens}


def goodput_figures(run: BenchRun, ok: list[RequestResult], config: ServeBenchConfig) -> dict[str, float | None]:
    good = sum(is_good(r, config.ttft_slo_s, config.tpot_slo_s) for r in ok)
    return {"ttft_slo_ms": config.ttft_slo_s * 1000.0, "tpot_slo_ms": config.tpot_slo_s * 1000.0,
            "goodput_req_s": round(good / max(run.wall_s, 1e-9), 4),
            "slo_attainment": round(good / len(ok), 4) if ok else None}


def run_figures(run: BenchRun, config: ServeBenchConfig) -> dict[str, Any]:
    failed = [r for r in run.results if not r.ok]
    errors = Counter(r.error for r in failed).most_common(MAX_ERROR_KINDS)
    return {"workload": "W-serve", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "base_url": config.base_url, "model": run.model, "endpoint": config.endpoint,
            "num_requests": config.num_requests, "completed": len(run.results) - len(failed),
            "failed": len(failed), "incomplete": run.num_incomplete,
            "request_rate": "inf" if math.isinf(config.request_rate) else config.request_rate,
            "concurrency": config.concurrency, "max_in_flight": run.max_in_flight,
            "input_len": config.input_len, "output_len": config.output_len, "seed": config.seed,
            "errors": dict(errors)}


def summarize(run: BenchRun, config: ServeBenchConfig) -> dict[str, Any]:
    ok = [r for r in run.results if r.ok]
    return (run_figures(run, config) | throughput_figures(run, ok)
            | latency_figures(latency_samples(ok)) | goodput_figures(run, ok, config))


def write_result(summary: dict[str, Any], path: str, extra: dict[str, Any] | None = None) -> None:
    """`-`: stdout; *.jsonl: append one line; anything else: overwrite with indented JSON."""
    record = summary | (extra or {})
    if path == "-":
        print(json.dumps(record, indent=2))
    elif path.endswith(".jsonl"):
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    else:
        Path(path).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def print_table(summary: dict[str, Any], file: TextIO | None = None) -> None:
    table = Table(title=f"deepserve bench serve: {summary['model']} @ {summary['base_url']}")
    for column in ("latency (ms)", "mean", "p50", "p90", "p99"):
        table.add_column(column, justify="right")
    for kind in LATENCIES:
        table.add_row(kind.upper(), *(_fmt(summary[f"{kind}_ms_{s}"]) for s in ("mean", "p50", "p90", "p99")))
    Console(file=file or sys.stderr).print(table, *_summary_lines(summary), sep="\n")


def _summary_lines(s: dict[str, Any]) -> Iterable[str]:
    yield (f"requests {s['completed']} ok / {s['failed']} failed / {s['incomplete']} incomplete "
           f"(rate {s['request_rate']}, concurrency {s['concurrency'] or 'unbounded'}, peak {s['max_in_flight']})")
    yield (f"wall {s['wall_s']:.2f} s   {s['request_throughput']:.2f} req/s   "
           f"output {s['output_tok_s']:.1f} tok/s   total {s['total_tok_s']:.1f} tok/s")
    yield (f"goodput {s['goodput_req_s']:.2f} req/s at TTFT <= {s['ttft_slo_ms']:g} ms and TPOT <= "
           f"{s['tpot_slo_ms']:g} ms (attainment {_fmt(s['slo_attainment'])})")
    for error, count in s["errors"].items():
        yield f"[red]{count} x {escape(str(error))}[/red]"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
