"""Real `deepserve serve` processes on loopback, shared per test module.

    tiny_model                      session: a tiny random Llama checkpoint folder (~1 s to build)
    serve_process(args, env=...)    factory: start a server, wait for /ready, stop it at teardown
    server                          module: ONE server with the module's SERVER_ARGS (a list)

A `ServerProcess` keeps the server's stderr in a file (`.log()`), knows its base URL, and records
what /health and /ready answered before the model was loaded (`.seen_while_loading`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.tiny_checkpoints import make_tiny_llama

START_DEADLINE_S = 120
STOP_DEADLINE_S = 20
MODEL_NAME = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_pids(pid: int) -> list[int]:
    """Direct and indirect children of `pid` (from /proc)."""
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return children + [g for c in children for g in child_pids(c)]


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    url: str
    log_path: Path
    seen_while_loading: set[tuple[str, int]] = field(default_factory=set)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, deadline_s: float = START_DEADLINE_S) -> None:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            if self._probe():
                return
            time.sleep(0.2)
        raise AssertionError(f"server not ready within {deadline_s} s:\n{self.log()[-4000:]}")

    def _probe(self) -> bool:
        try:
            health = httpx.get(f"{self.url}/health", timeout=2, verify=False).status_code
            ready = httpx.get(f"{self.url}/ready", timeout=2, verify=False).status_code
        except httpx.HTTPError:
            return False
        if ready != 200:
            self.seen_while_loading |= {("health", health), ("ready", ready)}
        return ready == 200

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_DEADLINE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in child_pids(self.proc.pid):
            os.kill(pid, signal.SIGKILL)
        return self.proc.returncode


def start_server(model: Path, args: list[str], log_dir: Path, env: dict | None = None) -> ServerProcess:
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    full_env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    full_env.pop("DEEPSERVE_API_KEY", None)
    full_env.update(env or {})
    cmd = [sys.executable, "-m", "deepserve", "serve", "--model", str(model), "--served-model-name", MODEL_NAME,
           "--port", str(port), "--max-model-len", "512", *args]
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    scheme = "https" if "--ssl-certfile" in args else "http"
    server = ServerProcess(proc, f"{scheme}://127.0.0.1:{port}", log_path)
    try:
        server.wait_ready()
    except AssertionError:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama", max_position_embeddings=1024)


@pytest.fixture(scope="module")
def serve_process(tiny_model, tmp_path_factory):
    started: list[ServerProcess] = []
    log_dir = tmp_path_factory.mktemp("serve")

    def start(args: list[str] = (), env: dict | None = None) -> ServerProcess:
        started.append(start_server(tiny_model, list(args), log_dir, env))
        return started[-1]

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def server(request, serve_process) -> ServerProcess:
    return serve_process(getattr(request.module, "SERVER_ARGS", []), getattr(request.module, "SERVER_ENV", None))
