"""Prometheus metrics for the server: `ServerMetrics(model_name, registry=None)`.

The only module that imports prometheus_client (ARCHITECTURE rule 10). The engine fills plain
stats objects; this module turns them into series named `deepserve:*`, each labelled
`model_name` (plus the bounded `finish_reason` / `reason` on two counters, never a per-request
label). Every series lives in this object's own CollectorRegistry, not the process default.

Feeding it (all three are cheap and may be called from any thread):

    metrics.observe_finished(request_stats)   once per finished request (any finish reason)
    metrics.update_engine(engine_snapshot)    whenever a fresh engine snapshot arrives
    metrics.count_rejection("rate_limit")     when the server refuses a request before the engine
    body, content_type = metrics.render()     for GET /metrics

Token counters come from the request stats only (prompt + generated tokens of each finished
request, aborted ones included), so an engine snapshot never double counts them. Preemptions
come from the snapshot's cumulative `num_preemptions`; the counter grows by its increase.

Exposition names are exactly the contract's: counters end in `_total` and no `_created`
series are exported (they would double the series count and the contract does not list them).
"""

from __future__ import annotations

import threading
from typing import Any, Iterable, Iterator, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

PREFIX = "deepserve:"
FINISH_REASONS = ("stop", "length", "abort", "error")
REJECTION_REASONS = ("rate_limit", "draining", "invalid")
# The classic text format (what generate_latest writes), understood by every Prometheus version.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Bucket upper bounds in seconds, wide enough for a 2-core CPU (seconds per token) and tight
# enough for a GPU (milliseconds); 2 s and 50 ms (the default goodput SLOs) are bucket edges.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
TPOT_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0,
                 80.0, 160.0, 320.0)


class RequestStatsLike(Protocol):
    """What `observe_finished` reads from one finished request (times: one monotonic clock, s).

    first_token_time is None when no token was produced (e.g. aborted while waiting);
    queue_time is None when the request never left the waiting queue; finish_time None skips
    E2E and TPOT. deepserve.engine.stats.RequestStats satisfies this (queue_time is a property).
    finish_reason is "stop" | "length" | "abort" | "error" (a str enum is fine); anything else,
    None included, counts as "error".
    """

    arrival_time: float
    first_token_time: float | None
    finish_time: float | None
    queue_time: float | None
    num_prompt_tokens: int
    num_generated_tokens: int
    finish_reason: Any


class EngineSnapshotLike(Protocol):
    """What `update_engine` reads from an engine snapshot (EngineStatsMsg and EngineStats fit).

    Per-step token counts a snapshot may carry are ignored: tokens are counted from request stats.
    """

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # 0..1
    prefix_cache_hit_rate: float  # 0..1
    num_preemptions: int  # cumulative since the engine started
    # Optional, cumulative: spec_num_draft_tokens, spec_num_accepted_tokens (0 when absent).


class ServerMetrics:
    def __init__(self, model_name: str, registry: CollectorRegistry | None = None):
        self.model_name = model_name
        self.registry = registry if registry is not None else CollectorRegistry()
        self._lock = threading.Lock()
        self._last_cumulative: dict[str, int] = {}
        self._build_counters()
        self._build_gauges()
        self._build_histograms()
        self._create_series()
        self.registry.register(_NoCreatedCollector(self._all_metrics()))

    # ---- construction ----------------------------------------------------------------------------

    def _build_counters(self) -> None:
        self.request_success = _counter("request_success", "Finished requests by finish reason.",
                                        "finish_reason")
        self.request_rejected = _counter("request_rejected", "Requests refused before the engine.", "reason")
        self.prompt_tokens = _counter("prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = _counter("generation_tokens", "Generated tokens of finished requests.")
        self.num_preemptions = _counter("num_preemptions", "Sequences preempted by the scheduler.")
        self.spec_draft_tokens = _counter("spec_decode_num_draft_tokens",
                                          "Speculative (MTP) draft tokens verified by the main model.")
        self.spec_accepted_tokens = _counter("spec_decode_num_accepted_tokens",
                                             "Speculative draft tokens accepted.")

    def _build_gauges(self) -> None:
        self.num_requests_running = _gauge("num_requests_running", "Requests in the running batch.")
        self.num_requests_waiting = _gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_cache_usage = _gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).")
        self.prefix_cache_hit_rate = _gauge("prefix_cache_hit_rate", "Prefix-cache hit rate (0..1).")

    def _build_histograms(self) -> None:
        self.ttft = _histogram("time_to_first_token_seconds", "Arrival to first token.", TTFT_BUCKETS)
        self.tpot = _histogram("time_per_output_token_seconds",
                               "Mean time per output token after the first.", TPOT_BUCKETS)
        self.e2e = _histogram("e2e_request_latency_seconds", "Arrival to finish.", E2E_BUCKETS)
        self.queue_time = _histogram("request_queue_time_seconds", "Time waiting before first scheduled.",
                                     QUEUE_BUCKETS)

    def _all_metrics(self) -> list:
        return [self.request_success, self.request_rejected, self.prompt_tokens, self.generation_tokens,
                self.num_preemptions, self.spec_draft_tokens, self.spec_accepted_tokens, self.num_requests_running, self.num_requests_waiting,
                self.kv_cache_usage, self.prefix_cache_hit_rate, self.ttft, self.tpot, self.e2e,
                self.queue_time]

    def _create_series(self) -> None:
        """Every bounded label combination exists from the start at 0, so rates and alerts see it."""
        for reason in FINISH_REASONS:
            self.request_success.labels(self.model_name, reason)
        for reason in REJECTION_REASONS:
            self.request_rejected.labels(self.model_name, reason)
        for metric in self._all_metrics():
            if metric not in (self.request_success, self.request_rejected):
                metric.labels(self.model_name)

    # ---- feeding ---------------------------------------------------------------------------------

    def observe_finished(self, stats: RequestStatsLike) -> None:
        """Count one finished request and observe its latencies."""
        name = self.model_name
        self.request_success.labels(name, finish_reason_label(stats.finish_reason)).inc()
        self.prompt_tokens.labels(name).inc(max(0, stats.num_prompt_tokens))
        self.generation_tokens.labels(name).inc(max(0, stats.num_generated_tokens))
        if stats.queue_time is not None:
            self.queue_time.labels(name).observe(max(0.0, stats.queue_time))
        if stats.first_token_time is not None:
            self.ttft.labels(name).observe(max(0.0, stats.first_token_time - stats.arrival_time))
        if stats.finish_time is not None:
            self._observe_finish_time(stats, stats.finish_time)

    def _observe_finish_time(self, stats: RequestStatsLike, finish_time: float) -> None:
        self.e2e.labels(self.model_name).observe(max(0.0, finish_time - stats.arrival_time))
        if stats.first_token_time is None:
            return
        tpot = time_per_output_token(stats.first_token_time, finish_time, stats.num_generated_tokens)
        if tpot is not None:
            self.tpot.labels(self.model_name).observe(tpot)

    def update_engine(self, snapshot: EngineSnapshotLike) -> None:
        """Set the gauges from a snapshot; grow the counters by their cumulative increases."""
        name = self.model_name
        self.num_requests_running.labels(name).set(snapshot.num_running)
        self.num_requests_waiting.labels(name).set(snapshot.num_waiting)
        self.kv_cache_usage.labels(name).set(snapshot.kv_cache_usage)
        self.prefix_cache_hit_rate.labels(name).set(snapshot.prefix_cache_hit_rate)
        self.num_preemptions.labels(name).inc(self._delta("preemptions", snapshot.num_preemptions))
        drafts = getattr(snapshot, "spec_num_draft_tokens", 0)
        self.spec_draft_tokens.labels(name).inc(self._delta("spec_drafts", drafts))
        accepted = getattr(snapshot, "spec_num_accepted_tokens", 0)
        self.spec_accepted_tokens.labels(name).inc(self._delta("spec_accepted", accepted))

    def _delta(self, key: str, cumulative: int) -> int:
        """Increase since the last snapshot; a smaller value means the engine restarted from 0."""
        with self._lock:
            last = self._last_cumulative.get(key, 0)
            self._last_cumulative[key] = cumulative
        return cumulative - last if cumulative >= last else cumulative

    def count_rejection(self, reason: str) -> None:
        if reason not in REJECTION_REASONS:
            raise ValueError(f"rejection reason must be one of {REJECTION_REASONS}, got {reason!r}")
        self.request_rejected.labels(self.model_name, reason).inc()

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type, for GET /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE



def finish_reason_label(reason: Any) -> str:
    """The bounded label value: "stop" | "length" | "abort" | "error" (anything else is "error")."""
    value = getattr(reason, "value", reason)
    return value if value in FINISH_REASONS else "error"


def time_per_output_token(first_token_time: float, finish_time: float, num_generated: int) -> float | None:
    """(finish - first token) / (tokens after the first); None with fewer than two tokens."""
    if num_generated < 2:
        return None
    return max(0.0, finish_time - first_token_time) / (num_generated - 1)


class _NoCreatedCollector(Collector):
    """Collects the given metric objects without their `_created` samples."""

    def __init__(self, metrics: Iterable):
        self._metrics = list(metrics)

    def collect(self) -> Iterator[Metric]:
        for metric in self._metrics:
            for family in metric.collect():
                family.samples = [s for s in family.samples if not s.name.endswith("_created")]
                yield family

    def describe(self) -> Iterator[Metric]:
        return self.collect()


def _counter(name: str, doc: str, *extra_labels: str) -> Counter:
    return Counter(PREFIX + name, doc, ("model_name", *extra_labels), registry=None)


def _gauge(name: str, doc: str) -> Gauge:
    return Gauge(PREFIX + name, doc, ("model_name",), registry=None)


def _histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
    return Histogram(PREFIX + name, doc, ("model_name",), buckets=buckets, registry=None)
