"""SERVING_CONTRACT.md "Security": API keys, path tricks, loopback bind, CORS, what the logs hold."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx
import pytest

from deepserve.server import auth
from tests.e2e.conftest import MODEL_NAME

KEY = "sk-test-4f1c9a7e"
ENV_KEY = "sk-env-0b9d22"
WRONG = "sk-wrong-77aa13"
ORIGIN = "http://good.example"
SERVER_ARGS = ["--api-key", KEY, "--log-format", "json"]
PROMPT = "ZEBRA-QUOKKA-PROMPT-93 tell me"

PROTECTED = [("GET", "/v1/models", None), ("GET", "/version", None), ("GET", "/v1/nothing", None),
             ("POST", "/v1/chat/completions", {"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}],
                                               "max_tokens": 2}),
             ("POST", "/v1/completions", {"model": MODEL_NAME, "prompt": "x", "max_tokens": 2}),
             ("POST", "/tokenize", {"prompt": "x"}), ("POST", "/detokenize", {"tokens": [5]})]
PATH_TRICKS = ["//v1/models", "/v1/%2e%2e/metrics", "/v1/../v1/models", "/v1/models/", "/%2Fv1/models",
               "/v1%2Fmodels", "/health/../v1/models", "/metrics/../v1/models", "/HEALTH", "/health/",
               "/./v1/models", "/v1/models;health", "/v1/models%00"]


@pytest.fixture(scope="module")
def env_server(serve_process):
    """Key from DEEPSERVE_API_KEY, text logs, CORS for one origin."""
    return serve_process(["--allowed-origins", ORIGIN], env={"DEEPSERVE_API_KEY": ENV_KEY})


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def raw_get(url: str, path: str, headers: str = "") -> int:
    """Status of a GET with `path` sent byte for byte (no client-side normalisation)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n".encode())
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return int(reply.split(b" ", 2)[1])


@pytest.mark.parametrize("method,path,body", PROTECTED)
def test_protected_routes_need_the_key(server, method, path, body):
    for headers in ({}, bearer(WRONG), {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        resp = httpx.request(method, f"{server.url}{path}", json=body, headers=headers, timeout=30)
        assert resp.status_code == 401, (headers, resp.text)
        assert resp.json()["error"]["code"] == "invalid_api_key"
    resp = httpx.request(method, f"{server.url}{path}", json=body, headers=bearer(KEY), timeout=60)
    assert resp.status_code != 401 and resp.status_code < 500


@pytest.mark.parametrize("path", ["/health", "/ready", "/metrics"])
def test_open_routes(server, path):
    assert httpx.get(f"{server.url}{path}").status_code == 200


@pytest.mark.parametrize("path", PATH_TRICKS)
def test_path_tricks_do_not_bypass_the_key(server, path):
    assert raw_get(server.url, path) in (401, 400, 404)
    assert raw_get(server.url, path) != 200


def test_openai_client_authentication_error(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=WRONG, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    good = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in good.models.list()] == [MODEL_NAME]


def test_keys_compared_in_constant_time(monkeypatch):
    calls = []

    def recording(a, b):
        calls.append((a, b))
        return a == b

    monkeypatch.setattr(auth.hmac, "compare_digest", recording)
    assert auth.key_matches(b"k2", [b"k1", b"k2", b"k3"])
    assert len(calls) == 3  # every key is compared: no early exit that leaks which one matched
    assert not auth.key_matches(b"nope", [b"k1"])


def test_api_key_from_environment(env_server):
    assert httpx.get(f"{env_server.url}/v1/models").status_code == 401
    assert httpx.get(f"{env_server.url}/v1/models", headers=bearer(ENV_KEY)).status_code == 200


def _listening_addresses(pid: int, port: int) -> set[str]:
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


def test_binds_loopback_by_default(server):
    port = int(server.url.rsplit(":", 1)[1])
    assert _listening_addresses(server.pid, port) == {"0100007F"}  # 127.0.0.1


def test_cors_off_by_default_on_with_allowed_origins(server, env_server):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    resp = httpx.options(f"{server.url}/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in resp.headers
    resp = httpx.get(f"{server.url}/v1/models", headers={"Origin": ORIGIN, **bearer(KEY)})
    assert "access-control-allow-origin" not in resp.headers
    resp = httpx.options(f"{env_server.url}/v1/chat/completions", headers=preflight)
    assert resp.headers.get("access-control-allow-origin") == ORIGIN
    resp = httpx.get(f"{env_server.url}/v1/models", headers={"Origin": ORIGIN, **bearer(ENV_KEY)})
    assert resp.headers.get("access-control-allow-origin") == ORIGIN
    resp = httpx.get(f"{env_server.url}/v1/models", headers={"Origin": "http://evil.example", **bearer(ENV_KEY)})
    assert "access-control-allow-origin" not in resp.headers


def _exercise(url: str, key: str) -> list[str]:
    """Requests carrying the prompt and keys; returns the output texts."""
    outputs = []
    with httpx.Client(base_url=url, timeout=60) as http:
        http.get("/v1/models", headers=bearer(WRONG))
        for stream in (False, True):
            body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 12,
                    "temperature": 0, "stream": stream, "user": "user-QUOKKA"}
            resp = http.post("/v1/chat/completions", json=body, headers=bearer(key))
            assert resp.status_code == 200
            if not stream:
                outputs.append(resp.json()["choices"][0]["message"]["content"])
        bad = {"model": MODEL_NAME, "messages": [{"role": "user", "content": PROMPT}], "temperature": 9}
        assert http.post("/v1/chat/completions", json=bad, headers=bearer(key)).status_code == 400
    return outputs


@pytest.mark.parametrize("which", ["json", "text"])
def test_logs_hold_no_prompt_output_or_key(server, env_server, which):
    target, key = (server, KEY) if which == "json" else (env_server, ENV_KEY)
    outputs = _exercise(target.url, key)
    log = target.log()
    assert "deepserve.access" in log or "POST /v1/chat/completions" in log  # the log is really captured
    for secret in [key, WRONG, PROMPT, "ZEBRA-QUOKKA", "user-QUOKKA"] + [o for o in outputs if len(o) >= 6]:
        assert secret not in log
    if which == "json":
        access = [json.loads(line) for line in log.splitlines() if line.startswith("{") and "deepserve.access" in line]
        assert access and all(entry["request_id"] and entry["status"] for entry in access)


def test_tls_with_certfile_and_keyfile(serve_process, tmp_path):
    """--ssl-certfile/--ssl-keyfile serve HTTPS; plain HTTP on that port gets no answer."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a self-signed certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    server = serve_process(["--ssl-certfile", str(cert), "--ssl-keyfile", str(key)])
    assert server.url.startswith("https://")
    import ssl

    reply = httpx.post(f"{server.url}/v1/completions", verify=ssl.create_default_context(cafile=str(cert)), timeout=30,
                       json={"model": MODEL_NAME, "prompt": "Paris is", "max_tokens": 3})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
    with pytest.raises(httpx.HTTPError):
        httpx.get(server.url.replace("https://", "http://") + "/health", timeout=5)
