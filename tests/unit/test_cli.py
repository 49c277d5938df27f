"""`deepserve` command line: parsing, start-up errors (exit 2, no traceback), the chat REPL."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from deepserve import cli
from deepserve.engine.outputs import CompletionOutput, RequestOutput


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "deepserve", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_serve_defaults_bind_loopback():
    ns = cli.build_parser().parse_args(["serve"])
    assert (ns.host, ns.port, ns.model) == ("127.0.0.1", 8000, None)


def test_serve_engine_and_server_args():
    ns = cli.build_parser().parse_args(["serve", "--model", "/m", "--host", "0.0.0.0", "--port", "9001",
                                        "--max-model-len", "512", "--max-n", "4"])
    assert (ns.model, ns.host, ns.port, ns.max_model_len, ns.max_n) == ("/m", "0.0.0.0", 9001, 512, 4)


def test_generate_args():
    ns = cli.build_parser().parse_args(["generate", "--model", "m", "--max-tokens", "7", "--temperature", "0.5",
                                        "--chat", "hello there"])
    assert (ns.command, ns.prompt, ns.max_tokens, ns.temperature, ns.chat) == ("generate", "hello there", 7,
                                                                               0.5, True)
    assert cli.build_parser().parse_args(["generate", "x"]).temperature == 0.0


def test_chat_args():
    ns = cli.build_parser().parse_args(["chat", "--system", "be brief"])
    assert (ns.command, ns.system) == ("chat", "be brief")


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["serve", "--port", "eighty"], ["generate"]])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2


def test_missing_model_folder_is_a_clean_error():
    proc = run_cli("generate", "--model", "/nonexistent", "x")
    assert proc.returncode == 2, proc.stderr
    assert "/nonexistent" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_bad_sampling_value_is_a_clean_error():
    proc = run_cli("generate", "--temperature", "-1", "x")
    assert proc.returncode == 2
    assert "temperature" in proc.stderr and "Traceback" not in proc.stderr


def test_import_is_cheap_and_lazy():
    code = ("import sys, deepserve; heavy = 'torch' in sys.modules or 'fastapi' in sys.modules; "
            "from deepserve import SamplingParams; print(heavy, SamplingParams(max_tokens=3).max_tokens)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["False", "3"], proc.stderr


# ---- generate / chat over a fake in-process engine --------------------------------------------------


class FakeTokenizer:
    def apply_chat_template(self, messages, add_generation_prompt=True):
        return "|".join(f"{m['role']}:{m['content']}" for m in messages) + "|assistant:"

    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]


class FakeLLMEngine:
    """Replies "ok N" for the N-th request, one character per step (delta outputs)."""

    def __init__(self):
        self.tokenizer = FakeTokenizer()
        self.prompts: list = []
        self.pending: dict[str, list[str]] = {}

    def add_request(self, request_id, prompt, params):
        self.prompts.append(prompt)
        self.pending[request_id] = list(f"ok {len(self.prompts)}")

    def abort_request(self, request_id):
        self.pending.pop(request_id, None)

    def has_unfinished(self):
        return bool(self.pending)

    def step(self):
        outs = []
        for request_id, chars in list(self.pending.items()):
            done = len(chars) == 1
            comp = CompletionOutput(0, chars.pop(0), [1], None, "stop" if done else None)
            outs.append(RequestOutput(request_id, None, [1], [comp], finished=done))
            if done:
                del self.pending[request_id]
        return outs


@pytest.fixture
def fake_engine(monkeypatch):
    engine = FakeLLMEngine()
    monkeypatch.setattr(cli, "load_engine", lambda ns: (None, engine))
    return engine


def test_generate_prints_text(fake_engine, capsys):
    assert cli.main(["generate", "hello"]) == 0
    assert capsys.readouterr().out == "ok 1\n"
    assert fake_engine.prompts == ["hello"]


def test_generate_chat_uses_template(fake_engine, capsys):
    assert cli.main(["generate", "--chat", "--system", "sys", "hello"]) == 0
    expected = "system:sys|user:hello|assistant:"
    assert fake_engine.prompts == [[ord(c) for c in expected]]


def test_chat_repl_keeps_the_conversation(fake_engine):
    ns = cli.build_parser().parse_args(["chat"])
    out = io.StringIO()
    assert cli.cmd_chat(ns, stdin=io.StringIO("hi\n\nhow are you\n/exit\nnever read\n"), stdout=out) == 0
    assert out.getvalue() == "ok 1\nok 2\n"
    second = "".join(chr(c) for c in fake_engine.prompts[1])
    assert second == "user:hi|assistant:ok 1|user:how are you|assistant:"


def test_chat_repl_ends_on_eof(fake_engine):
    ns = cli.build_parser().parse_args(["chat"])
    out = io.StringIO()
    assert cli.cmd_chat(ns, stdin=io.StringIO("one\n"), stdout=out) == 0
    assert out.getvalue() == "ok 1\n"
