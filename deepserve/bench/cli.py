"""`deepserve bench serve`: argument parsing and the command.

    deepserve bench serve [--base-url http://127.0.0.1:8000] [--model NAME]
                          [--num-requests 100] [--request-rate R | --concurrency N]
                          [--input-len 128] [--output-len 128] [--result-file out.jsonl] ...

`add_bench_parser(subparsers)` adds `bench` (with its `serve` subcommand) to the top-level
parser and returns bench's subparsers action (other bench commands may add themselves there);
`main(args)` runs the parsed namespace and returns the exit status (2 on a bad argument
or an unreachable server, one line on stderr, no traceback). The load generator is imported
inside the command, so building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from typing import Any

EXIT_USAGE = 2


def add_bench_parser(subparsers: Any) -> Any:
    """Add `bench` and `bench serve`; returns bench's own subparsers so more commands can join."""
    from deepserve.bench.offline import add_offline_commands

    bench = subparsers.add_parser("bench", help="benchmarks: serve (online), throughput, latency, prefix (offline)")
    sub = bench.add_subparsers(dest="bench_command", required=True)
    add_serve_args(sub.add_parser("serve", help="stream requests to an OpenAI-compatible server and "
                                                "report TTFT / TPOT / ITL / E2E, throughput and goodput"))
    add_offline_commands(sub)
    return sub


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (default: loopback :8000)")
    p.add_argument("--model", default=None, help="model name (default: the first of GET /v1/models)")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    load = p.add_argument_group("load")
    load.add_argument("--num-requests", type=int, default=100)
    load.add_argument("--request-rate", type=float, default=math.inf,
                      help="Poisson arrivals in req/s (default inf: all at once)")
    load.add_argument("--concurrency", type=int, default=None,
                      help="most requests in flight; alone it is a closed loop of N clients")
    load.add_argument("--time-limit", type=float, default=None, help="stop after this many seconds")
    load.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    load.add_argument("--ready-timeout", type=float, default=120.0,
                      help="seconds to wait while the server answers 503 (model loading)")
    load.add_argument("--seed", type=int, default=0)
    _add_prompt_args(p.add_argument_group("prompts"))
    _add_output_args(p.add_argument_group("results"))


def _add_prompt_args(g: Any) -> None:
    g.add_argument("--input-len", type=int, default=128, help="prompt tokens (about one per random word)")
    g.add_argument("--output-len", type=int, default=128, help="max_tokens of every request")
    g.add_argument("--prompt-kind", choices=("words", "token-ids"), default="words",
                   help="random words, or random token ids sent as a list (completions only)")
    g.add_argument("--vocab-size", type=int, default=1000, help="token ids are drawn from [0, N)")
    g.add_argument("--prompt-file", default=None, help='jsonl lines {"prompt": str | [int], "max_tokens"?: int}')
    g.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let EOS end a request early (default: ignore_eos, exactly --output-len tokens)")


def _add_output_args(g: Any) -> None:
    g.add_argument("--ttft-slo", type=float, default=2.0, help="goodput TTFT bound in seconds (default 2)")
    g.add_argument("--tpot-slo", type=float, default=0.05, help="goodput TPOT bound in seconds (default 0.05)")
    g.add_argument("--result-file", default=None,
                   help="write the JSON summary: '-' stdout, *.jsonl appends one line, else overwrite")
    g.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE",
                   help="extra fields for the JSON record (run_id, gpu, engine, ...); repeatable")


def config_from_args(args: argparse.Namespace) -> Any:
    from deepserve.bench.serve import ServeBenchConfig

    return ServeBenchConfig(
        base_url=args.base_url, model=args.model, endpoint=args.endpoint, num_requests=args.num_requests,
        request_rate=args.request_rate, concurrency=args.concurrency, input_len=args.input_len,
        output_len=args.output_len, prompt_kind=args.prompt_kind, prompt_file=args.prompt_file,
        vocab_size=args.vocab_size, seed=args.seed, ignore_eos=args.ignore_eos, ttft_slo_s=args.ttft_slo,
        tpot_slo_s=args.tpot_slo, time_limit_s=args.time_limit, request_timeout_s=args.request_timeout,
        ready_timeout_s=args.ready_timeout, api_key=args.api_key)


def parse_metadata(items: list[str]) -> dict[str, str]:
    bad = [item for item in items if "=" not in item]
    if bad:
        raise ValueError(f"--metadata takes KEY=VALUE, got {bad[0]!r}")
    return dict(item.split("=", 1) for item in items)


def main(args: argparse.Namespace) -> int:
    from deepserve.bench.offline import OFFLINE_COMMANDS

    if args.bench_command in OFFLINE_COMMANDS:
        from deepserve.bench.offline import run

        return run(args)
    if args.bench_command != "serve":
        return _fail(f"unknown bench command {args.bench_command!r}")
    return serve_main(args)


def serve_main(args: argparse.Namespace) -> int:
    import httpx

    from deepserve.bench import serve_report
    from deepserve.bench.serve import run_benchmark

    try:
        config, extra = config_from_args(args), parse_metadata(args.metadata)
        run = asyncio.run(run_benchmark(config))
    except (ValueError, OSError, httpx.HTTPError) as exc:
        return _fail(str(exc) or type(exc).__name__)
    summary = serve_report.summarize(run, config)
    serve_report.print_table(summary)
    if args.result_file:
        serve_report.write_result(summary, args.result_file, extra)
    return 0


def _fail(message: str) -> int:
    print(f"deepserve bench: error: {message.splitlines()[0]}", file=sys.stderr)
    return EXIT_USAGE
