"""The `deepserve` command: serve | generate | chat.

    deepserve serve    [--host 127.0.0.1] [--port 8000] [engine args]   OpenAI-compatible server
    deepserve generate [--max-tokens N] [--temperature T] [--chat] [engine args] "prompt"
    deepserve chat     [--max-tokens N] [--temperature T] [--system S] [engine args]

Engine args (--model, --dtype, --max-model-len, ...) come from `EngineArgs.add_cli_args`.
A start-up error (model not found, bad config, bad argument value) prints one line to stderr and
exits with status 2, never a traceback. Heavy imports (torch, fastapi) happen inside commands.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

from deepserve.engine.args import EngineArgs
from deepserve.server.config import ServerConfig

EXIT_USAGE = 2
CHAT_EXIT = ("/exit", "/quit")


class StartupError(Exception):
    """A start-up problem already phrased for the user."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepserve", description="Run DeepSeek-family LLMs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{serve,generate,chat,bench,eval,quantize}")
    _add_serve(sub.add_parser("serve", help="run the OpenAI-compatible HTTP server"))
    gen = sub.add_parser("generate", help="complete one prompt and print the text")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message (chat template)")
    _add_sampling(gen)
    chat = sub.add_parser("chat", help="interactive chat on stdin/stdout (/exit or EOF quits)")
    _add_sampling(chat)
    from deepserve.bench import cli as bench_cli

    bench_cli.add_bench_parser(sub)
    _add_eval(sub.add_parser("eval", help="accuracy gate: perplexity and top-1 agreement against a reference"))
    _add_quantize(sub.add_parser("quantize", help="write an INT8 checkpoint folder (W8A8 or W8A16)"))
    return parser


def _add_serve(parser: argparse.ArgumentParser) -> None:
    d = ServerConfig()
    EngineArgs.add_cli_args(parser)
    g = parser.add_argument_group("server")
    g.add_argument("--host", default=d.host, help=f"address to bind (default {d.host})")
    g.add_argument("--port", type=int, default=d.port)
    g.add_argument("--api-key", action="append", default=None,
                   help="require 'Authorization: Bearer KEY' (repeatable; default: DEEPSERVE_API_KEY)")
    g.add_argument("--ssl-certfile", default=None)
    g.add_argument("--ssl-keyfile", default=None)
    g.add_argument("--allowed-origins", default="", help="comma-separated CORS origins (default: CORS off)")
    g.add_argument("--max-n", type=int, default=d.max_n, help="largest `n` a request may ask for")
    g.add_argument("--max-waiting-requests", type=int, default=None, help="queue bound; beyond it 429")
    g.add_argument("--max-waiting-tokens", type=int, default=None, help="bound on queued prompt tokens; beyond it 429")
    g.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes, help="body size limit (413)")
    g.add_argument("--max-header-bytes", type=int, default=d.max_header_bytes, help="request head limit (431)")
    g.add_argument("--drain-timeout", type=float, default=d.drain_timeout_s,
                   help="seconds in-flight requests may run after SIGTERM")
    g.add_argument("--chat-template", default=None, help="chat template file, or the template text itself")
    g.add_argument("--reasoning-parser", default=None, help="e.g. deepseek-r1: <think> text -> reasoning_content")
    g.add_argument("--tool-call-parser", default=None, help="e.g. deepseek-v3: tool calls -> tool_calls")
    g.add_argument("--metrics-port", type=int, default=None, help="serve /metrics on this port instead")
    g.add_argument("--log-format", default=d.log_format, choices=["text", "json"])
    g.add_argument("--log-level", default=None, help="debug | info | warning | error (default: DEEPSERVE_LOG_LEVEL)")


def _add_sampling(parser: argparse.ArgumentParser) -> None:
    EngineArgs.add_cli_args(parser)
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--system", default=None, help="system message for chat")


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    command = {"serve": cmd_serve, "generate": cmd_generate, "chat": cmd_chat, "bench": cmd_bench, "eval": cmd_eval,
               "quantize": cmd_quantize}[ns.command]
    try:
        return command(ns)
    except StartupError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 130


def cmd_bench(ns: argparse.Namespace) -> int:
    from deepserve.bench import cli as bench_cli

    return bench_cli.main(ns)


def _add_eval(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="candidate: model folder, .gguf file or bundled name")
    parser.add_argument("--quantization", default=None, help="candidate's quantization, e.g. int8")
    parser.add_argument("--quantize-lm-head", action="store_true",
                        help="candidate's LM head as int8 W8A16 (as `serve --quantize-lm-head`)")
    parser.add_argument("--reference", default=None, help="reference model (default: --model, unquantized)")
    parser.add_argument("--text", default=None, help="held-out text file (default: the shipped eval text)")
    parser.add_argument("--min-top1", type=float, default=0.97, help="least top-1 agreement that passes")
    parser.add_argument("--max-ppl-increase", type=float, default=0.02, help="largest relative perplexity rise")
    parser.add_argument("--max-tokens", type=int, default=None, help="score at most this many text tokens")
    parser.add_argument("--window", type=int, default=512, help="tokens per scoring window")


def cmd_eval(ns: argparse.Namespace) -> int:
    """Print the accuracy table; exit 0 when the candidate passes the gate, 1 when it fails."""
    from deepserve.quant.eval import ModelSpec, format_report, gate

    candidate = ModelSpec(ns.model, ns.quantization, ns.quantize_lm_head)
    reference = ModelSpec(ns.reference if ns.reference is not None else ns.model)
    report = _guarded(lambda: gate(reference, candidate, text_file=ns.text, min_top1=ns.min_top1,
                                   max_ppl_increase=ns.max_ppl_increase, force=True, window=ns.window,
                                   max_tokens=ns.max_tokens))
    print(format_report(report, reference.describe(), candidate.describe()))
    return 0 if report.passed else 1


def _fail(message: str) -> int:
    print(f"deepserve: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _startup_errors() -> tuple[type[BaseException], ...]:
    from deepserve.config import ConfigError
    from deepserve.loader.errors import LoadError

    return (LoadError, ConfigError, ValueError, OSError)


def _guarded(build: Callable[[], Any], extra: tuple[type[BaseException], ...] = ()) -> Any:
    """Run a start-up step; known start-up errors become a StartupError (message only)."""
    errors = _startup_errors() + extra
    try:
        return build()
    except errors as exc:
        raise StartupError(str(exc) or type(exc).__name__) from None


def load_engine(ns: argparse.Namespace) -> tuple[Any, Any]:
    """(EngineConfig, in-process LLMEngine): resolves the model first, then loads it."""
    config = _guarded(EngineArgs.from_cli_args(ns).create_engine_config)
    from deepserve.engine.llm_engine import LLMEngine

    # The loader's progress bar writes to stdout: keep it out of piped output.
    return config, _guarded(lambda: LLMEngine.from_config(config, progress=sys.stdout.isatty()))


# ---- serve ----------------------------------------------------------------------------------------


def cmd_serve(ns: argparse.Namespace) -> int:
    from deepserve import envs
    from deepserve.engine.async_llm import AsyncLLM
    from deepserve.server.logging import configure_logging
    from deepserve.server.serve import run_server

    log_level = ns.log_level or _guarded(envs.log_level)
    _guarded(envs.pdl_enabled)  # a bad DEEPSERVE_PDL fails here, not at the first kernel launch
    configure_logging(log_level, ns.log_format)
    server = _guarded(lambda: server_config(ns, log_level.lower(), envs.api_key()))
    config = _guarded(EngineArgs.from_cli_args(ns).create_engine_config)
    engine = _guarded(lambda: AsyncLLM.from_config(config))
    _guarded(lambda: run_server(engine, config.served_model_name or config.model, server), _engine_start_errors())
    return 0


def server_config(ns: argparse.Namespace, log_level: str, env_key: str | None) -> ServerConfig:
    """ServerConfig from the serve flags; --api-key wins over DEEPSERVE_API_KEY."""
    keys = tuple(ns.api_key) if ns.api_key else ((env_key,) if env_key else ())
    _check_parsers(ns.reasoning_parser, ns.tool_call_parser)
    return ServerConfig(
        host=ns.host, port=ns.port, api_keys=keys, ssl_certfile=ns.ssl_certfile, ssl_keyfile=ns.ssl_keyfile,
        allowed_origins=tuple(o.strip() for o in ns.allowed_origins.split(",") if o.strip()),
        max_n=ns.max_n, max_waiting_requests=ns.max_waiting_requests, max_waiting_tokens=ns.max_waiting_tokens,
        max_request_bytes=ns.max_request_bytes, max_header_bytes=ns.max_header_bytes,
        drain_timeout_s=ns.drain_timeout, chat_template=read_chat_template(ns.chat_template),
        reasoning_parser=ns.reasoning_parser, tool_call_parser=ns.tool_call_parser, metrics_port=ns.metrics_port,
        log_level=log_level, log_format=ns.log_format)


def read_chat_template(value: str | None) -> str | None:
    """--chat-template: a file's text, or the argument itself when it is template text."""
    from pathlib import Path

    if value is None:
        return None
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError(f"--chat-template {value}: no such file (and not template text)")
    return path.read_text(encoding="utf-8")


def _check_parsers(reasoning: str | None, tools: str | None) -> None:
    if reasoning is None and tools is None:
        return
    from deepserve.server.parsers import get_reasoning_parser, get_tool_parser

    if reasoning is not None:
        get_reasoning_parser(reasoning)
    if tools is not None:
        get_tool_parser(tools)


def _engine_start_errors() -> tuple[type[BaseException], ...]:
    try:
        from deepserve.engine.core_client import EngineStartError
    except ImportError:
        return ()
    return (EngineStartError,)


# ---- generate / chat ------------------------------------------------------------------------------


def sampling_params(ns: argparse.Namespace) -> Any:
    from deepserve.sampling_params import SamplingParams

    return _guarded(lambda: SamplingParams(max_tokens=ns.max_tokens, temperature=ns.temperature,
                                           top_p=ns.top_p, top_k=ns.top_k))


def cmd_generate(ns: argparse.Namespace) -> int:
    params = sampling_params(ns)
    _, engine = load_engine(ns)
    if ns.chat:
        prompt: str | list[int] = _guarded(lambda: chat_prompt(engine.tokenizer, _system(ns) + [_user(ns.prompt)]))
    else:
        prompt = ns.prompt
    stream_text(engine, prompt, params, sys.stdout)
    sys.stdout.write("\n")
    return 0


def cmd_chat(ns: argparse.Namespace, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    params = sampling_params(ns)
    _, engine = load_engine(ns)
    messages = _system(ns)
    show_prompt = stdin.isatty()
    while (line := _read_line(stdin, stdout, show_prompt)) is not None:
        if not line:
            continue
        messages.append(_user(line))
        prompt = _guarded(lambda: chat_prompt(engine.tokenizer, messages))
        reply = stream_text(engine, prompt, params, stdout)
        stdout.write("\n")
        messages.append({"role": "assistant", "content": reply})
    return 0


def _read_line(stdin: TextIO, stdout: TextIO, show_prompt: bool) -> str | None:
    """The next user line (stripped), or None on EOF / an exit command."""
    if show_prompt:
        stdout.write(">>> ")
        stdout.flush()
    raw = stdin.readline()
    if not raw or raw.strip() in CHAT_EXIT:
        return None
    return raw.strip()


def _system(ns: argparse.Namespace) -> list[dict[str, str]]:
    return [{"role": "system", "content": ns.system}] if ns.system else []


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the conversation rendered by the model's chat template, ready for a reply."""
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    if isinstance(rendered, str):
        return list(tokenizer.encode(rendered, add_special_tokens=False))
    return list(rendered)


def stream_text(engine: Any, prompt: str | list[int], params: Any, out: TextIO) -> str:
    """Run one request to the end on an in-process LLMEngine, writing text as it comes."""
    request_id = f"cli-{uuid.uuid4().hex}"
    engine.add_request(request_id, prompt, params)
    pieces: list[str] = []
    try:
        while engine.has_unfinished():
            for output in engine.step():
                if output.request_id == request_id and output.outputs[0].text:
                    pieces.append(output.outputs[0].text)
                    out.write(pieces[-1])
                    out.flush()
    except KeyboardInterrupt:
        engine.abort_request(request_id)
        raise
    return "".join(pieces)


# ---- quantize -------------------------------------------------------------------------------------


def _add_quantize(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="float checkpoint folder or bundled name (default: SmolLM2-135M)")
    parser.add_argument("--out", required=True, help="output folder (HF layout, loadable with --model OUT)")
    from deepserve.quant import WRITABLE_METHODS

    parser.add_argument("--method", default="int8", choices=WRITABLE_METHODS,
                        help="int8: W8A8 (weights per channel, activations per token); int8-weight-only: W8A16; "
                             "fp8: e4m3 W8A8 (weights per channel, rounded to nearest; served on FP8 GPUs, "
                             "emulated on CPU)")
    sym = parser.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="asymmetric", action="store_false", help="no zero points (default)")
    sym.add_argument("--asymmetric", dest="asymmetric", action="store_true",
                     help="zero points per channel (W8A16 only; rounded to nearest)")
    parser.set_defaults(asymmetric=False)
    parser.add_argument("--calibration", default=None,
                        help="calibration text for smoothing and GPTQ (default: the shipped calibration text; "
                             "'none': round each weight to nearest, no calibration)")
    parser.add_argument("--rotation", default=None, choices=["hadamard", "none"],
                        help="W8A8: rotate each linear's input by 64-wide Hadamard blocks at run time (default)")
    parser.add_argument("--smoothing-alpha", type=float, default=None,
                        help="W8A8: SmoothQuant migration strength folded into the weights (default 0.5)")
    parser.add_argument("--no-smoothing", action="store_true", help="W8A8: no SmoothQuant smoothing")
    parser.add_argument("--rounding", default=None, choices=["gptq", "rtn"],
                        help="with calibration: GPTQ (default) or round-to-nearest")
    parser.add_argument("--eval-text", default=None, help="accuracy gate's held-out text (default: the shipped one)")
    parser.add_argument("--min-top1", type=float, default=0.97,
                        help="accuracy gate: least top-1 agreement with the float model")
    parser.add_argument("--max-ppl-increase", type=float, default=0.02,
                        help="accuracy gate: largest relative perplexity rise over the float model")
    parser.add_argument("--force", action="store_true", help="keep the output even if the accuracy gate fails")
    parser.add_argument("--skip-gate", action="store_true", help="do not run the accuracy gate")


def _calibration_file(ns: argparse.Namespace) -> Path | None:
    """--calibration as a path (None for 'none'); refused when it overlaps the gate's text."""
    from deepserve.quant.eval import check_held_out, read_eval_text
    from deepserve.quant.writer import DEFAULT_CALIBRATION

    if ns.calibration is not None and ns.calibration.lower() == "none":
        return None
    path = Path(ns.calibration) if ns.calibration is not None else DEFAULT_CALIBRATION
    if not path.is_file():
        raise ValueError(f"--calibration {path}: no such file")
    check_held_out(path.read_text(encoding="utf-8"), read_eval_text(ns.eval_text))
    return path


def cmd_quantize(ns: argparse.Namespace) -> int:
    """Quantise into OUT.partial, run the accuracy gate against the input, and only then move it to
    OUT: a checkpoint that fails the gate is never written (unless --force)."""
    import shutil

    from deepserve.quant.writer import quantize_checkpoint

    out = Path(ns.out)
    if out.exists():
        return _fail(f"{out} already exists; choose another --out")
    if ns.method == "fp8":
        given = _recipe_options_given(ns)
        if given:
            return _fail(f"--method fp8 rounds each weight to nearest, without calibration: {', '.join(given)} "
                         f"does not apply")
    calibration = None if ns.method == "fp8" else _guarded(lambda: _calibration_file(ns))
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    alpha = 0.5 if ns.smoothing_alpha is None else ns.smoothing_alpha
    summary = _guarded(lambda: quantize_checkpoint(
        ns.model, str(partial), ns.method, ns.asymmetric, progress=sys.stderr.isatty(), calibration=calibration,
        rotation=ns.rotation or "hadamard", smoothing_alpha=None if ns.no_smoothing else alpha,
        rounding=ns.rounding or "gptq"))
    recipe = summary.recipe
    print(f"quantised: {summary.method} (smoothing {recipe.smoothing_alpha}, rounding {recipe.rounding}, "
          f"calibration {recipe.calibration}), {summary.quantized} quantised tensors, {summary.kept} kept, "
          f"{summary.bytes_in / 2**20:.1f} MiB -> {summary.bytes_out / 2**20:.1f} MiB", file=sys.stderr)
    if ns.skip_gate:
        print("accuracy gate NOT run (--skip-gate): the checkpoint is unchecked", file=sys.stderr)
    elif not _passes_gate(ns, partial):
        shutil.rmtree(partial, ignore_errors=True)
        return EXIT_USAGE
    partial.rename(out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _recipe_options_given(ns: argparse.Namespace) -> list[str]:
    """The calibrated-recipe options set on the command line (fp8 takes none of them)."""
    given = [("--calibration", ns.calibration is not None and ns.calibration.lower() != "none"),
             ("--rotation", ns.rotation is not None), ("--smoothing-alpha", ns.smoothing_alpha is not None),
             ("--no-smoothing", ns.no_smoothing), ("--rounding", ns.rounding is not None)]
    return [flag for flag, on in given if on]


def _passes_gate(ns: argparse.Namespace, candidate: Path) -> bool:
    from deepserve.quant import eval as quant_eval

    try:
        report = quant_eval.gate(ns.model, str(candidate), text_file=ns.eval_text, min_top1=ns.min_top1,
                                 max_ppl_increase=ns.max_ppl_increase, force=ns.force)
    except quant_eval.AccuracyGateError as exc:
        _fail(f"{exc}; nothing written (--force accepts it anyway)")
        return False
    except ValueError as exc:  # the candidate cannot run here (fp8 on a GPU below sm_89, say)
        _fail(f"the accuracy gate could not run the candidate: {exc}; nothing written (--skip-gate writes it "
              f"unchecked; CUDA_VISIBLE_DEVICES= gates it on the CPU)")
        return False
    verdict = "passed" if report.passed else "FAILED (kept: --force)"
    print(f"accuracy gate {verdict}: {report.summary()}", file=sys.stderr)
    return True

