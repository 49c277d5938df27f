"""Where does a W-offline run spend its time? A step timeline and the top GPU kernels.

    python benchmarks/profile_offline.py --model qwen-7b --load-format dummy [--num-prompts 256]
        [--input-len 512] [--output-len 256] [--profile-steps 2] [--prefix-len 2048] [any engine argument]

--prefix-len N puts one shared N-token prefix before every prompt (W-prefix): the warm-up run uses
prompts with that prefix, so with prefix caching on the measured runs find it cached; the
timeline then also lists every prefill step (tokens, sequences, forward ms).

Runs the offline engine as `deepserve bench throughput` does, but drives the steps itself and
synchronises the device around each phase of a step, so every phase gets its own wall time:

    schedule   scheduler.schedule() (host)
    forward    input preparation + the model forward (graph replay or eager), device synchronised
      launch   (inside forward) the host's time to enqueue it (`ModelRunner._forward` returned, not
               synchronised): launch close to forward means a host-bound step, unless something in the
               forward blocks (a synchronisation, or more launches pending than the device's queue holds)
    sample     sampler (device synchronised) + moving the ids to the host
    update     scheduler.update() (host)

Steps are grouped as "prefill" (any sequence with more than one new token: mixed batches count
here) and "decode" (one new token per sequence). The timeline drives the synchronous path
(`ModelRunner.execute` + `Scheduler.update`) and synchronises around each phase, so it shows what
each phase costs, not the overlap of host and device that async scheduling gets (the first line,
"as benchmarked", runs the engine as it is configured).

Then torch.profiler records `--profile-steps` steps of each kind in a second run and prints the
kernels with the largest device time. `--host-profile N` then runs cProfile over the first N prefill
steps and the first N decode steps past the middle of a third run (the host's Python: where a
host-bound step spends its time; cProfile's own overhead inflates every call, so read the ranking, not
the absolute times). Prints tables only; records nothing to results/ (these are diagnostics, not
benchmark figures).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deepserve.bench.offline import Bench, add_throughput_args, engine_args  # noqa: E402


PHASES = ("schedule", "forward", "sample", "update")  # disjoint: they sum to the step


class Timeline:
    """Per-step phase times in ms, keyed by step kind."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, int, int, dict[str, float]]] = []  # kind, tokens, seqs, phases

    def add(self, kind: str, tokens: int, seqs: int, phases: dict[str, float]) -> None:
        self.rows.append((kind, tokens, seqs, phases))

    def report(self) -> str:
        lines = [f"{'kind':<8}{'steps':>6}{'tokens':>9}{'seqs/step':>10}"
                 f"{'schedule':>10}{'launch':>10}{'forward':>10}{'sample':>10}{'update':>10}{'total s':>9}"
                 "  (phase ms: mean per step; launch is inside forward)"]
        grand = 0.0
        for kind in ("prefill", "decode"):
            rows = [r for r in self.rows if r[0] == kind]
            if not rows:
                continue
            mean = {p: statistics.fmean(r[3][p] for r in rows) for p in rows[0][3]}
            total = sum(sum(v for p, v in r[3].items() if p in PHASES) for r in rows) / 1000
            grand += total
            lines.append(f"{kind:<8}{len(rows):>6}{sum(r[1] for r in rows):>9}"
                         f"{statistics.fmean(r[2] for r in rows):>10.1f}"
                         + "".join(f"{mean[p]:>10.2f}" for p in ("schedule", "launch", *PHASES[1:]))
                         + f"{total:>9.2f}")
        lines.append(f"sum of phases: {grand:.2f} s")
        return "\n".join(lines)

    def prefill_steps(self, limit: int = 24) -> str:
        """One line per prefill step (the first `limit`): tokens, sequences, forward ms."""
        rows = [r for r in self.rows if r[0] == "prefill"][:limit]
        return "\n".join(f"prefill step {i}: {tokens} tokens, {seqs} seqs, forward {phases['forward']:.1f} ms, "
                         f"schedule {phases['schedule']:.2f} ms" for i, (_, tokens, seqs, phases) in enumerate(rows))


def step_kind(batch) -> str:
    return "decode" if all(e.num_new_tokens == 1 for e in batch.scheduled) else "prefill"


def timed_run(bench: Bench, prompts: list[list[int]], output_len: int, sync) -> Timeline:
    """Drive the engine core step by step, synchronising between phases."""
    from deepserve.sampling_params import SamplingParams

    core, runner = bench.core, bench.core.runner
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        core.add_request(f"p-{i}", prompt, params)
    timeline = Timeline()
    sample_ms = [0.0]
    launched = [0.0]  # perf_counter when `_forward` returned: the forward enqueued, not synchronised
    real_sampler, real_forward = runner.sampler, runner._forward

    def timed_forward(batch):
        out = real_forward(batch)
        launched[0] = time.perf_counter()
        return out

    def timed_sampler(logits, batch):
        sync()
        t = time.perf_counter()
        out = real_sampler(logits, batch)
        sync()
        sample_ms[0] = 1000 * (time.perf_counter() - t)
        return out

    runner.sampler, runner._forward = timed_sampler, timed_forward
    try:
        while core.has_unfinished():
            t0 = time.perf_counter()
            batch = core.scheduler.schedule()
            t1 = time.perf_counter()
            if batch.is_empty:
                continue
            sample_ms[0] = 0.0
            result = runner.execute(batch)
            sync()
            t2 = time.perf_counter()
            core.scheduler.update(batch, result.sampled, result.logprobs, result.drafts)
            t3 = time.perf_counter()
            forward = 1000 * (t2 - t1) - sample_ms[0]
            launch = 1000 * (launched[0] - t1)  # host time to enqueue the forward
            timeline.add(step_kind(batch), sum(e.num_new_tokens for e in batch.scheduled), len(batch.scheduled),
                         {"schedule": 1000 * (t1 - t0), "launch": launch, "forward": forward, "sample": sample_ms[0],
                          "update": 1000 * (t3 - t2)})
    finally:
        runner.sampler, runner._forward = real_sampler, real_forward
    return timeline


def device_kernels(prof) -> list:
    """The profiled step's device events (kernels, copies, memsets), sorted by start."""
    return sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)


def exposed_us(kernels: list) -> dict[str, float]:
    """Per kernel name, the microseconds it alone adds to the union of the intervals of `kernels` (sorted by
    start): each kernel counts the part of its interval past the latest end so far."""
    exposed: dict[str, float] = defaultdict(float)
    last_end = kernels[0].time_range.start if kernels else 0
    for e in kernels:
        exposed[e.name] += max(0, e.time_range.end - max(last_end, e.time_range.start))
        last_end = max(last_end, e.time_range.end)
    return exposed


def kernel_summary(prof) -> str:
    """Device kernels of one profiled step: how many, their summed time (busy: PDL overlaps counted twice),
    the span from the first kernel's start to the last one's end, and idle = span - the union of the kernel
    intervals (the device waiting between kernels: launch gaps; `gap_table` itemises it)."""
    kernels = device_kernels(prof)
    if not kernels:
        return "no device kernels recorded"
    busy = sum(e.time_range.elapsed_us() for e in kernels) / 1000
    span = max(e.time_range.end for e in kernels) - kernels[0].time_range.start
    union = sum(exposed_us(kernels).values())
    return (f"{len(kernels)} kernels, busy {busy:.3f} ms, span {span / 1000:.3f} ms, "
            f"idle {(span - union) / 1000:.3f} ms")


def exposed_table(prof, rows: int = 20) -> str:
    """Per kernel name: the device time it alone accounts for. Kernels sorted by start; each adds the part
    of its interval past the latest end so far (with PDL a kernel starts early and waits, so its own
    duration overlaps its predecessor's; this counts only what extends the step). Sums to the union of
    the kernel intervals: where the step's device time goes, launch gaps apart."""
    kernels = device_kernels(prof)
    if not kernels:
        return "no device kernels recorded"
    exposed = exposed_us(kernels)
    calls: dict[str, int] = defaultdict(int)
    for e in kernels:
        calls[e.name] += 1
    total = sum(exposed.values())
    lines = [f"exposed device time {total / 1000:.3f} ms (union of kernel intervals); per kernel name:"]
    for name, us in sorted(exposed.items(), key=lambda kv: -kv[1])[:rows]:
        lines.append(f"  {us / 1000:8.4f} ms  {100 * us / total:5.1f}%  {calls[name]:5d} calls  "
                     f"{us / calls[name]:7.2f} us/call  {name[:70]}")
    return "\n".join(lines)


def gap_table(prof, rows: int = 12) -> str:
    """The device's idle time between kernels (gaps in the union of their intervals), summed per kernel name
    that ends the gap (the launch the device waited for), and the `rows` largest single gaps: spread thinly
    over every launch means launch overhead; concentrated before a few kernels means host work (or a
    synchronisation) there."""
    kernels = device_kernels(prof)
    if not kernels:
        return "no device kernels recorded"
    idle_before: dict[str, float] = defaultdict(float)
    gaps: list[tuple[float, str, str]] = []  # (us, the kernel before, the kernel after)
    last_end, last_name = kernels[0].time_range.start, ""
    for e in kernels:
        if e.time_range.start > last_end:
            gap = e.time_range.start - last_end
            idle_before[e.name] += gap
            gaps.append((gap, last_name, e.name))
        if e.time_range.end >= last_end:
            last_end, last_name = e.time_range.end, e.name
    total = sum(g for g, _, _ in gaps)
    lines = [f"device idle {total / 1000:.3f} ms in {len(gaps)} gaps; per kernel the device waited for:"]
    for name, us in sorted(idle_before.items(), key=lambda kv: -kv[1])[:rows]:
        lines.append(f"  {us / 1000:8.4f} ms  {name[:90]}")
    lines.append("largest gaps:")
    for gap, before, after in sorted(gaps, reverse=True)[:rows]:
        lines.append(f"  {gap:9.1f} us  after {before[:50]}  before {after[:50]}")
    return "\n".join(lines)


def profiled_run(bench: Bench, prompts: list[list[int]], output_len: int, steps: int,
                 row_limit: int = 25, cpu_rows: int = 0) -> dict[str, str]:
    """torch.profiler over the first `steps` prefill steps and `steps` decode steps past the middle; with
    `cpu_rows`, each table is followed by the ops with the most self host time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from deepserve.sampling_params import SamplingParams

    core = bench.core
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        core.add_request(f"q-{i}", prompt, params)
    tables: dict[str, str] = {}
    seen: dict[str, int] = defaultdict(int)
    decode_from = output_len // 2
    step = 0
    while core.has_unfinished():
        prof = None  # by the step counter: prefill steps at the start, decode steps past the middle
        want = ("prefill" if seen["prefill"] < steps and step < 2 * steps
                else "decode" if step >= decode_from and seen["decode"] < steps else None)
        if want:
            prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            prof.start()
        outputs = core.step()
        torch.cuda.synchronize()
        if prof is not None:
            prof.stop()
            seen[want] += 1
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=row_limit,
                                              max_name_column_width=70)
            if cpu_rows:  # host-bound steps: which ops take the host's time
                table += "\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=cpu_rows,
                                                          max_name_column_width=70)
            tables[f"{want} step {step} ({len(outputs)} outputs): {kernel_summary(prof)}"] = \
                table + "\n" + exposed_table(prof, row_limit) + "\n" + gap_table(prof, row_limit)
        step += 1
    return tables


def host_profiled_run(bench: Bench, prompts: list[list[int]], output_len: int, steps: int, sync,
                      rows: int = 30) -> dict[str, str]:
    """cProfile over `core.step()` (device synchronised after it) of the first `steps` prefill steps and
    `steps` decode steps past the middle: the functions with the most own (tottime) host time, then the most
    cumulative time (their callees included)."""
    import cProfile
    import io
    import pstats

    from deepserve.sampling_params import SamplingParams

    core = bench.core
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        core.add_request(f"h-{i}", prompt, params)
    profilers = {"prefill": cProfile.Profile(), "decode": cProfile.Profile()}
    seen: dict[str, int] = defaultdict(int)
    wall: dict[str, float] = defaultdict(float)
    step = 0
    while core.has_unfinished():
        want = ("prefill" if seen["prefill"] < steps and step < 2 * steps
                else "decode" if step >= output_len // 2 and seen["decode"] < steps else None)
        t = time.perf_counter()
        if want:
            profilers[want].enable()
        core.step()
        sync()
        if want:
            profilers[want].disable()
            seen[want] += 1
            wall[want] += time.perf_counter() - t
        step += 1
    tables = {}
    for kind, prof in profilers.items():
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(rows)
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(rows)
        tables[f"host profile, {seen[kind]} {kind} step(s), {1000 * wall[kind]:.1f} ms under cProfile"] = out.getvalue()
    return tables


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_throughput_args(p)
    p.add_argument("--profile-steps", type=int, default=1)
    p.add_argument("--prefix-len", type=int, default=0, help="tokens of one prefix shared by every prompt")
    p.add_argument("--row-limit", type=int, default=25, help="rows of each profiler table")
    p.add_argument("--cpu-rows", type=int, default=0, help="also this many rows sorted by self host time")
    p.add_argument("--host-profile", type=int, default=0, help="cProfile this many steps of each kind (host Python)")
    p.add_argument("--host-rows", type=int, default=30, help="rows of each cProfile table")
    ns = p.parse_args()
    bench = Bench.load(engine_args(argparse.Namespace(**{**vars(ns), "input_len": ns.prefix_len + ns.input_len})))
    sync = bench.platform.synchronize
    shared = bench.random_prompts(1, ns.prefix_len, ns.seed + 99)[0] if ns.prefix_len else []

    def prompts_of(count: int, seed: int) -> list[list[int]]:
        return [shared + tail for tail in bench.random_prompts(count, ns.input_len, seed)]

    bench.run(prompts_of(ns.num_prompts, ns.seed + 1), ns.output_len)  # warm-up at full size, as bench throughput
    prompts = prompts_of(ns.num_prompts, ns.seed)
    timing = bench.run(prompts, ns.output_len)
    print(f"W-offline as benchmarked: {timing.wall_s:.2f} s, {timing.output_tokens / timing.wall_s:.0f} out tok/s, "
          f"first-token p50 {1000 * statistics.median(timing.first_token_s):.0f} ms "
          f"(graphs {'on' if bench.graphs_on else 'off'})", flush=True)
    timeline = timed_run(bench, prompts_of(ns.num_prompts, ns.seed + 7), ns.output_len, sync)
    print(timeline.report(), flush=True)
    if ns.prefix_len:
        print(timeline.prefill_steps(), flush=True)
    if ns.profile_steps > 0 and bench.platform.device_type == "cuda":
        tables = profiled_run(bench, prompts_of(ns.num_prompts, ns.seed + 9),
                              ns.output_len, ns.profile_steps, ns.row_limit, ns.cpu_rows)
        for title, table in tables.items():
            print(f"\n=== {title}\n{table}", flush=True)
    if ns.host_profile > 0:
        tables = host_profiled_run(bench, prompts_of(ns.num_prompts, ns.seed + 11), ns.output_len, ns.host_profile,
                                   sync, ns.host_rows)
        for title, table in tables.items():
            print(f"\n=== {title}\n{table}", flush=True)


if __name__ == "__main__":
    main()
