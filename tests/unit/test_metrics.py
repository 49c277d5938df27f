"""ServerMetrics: exact exposition names, types, labels, histogram contents, gauges, counters."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from deepserve.server import metrics as M
from deepserve.server.metrics import ServerMetrics

MODEL = "tiny-model"

COUNTERS = {"deepserve:request_success_total", "deepserve:prompt_tokens_total",
            "deepserve:generation_tokens_total", "deepserve:num_preemptions_total",
            "deepserve:request_rejected_total", "deepserve:spec_decode_num_draft_tokens_total",
            "deepserve:spec_decode_num_accepted_tokens_total"}
GAUGES = {"deepserve:num_requests_running", "deepserve:num_requests_waiting",
          "deepserve:kv_cache_usage_perc", "deepserve:prefix_cache_hit_rate"}
HISTOGRAMS = {"deepserve:time_to_first_token_seconds": M.TTFT_BUCKETS,
              "deepserve:time_per_output_token_seconds": M.TPOT_BUCKETS,
              "deepserve:e2e_request_latency_seconds": M.E2E_BUCKETS,
              "deepserve:request_queue_time_seconds": M.QUEUE_BUCKETS}
EXTRA_LABEL = {"deepserve:request_success_total": "finish_reason", "deepserve:request_rejected_total": "reason"}


@dataclass
class FakeRequestStats:
    arrival_time: float
    first_token_time: float | None
    finish_time: float | None
    queue_time: float | None
    num_prompt_tokens: int
    num_generated_tokens: int
    finish_reason: object


@dataclass
class FakeSnapshot:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_hit_rate: float = 0.0
    num_preemptions: int = 0


class Reason(str, enum.Enum):  # like deepserve.engine.sequence.FinishReason
    STOP = "stop"
    LENGTH = "length"


def samples(metrics: ServerMetrics) -> dict[str, list]:
    """sample name -> samples, from the parsed exposition."""
    body, _ = metrics.render()
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


def families(metrics: ServerMetrics) -> dict[str, str]:
    """exposed family name (counters with their _total) -> type."""
    body, _ = metrics.render()
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        name = family.name + "_total" if family.type == "counter" else family.name
        out[name] = family.type
    return out


def value(metrics: ServerMetrics, name: str, **labels) -> float:
    want = {"model_name": MODEL, **labels}
    found = [s.value for s in samples(metrics)[name] if s.labels == want]
    assert len(found) == 1, (name, want, found)
    return found[0]


def request(arrival=10.0, first=10.5, finish=12.5, queue=0.2, prompt=7, generated=5, reason="stop"):
    return FakeRequestStats(arrival, first, finish, queue, prompt, generated, reason)


# ---- names, types, labels ---------------------------------------------------------------------------


def test_every_family_has_the_contract_name_and_type():
    got = families(ServerMetrics(MODEL))
    want = {**{n: "counter" for n in COUNTERS}, **{n: "gauge" for n in GAUGES},
            **{n: "histogram" for n in HISTOGRAMS}}
    assert got == want


def test_exposition_lines_use_exact_names_without_created_series():
    m = ServerMetrics(MODEL)
    m.observe_finished(request())
    text = m.render()[0].decode()
    assert "_created" not in text
    typed = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    assert typed == COUNTERS | GAUGES | set(HISTOGRAMS)
    sample_names = {line.split("{")[0] for line in text.splitlines() if not line.startswith("#")}
    assert sample_names == COUNTERS | GAUGES | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}


def test_content_type_is_prometheus_text():
    body, content_type = ServerMetrics(MODEL).render()
    assert isinstance(body, bytes)
    assert content_type.startswith("text/plain") and "version=0.0.4" in content_type


def test_only_model_name_and_bounded_labels():
    m = ServerMetrics(MODEL)
    for i in range(3):
        m.observe_finished(request(reason=["stop", "length", "abort"][i]))
    m.count_rejection("invalid")
    for name, group in samples(m).items():
        for s in group:
            allowed = {"model_name", EXTRA_LABEL.get(name)} | ({"le"} if name.endswith("_bucket") else set())
            assert set(s.labels) <= allowed - {None}, (name, s.labels)
            assert s.labels["model_name"] == MODEL


def test_no_per_request_label_values():
    m = ServerMetrics(MODEL)
    for i in range(50):
        m.observe_finished(request(prompt=i, generated=i + 2, finish=11.0 + i))
    series = {(name, tuple(sorted(s.labels.items()))) for name, group in samples(m).items() for s in group}
    counts_before = len(series)
    m.observe_finished(request(prompt=999, generated=999, finish=99.0))
    after = {(name, tuple(sorted(s.labels.items()))) for name, group in samples(m).items() for s in group}
    assert len(after) == counts_before  # another request adds no series


def test_bounded_series_exist_at_zero_from_the_start():
    m = ServerMetrics(MODEL)
    for reason in M.FINISH_REASONS:
        assert value(m, "deepserve:request_success_total", finish_reason=reason) == 0
    for reason in M.REJECTION_REASONS:
        assert value(m, "deepserve:request_rejected_total", reason=reason) == 0
    assert value(m, "deepserve:time_to_first_token_seconds_count") == 0
    assert value(m, "deepserve:num_requests_running") == 0


# ---- request stats -> counters and histograms ---------------------------------------------------------


def test_finish_reasons_counted_and_unknown_is_error():
    m = ServerMetrics(MODEL)
    for reason in ["stop", Reason.STOP, "length", Reason.LENGTH, "abort", None, "weird"]:
        m.observe_finished(request(reason=reason))
    assert value(m, "deepserve:request_success_total", finish_reason="stop") == 2
    assert value(m, "deepserve:request_success_total", finish_reason="length") == 2
    assert value(m, "deepserve:request_success_total", finish_reason="abort") == 1
    assert value(m, "deepserve:request_success_total", finish_reason="error") == 2


def test_token_counters_come_from_request_stats():
    m = ServerMetrics(MODEL)
    m.observe_finished(request(prompt=7, generated=5))
    m.observe_finished(request(prompt=3, generated=0, first=None, reason="abort"))
    m.update_engine(FakeSnapshot(num_running=4))  # a snapshot never touches the token counters
    assert value(m, "deepserve:prompt_tokens_total") == 10
    assert value(m, "deepserve:generation_tokens_total") == 5


def histogram(m: ServerMetrics, name: str) -> tuple[dict[float, float], float, float]:
    buckets = {float(s.labels["le"]): s.value for s in samples(m)[name + "_bucket"]}
    return buckets, value(m, name + "_sum"), value(m, name + "_count")


def test_latency_histograms_buckets_sums_counts():
    m = ServerMetrics(MODEL)
    # ttft 0.5, e2e 2.5, tpot (12.5 - 10.5) / 4 = 0.5, queue 0.2
    m.observe_finished(request(arrival=10.0, first=10.5, finish=12.5, queue=0.2, generated=5))
    # ttft 0.03, e2e 0.23, tpot 0.2 / 10 = 0.02, queue 0.004
    m.observe_finished(request(arrival=1.0, first=1.03, finish=1.23, queue=0.004, generated=11))
    expected = {"deepserve:time_to_first_token_seconds": [0.5, 0.03],
                "deepserve:e2e_request_latency_seconds": [2.5, 0.23],
                "deepserve:time_per_output_token_seconds": [0.5, 0.02],
                "deepserve:request_queue_time_seconds": [0.2, 0.004]}
    for name, observed in expected.items():
        buckets, total, count = histogram(m, name)
        assert sorted(buckets) == sorted([*HISTOGRAMS[name], math.inf])
        for le, cumulative in buckets.items():
            assert cumulative == sum(v <= le for v in observed), (name, le)
        assert total == pytest.approx(sum(observed))
        assert count == 2


def test_no_token_means_no_ttft_and_one_token_means_no_tpot():
    m = ServerMetrics(MODEL)
    m.observe_finished(request(first=None, generated=0, queue=None, reason="abort"))
    m.observe_finished(request(first=10.5, generated=1))
    assert histogram(m, "deepserve:time_to_first_token_seconds")[2] == 1
    assert histogram(m, "deepserve:time_per_output_token_seconds")[2] == 0
    assert histogram(m, "deepserve:request_queue_time_seconds")[2] == 1
    assert histogram(m, "deepserve:e2e_request_latency_seconds")[2] == 2


def test_slo_edges_are_bucket_bounds():
    assert 2.0 in M.TTFT_BUCKETS and 0.05 in M.TPOT_BUCKETS
    for buckets in HISTOGRAMS.values():
        assert list(buckets) == sorted(set(buckets))


# ---- engine snapshot -> gauges and preemptions ------------------------------------------------------


def test_engine_snapshot_sets_gauges():
    m = ServerMetrics(MODEL)
    m.update_engine(FakeSnapshot(3, 2, 0.75, 0.4, 0))
    m.update_engine(FakeSnapshot(5, 1, 0.5, 0.25, 0))
    assert value(m, "deepserve:num_requests_running") == 5
    assert value(m, "deepserve:num_requests_waiting") == 1
    assert value(m, "deepserve:kv_cache_usage_perc") == 0.5
    assert value(m, "deepserve:prefix_cache_hit_rate") == 0.25


def test_cumulative_preemptions_become_counter_increments():
    m = ServerMetrics(MODEL)
    for cumulative in [0, 2, 2, 5]:
        m.update_engine(FakeSnapshot(num_preemptions=cumulative))
    assert value(m, "deepserve:num_preemptions_total") == 5
    m.update_engine(FakeSnapshot(num_preemptions=1))  # engine restarted: its count began again at 0
    assert value(m, "deepserve:num_preemptions_total") == 6


def test_engine_stats_message_fits_the_protocol():
    from deepserve.engine.messages import EngineStatsMsg

    m = ServerMetrics(MODEL)
    m.update_engine(EngineStatsMsg(num_running=1, num_waiting=2, kv_cache_usage=0.1, prefix_cache_hit_rate=0.2,
                                   num_preemptions=3, step_prompt_tokens=100, step_generation_tokens=8))
    assert value(m, "deepserve:num_preemptions_total") == 3
    assert value(m, "deepserve:num_requests_waiting") == 2
    assert value(m, "deepserve:prompt_tokens_total") == 0  # tokens come from request stats only


def test_engine_request_stats_fit_the_protocol():
    from deepserve.engine.stats import RequestStats

    stats = RequestStats("r1", arrival_time=100.0, num_prompt_tokens=9, first_scheduled_time=100.25)
    stats.record_tokens(100.5, 1)
    stats.record_tokens(101.5, 2)
    stats.finish_time, stats.finish_reason = 101.5, "length"
    m = ServerMetrics(MODEL)
    m.observe_finished(stats)
    assert value(m, "deepserve:request_success_total", finish_reason="length") == 1
    assert value(m, "deepserve:prompt_tokens_total") == 9 and value(m, "deepserve:generation_tokens_total") == 3
    assert value(m, "deepserve:time_to_first_token_seconds_sum") == pytest.approx(0.5)
    assert value(m, "deepserve:request_queue_time_seconds_sum") == pytest.approx(0.25)
    assert value(m, "deepserve:e2e_request_latency_seconds_sum") == pytest.approx(1.5)
    assert value(m, "deepserve:time_per_output_token_seconds_sum") == pytest.approx(stats.time_per_output_token)


def test_unfinished_time_skips_e2e_and_tpot():
    m = ServerMetrics(MODEL)
    m.observe_finished(request(finish=None, reason="error"))
    assert histogram(m, "deepserve:e2e_request_latency_seconds")[2] == 0
    assert histogram(m, "deepserve:time_per_output_token_seconds")[2] == 0
    assert histogram(m, "deepserve:time_to_first_token_seconds")[2] == 1


# ---- rejections, registries ---------------------------------------------------------------------------


def test_rejections_by_reason_and_unknown_reason_refused():
    m = ServerMetrics(MODEL)
    m.count_rejection("rate_limit")
    m.count_rejection("rate_limit")
    m.count_rejection("draining")
    assert value(m, "deepserve:request_rejected_total", reason="rate_limit") == 2
    assert value(m, "deepserve:request_rejected_total", reason="draining") == 1
    with pytest.raises(ValueError):
        m.count_rejection("user-1234")


def test_own_registry_not_the_global_default():
    before = {f.name for f in REGISTRY.collect()}
    a, b = ServerMetrics("a"), ServerMetrics("b")
    a.observe_finished(request())
    assert a.registry is not REGISTRY and a.registry is not b.registry
    assert {f.name for f in REGISTRY.collect()} == before
    assert value_for(b, "deepserve:request_success_total") == 0


def value_for(m: ServerMetrics, name: str) -> float:
    return sum(s.value for s in samples(m)[name])


def test_given_registry_is_used_and_duplicates_refused():
    registry = CollectorRegistry()
    m = ServerMetrics(MODEL, registry=registry)
    assert m.registry is registry
    with pytest.raises(ValueError):
        ServerMetrics("other", registry=registry)  # the same names twice in one registry


def test_speculative_counters_grow_by_cumulative_increase():
    from types import SimpleNamespace

    from prometheus_client.parser import text_string_to_metric_families

    metrics = ServerMetrics("m")
    base = dict(num_running=0, num_waiting=0, kv_cache_usage=0.0, prefix_cache_hit_rate=0.0, num_preemptions=0)
    metrics.update_engine(SimpleNamespace(**base, spec_num_draft_tokens=10, spec_num_accepted_tokens=6))
    metrics.update_engine(SimpleNamespace(**base, spec_num_draft_tokens=14, spec_num_accepted_tokens=9))
    text = metrics.render()[0].decode()
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert values["deepserve:spec_decode_num_draft_tokens_total"] == 14
    assert values["deepserve:spec_decode_num_accepted_tokens_total"] == 9
