"""`deepserve bench serve` against a fake OpenAI-compatible streaming server with known delays."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from deepserve.bench import cli as bench_cli
from deepserve.bench import serve_report
from deepserve.bench.serve import (BenchRun, RequestResult, ServeBenchConfig, _StreamTrace, arrival_offsets,
                                   build_specs, run_benchmark)

MODEL = "fake-model"
JITTER = 0.06  # seconds of scheduling slack allowed on a busy 2-core machine


@dataclass
class Behaviour:
    ttft_s: float = 0.1  # before the first token; "slow" prompts wait slow_ttft_s instead
    itl_s: float = 0.02
    slow_ttft_s: float = 0.4
    loading_polls: int = 0  # GET /v1/models answers 503 this many times first
    in_flight: int = 0
    max_in_flight: int = 0
    arrivals: list[float] = field(default_factory=list)
    bodies: list[dict] = field(default_factory=list)


def prompt_text(body: dict) -> str:
    if "messages" in body:
        return body["messages"][-1]["content"]
    return body["prompt"] if isinstance(body["prompt"], str) else ""


def fake_app(b: Behaviour) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        if b.loading_polls > 0:
            b.loading_polls -= 1
            return JSONResponse({"error": {"message": "loading"}}, status_code=503, headers={"Retry-After": "0"})
        return {"object": "list", "data": [{"id": MODEL, "object": "model"}]}

    async def stream(body: dict, chat: bool):
        b.in_flight += 1
        b.max_in_flight = max(b.max_in_flight, b.in_flight)
        try:
            slow = prompt_text(body).startswith("slow")
            await asyncio.sleep(b.slow_ttft_s if slow else b.ttft_s)
            n = body["max_tokens"]
            for i in range(n):
                if i:
                    await asyncio.sleep(b.itl_s)
                choice = {"index": 0, "delta": {"content": f" t{i}"}} if chat else {"index": 0, "text": f" t{i}"}
                yield f"data: {json.dumps({'choices': [choice]})}\n\n"
            if body.get("stream_options", {}).get("include_usage"):
                yield f"data: {json.dumps({'choices': [], 'usage': {'prompt_tokens': 7, 'completion_tokens': n}})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            b.in_flight -= 1

    async def handle(request: Request, chat: bool):
        body = await request.json()
        b.arrivals.append(time.perf_counter())
        b.bodies.append(body)
        if body["model"] != MODEL:
            return JSONResponse({"error": {"message": "no such model"}}, status_code=404)
        return StreamingResponse(stream(body, chat), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle(request, chat=True)

    return app


class FakeServer:
    def __init__(self):
        self.behaviour = Behaviour()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.sock = sock
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(fake_app(self.behaviour), log_level="error", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "fake server did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture(scope="module")
def server():
    s = FakeServer()
    s.start()
    yield s
    s.stop()


@pytest.fixture
def fake(server):
    server.behaviour.__init__()  # fresh delays and counters for every test
    return server


def bench(fake, **kw) -> BenchRun:
    config = ServeBenchConfig(base_url=fake.url, **({"input_len": 8, "output_len": 6} | kw))
    return asyncio.run(run_benchmark(config))


def median(values):
    return sorted(values)[len(values) // 2]


# ---- measured figures against the known delays ---------------------------------------------------------


def test_ttft_itl_tpot_e2e_match_server_delays(fake):
    run = bench(fake, num_requests=4, concurrency=2, output_len=6)
    assert run.model == MODEL and len(run.results) == 4
    b = fake.behaviour
    for r in run.results:
        assert r.ok and r.output_tokens == 6 and r.prompt_tokens == 7
        assert b.ttft_s - 0.005 <= r.ttft_s <= b.ttft_s + JITTER
        assert len(r.itl_s) == 5
        assert b.itl_s - 0.005 <= median(r.itl_s) <= b.itl_s + JITTER
        assert b.itl_s - 0.005 <= r.tpot_s <= b.itl_s + JITTER / 2
        assert r.e2e_s == pytest.approx(r.ttft_s + sum(r.itl_s), abs=JITTER)
    s = serve_report.summarize(run, ServeBenchConfig(base_url=fake.url))
    assert b.ttft_s * 1000 - 5 <= s["ttft_ms_p50"] <= s["ttft_ms_p90"] <= s["ttft_ms_p99"] <= (b.ttft_s + JITTER) * 1000
    assert b.itl_s * 1000 - 5 <= s["itl_ms_p50"] <= (b.itl_s + JITTER) * 1000
    expected_e2e = b.ttft_s + 5 * b.itl_s
    assert expected_e2e * 1000 - 10 <= s["e2e_ms_p50"] <= (expected_e2e + JITTER * 2) * 1000
    assert s["completed"] == 4 and s["failed"] == 0 and s["total_output_tokens"] == 24


def test_request_body_asks_for_usage_and_ignore_eos(fake):
    bench(fake, num_requests=1, output_len=3)
    (body,) = fake.behaviour.bodies
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["max_tokens"] == 3 and body["model"] == MODEL
    assert len(body["prompt"].split()) == 8


def test_waits_while_the_model_loads(fake):
    fake.behaviour.loading_polls = 3
    run = bench(fake, num_requests=1, output_len=2)
    assert fake.behaviour.loading_polls == 0 and run.results[0].ok
    fake.behaviour.loading_polls = 1000
    with pytest.raises(httpx.HTTPStatusError):
        bench(fake, num_requests=1, ready_timeout_s=0.2)


def test_token_id_prompts(fake):
    bench(fake, num_requests=2, prompt_kind="token-ids", vocab_size=50, input_len=5, output_len=2)
    for body in fake.behaviour.bodies:
        assert len(body["prompt"]) == 5 and all(0 <= t < 50 for t in body["prompt"])


def test_chat_endpoint(fake):
    run = bench(fake, num_requests=2, endpoint="chat", output_len=3)
    assert all(r.ok and r.output_tokens == 3 for r in run.results)
    assert fake.behaviour.bodies[0]["messages"][0]["role"] == "user"


def test_goodput_counts_requests_within_slos(fake, tmp_path):
    # Fast TTFT 0.05 s and slow 1.2 s around a 0.6 s bound (and ITL 0.02 s under a 0.5 s TPOT bound):
    # half a second of slack each way, so a scheduling stall of a loaded 2-core CI machine cannot move
    # a request across a bound (with 0.1 / 0.4 s around 0.25 s, one such run saw every request miss).
    fake.behaviour.ttft_s, fake.behaviour.slow_ttft_s = 0.05, 1.2
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "slow one"}\n{"prompt": "fast one"}\n{"prompt": "fast two"}\n'
                    '{"prompt": "fast three", "max_tokens": 1}\n')
    config = ServeBenchConfig(base_url=fake.url, num_requests=8, prompt_file=str(path), output_len=4,
                              ttft_slo_s=0.6, tpot_slo_s=0.5, concurrency=8)
    run = asyncio.run(run_benchmark(config))
    s = serve_report.summarize(run, config)
    assert s["completed"] == 8 and s["slo_attainment"] == 0.75  # the two "slow" requests miss TTFT
    assert s["goodput_req_s"] == pytest.approx(6 / s["wall_s"], rel=0.01)
    assert sorted(r.output_tokens for r in run.results) == [1, 1] + [4] * 6
    tight = serve_report.summarize(run, ServeBenchConfig(base_url=fake.url, ttft_slo_s=10, tpot_slo_s=0.001))
    assert tight["slo_attainment"] == 0.25  # only the one-token requests have no TPOT to miss


def test_fallback_to_chunk_count_without_usage():
    trace = _StreamTrace(start=10.0)
    for i, t in enumerate([10.5, 10.6, 10.8]):
        trace.feed(f'data: {json.dumps({"choices": [{"index": 0, "text": str(i)}]})}', t)
    trace.feed('data: {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}', 10.9)
    trace.feed("data: [DONE]", 10.9)
    r = trace.result(end=11.0)
    assert r.ok and r.output_tokens == 3 and r.ttft_s == pytest.approx(0.5)
    assert r.itl_s == pytest.approx([0.1, 0.2]) and r.e2e_s == pytest.approx(1.0)
    assert r.tpot_s == pytest.approx(0.25)


def test_stream_error_chunk_and_http_error_are_failures(fake):
    trace = _StreamTrace(0.0)
    trace.feed('data: {"error": {"message": "engine died"}}', 1.0)
    assert trace.result(2.0) == RequestResult(False, "engine died")
    run = bench(fake, num_requests=3, model="other-model")
    s = serve_report.summarize(run, ServeBenchConfig(base_url=fake.url))
    assert s["failed"] == 3 and s["completed"] == 0 and s["ttft_ms_p50"] is None
    assert list(s["errors"].values()) == [3] and "HTTP 404" in next(iter(s["errors"]))


# ---- load shapes ---------------------------------------------------------------------------------


def test_concurrency_is_never_exceeded(fake):
    fake.behaviour.ttft_s = 0.05
    run = bench(fake, num_requests=12, concurrency=3, output_len=3)
    assert all(r.ok for r in run.results)
    assert fake.behaviour.max_in_flight == 3 and run.max_in_flight == 3


def test_poisson_arrivals_follow_the_seeded_schedule(fake):
    config = ServeBenchConfig(base_url=fake.url, num_requests=30, request_rate=25.0, seed=7, input_len=4,
                              output_len=2)
    rng = random.Random(7)
    build_specs(config, rng)
    expected = arrival_offsets(30, 25.0, rng)
    run = asyncio.run(run_benchmark(config))
    sent = [r.send_time_s for r in run.results]
    assert all(e - 0.002 <= s <= e + JITTER for s, e in zip(sent, expected))
    arrivals = fake.behaviour.arrivals
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert sum(gaps) / len(gaps) == pytest.approx(expected[-1] / 29, abs=0.02)


def test_arrival_offsets_are_exponential_with_the_rate():
    offsets = arrival_offsets(20000, 4.0, random.Random(0))
    gaps = [b - a for a, b in zip(offsets, offsets[1:])]
    assert offsets[0] == 0 and sum(gaps) / len(gaps) == pytest.approx(0.25, rel=0.03)
    assert arrival_offsets(5, float("inf"), random.Random(0)) == [0.0] * 5


def test_time_limit_cuts_the_run(fake):
    fake.behaviour.itl_s = 0.2
    start = time.perf_counter()
    run = bench(fake, num_requests=20, concurrency=2, output_len=10, time_limit_s=0.8)
    assert time.perf_counter() - start < 3
    assert run.num_incomplete > 0 and len(run.results) + run.num_incomplete == 20
    assert 0.8 <= run.wall_s < 0.8 + 0.5


# ---- report ----------------------------------------------------------------------------------------


def test_percentile_interpolates_like_numpy():
    assert serve_report.percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert serve_report.percentile([float(i) for i in range(1, 11)], 90) == pytest.approx(9.1)
    assert serve_report.percentile([5.0], 99) == 5.0 and serve_report.percentile([], 50) is None


SCHEMA = {"workload": str, "date": str, "base_url": str, "model": str, "endpoint": str, "num_requests": int,
          "completed": int, "failed": int, "incomplete": int, "request_rate": (str, float), "concurrency": (int, type(None)),
          "max_in_flight": int, "input_len": int, "output_len": int, "seed": int, "wall_s": float,
          "request_throughput": float, "output_tok_s": float, "total_tok_s": float, "total_input_tokens": int,
          "total_output_tokens": int, "ttft_slo_ms": float, "tpot_slo_ms": float, "goodput_req_s": float,
          "slo_attainment": float, "errors": dict,
          **{f"{k}_ms_{s}": float for k in ("ttft", "tpot", "itl", "e2e") for s in ("mean", "p50", "p90", "p99")}}


def test_summary_figures_and_json_schema(tmp_path):
    ok = [RequestResult(True, None, 0.0, 0.1 * (i + 1), [0.02] * 3, 0.1 * (i + 1) + 0.06, 4, 10) for i in range(4)]
    run = BenchRun(ok + [RequestResult(False, "boom")], wall_s=2.0, max_in_flight=2, num_incomplete=1, model="m")
    config = ServeBenchConfig(num_requests=6, request_rate=3.0, concurrency=2, ttft_slo_s=0.25)
    s = serve_report.summarize(run, config)
    assert set(s) == set(SCHEMA)
    assert all(isinstance(s[k], t) for k, t in SCHEMA.items()), {k: type(s[k]) for k in SCHEMA}
    assert (s["completed"], s["failed"], s["incomplete"], s["errors"]) == (4, 1, 1, {"boom": 1})
    assert s["request_throughput"] == 2.0 and s["output_tok_s"] == 8.0 and s["total_tok_s"] == 28.0
    assert s["goodput_req_s"] == 1.0 and s["slo_attainment"] == 0.5
    assert s["tpot_ms_p50"] == pytest.approx(20.0) and s["itl_ms_p99"] == pytest.approx(20.0)
    out = tmp_path / "r.jsonl"
    serve_report.write_result(s, str(out), {"run_id": "x"})
    serve_report.write_result(s, str(out))
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 2 and lines[0]["run_id"] == "x" and lines[1]["ttft_ms_p50"] == s["ttft_ms_p50"]


def test_config_validation():
    with pytest.raises(ValueError):
        ServeBenchConfig(endpoint="chat", prompt_kind="token-ids")
    with pytest.raises(ValueError):
        ServeBenchConfig(request_rate=0)
    with pytest.raises(ValueError):
        ServeBenchConfig(concurrency=0)


# ---- command line ----------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deepserve")
    bench_cli.add_bench_parser(p.add_subparsers(dest="command", required=True))
    return p


def test_cli_defaults_are_loopback_and_slos():
    ns = parser().parse_args(["bench", "serve"])
    assert (ns.command, ns.bench_command, ns.base_url) == ("bench", "serve", "http://127.0.0.1:8000")
    assert (ns.ttft_slo, ns.tpot_slo, ns.request_rate, ns.concurrency) == (2.0, 0.05, float("inf"), None)


def test_cli_runs_and_writes_json(fake, tmp_path, capsys):
    out = tmp_path / "result.json"
    ns = parser().parse_args(["bench", "serve", "--base-url", fake.url, "--num-requests", "3", "--concurrency", "2",
                              "--input-len", "4", "--output-len", "3", "--result-file", str(out),
                              "--metadata", "run_id=abc", "--ttft-slo", "1", "--tpot-slo", "0.5"])
    assert bench_cli.main(ns) == 0
    record = json.loads(out.read_text())
    assert set(SCHEMA) <= set(record) and record["run_id"] == "abc" and record["completed"] == 3
    assert record["slo_attainment"] == 1.0
    assert "TTFT" in capsys.readouterr().err


def test_cli_unreachable_server_is_one_line_error(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before the run: nothing listens there
    ns = parser().parse_args(["bench", "serve", "--base-url", f"http://127.0.0.1:{port}", "--num-requests", "1"])
    assert bench_cli.main(ns) == 2
    assert capsys.readouterr().err.startswith("deepserve bench: error:")
