"""EngineCoreClient: the server side of the engine process (start, send, receive, watch, stop).

    client = EngineCoreClient(engine_config, eos_token_ids)     # starts nothing
    ready = await client.start()        # spawn the process, wait for EngineReady (or its error)
    client.send_add(...) / client.send_abort([...])               # non-blocking
    message = await client.recv()       # EngineOutputs; EngineDeadError once the engine is gone
    client.shutdown()                   # Shutdown, join, kill if needed, remove the ipc files

The engine runs in a process started with multiprocessing "spawn" (never fork: torch and CUDA
state do not survive a fork). Messages are msgpack (`messages.py`) over ZMQ PUSH/PULL on ipc://
sockets in a per-client temp dir, or loopback tcp (`EngineProcessConfig.transport`). A watchdog
task checks the process every `watchdog_interval_s`; an unexpected exit, or a fatal EngineError,
marks the client dead and runs the `on_death` callback once. Transport "inproc" runs the same
`CoreLoop` in a thread of this process (tests, offline use); `core_factory` then builds its core.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from typing import Any, Callable

import zmq
import zmq.asyncio

from deepserve.config import ConfigError, EngineConfig
from deepserve.engine.core_proc import build_core, run_engine_core, serve_core
from deepserve.engine.messages import (AbortRequests, AddRequest, EngineError, EngineOutputs, EngineReady,
                                       MessageCodec, Shutdown, encode_engine_config, params_to_msg)
from deepserve.loader.errors import LoadError
from deepserve.sampling_params import SamplingParams

logger = logging.getLogger("deepserve.engine")

TRANSPORTS = ("ipc", "tcp", "inproc")
_START_ERRORS: dict[str, type[Exception]] = {"LoadError": LoadError, "ConfigError": ConfigError}


class EngineDeadError(RuntimeError):
    """The engine stopped (it died, failed, or was shut down); no request can be served."""


class EngineStartError(RuntimeError):
    """The engine process did not become ready; `exitcode` is its exit status when it died."""

    def __init__(self, message: str, exitcode: int | None = None):
        super().__init__(message)
        self.exitcode = exitcode


@dataclass(frozen=True)
class EngineProcessConfig:
    transport: str = "ipc"  # ipc | tcp (loopback or `host`) | inproc (a thread, same process)
    host: str = "127.0.0.1"  # tcp only
    input_port: int = 0  # tcp only; 0: a free port
    output_port: int = 0
    ready_timeout_s: float = 600.0  # model load included
    shutdown_timeout_s: float = 10.0
    watchdog_interval_s: float = 0.2
    # The engine process runs this much "nicer" than the server, so that on a CPU-only machine,
    # where both compete for the cores, HTTP answers (429s, health, streamed chunks) are not
    # queued behind the model's compute. No effect on GPU throughput (the engine mostly waits).
    engine_niceness: int = 5

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise ValueError(f"engine transport {self.transport!r} is not one of {', '.join(TRANSPORTS)}")


class EngineCoreClient:
    def __init__(self, config: EngineConfig, eos_token_ids: tuple[int, ...] = (),
                 process: EngineProcessConfig = EngineProcessConfig(),
                 core_factory: Callable[[], Any] | None = None,
                 on_death: Callable[[EngineDeadError], None] | None = None):
        self.config = config
        self.eos_token_ids = tuple(eos_token_ids)
        self.process = process
        self.core_factory = core_factory
        self.on_death = on_death
        self.ready: EngineReady | None = None
        self.error: EngineDeadError | None = None
        self.codec = MessageCodec()
        self._worker: Any = None  # multiprocessing Process, or Thread for "inproc"
        self._context: zmq.asyncio.Context | None = None
        self._input: zmq.Socket | None = None
        self._output: zmq.asyncio.Socket | None = None
        self._tmpdir: str | None = None
        self._watchdog: asyncio.Task | None = None
        self._closing = False

    # ---- state -----------------------------------------------------------------------------------

    @property
    def is_dead(self) -> bool:
        return self.error is not None

    @property
    def is_running(self) -> bool:
        return self.ready is not None and not self.is_dead and not self._closing

    @property
    def pid(self) -> int | None:
        return getattr(self._worker, "pid", None)

    @property
    def ipc_dir(self) -> str | None:
        return self._tmpdir

    # ---- start -----------------------------------------------------------------------------------

    async def start(self) -> EngineReady:
        if self._worker is not None:
            raise RuntimeError("EngineCoreClient already started")
        input_address, output_address = self._bind()
        self._worker = self._launch(input_address, output_address)
        try:
            self.ready = await self._wait_ready()
        except BaseException:
            self.shutdown(timeout=0)
            raise
        self._watchdog = asyncio.create_task(self._watch(), name="deepserve-engine-watchdog")
        return self.ready

    def _bind(self) -> tuple[str, str]:
        self._context = zmq.asyncio.Context()
        sync_context = zmq.Context.shadow(self._context.underlying)
        self._input = sync_context.socket(zmq.PUSH)
        self._input.setsockopt(zmq.SNDHWM, 0)  # never block the event loop; the engine drains it
        self._output = self._context.socket(zmq.PULL)
        self._output.setsockopt(zmq.RCVHWM, 0)
        return self._bind_one(self._input, "input", self.process.input_port), \
            self._bind_one(self._output, "output", self.process.output_port)

    def _bind_one(self, socket: zmq.Socket, name: str, port: int) -> str:
        transport = self.process.transport
        if transport == "tcp":
            if port:
                socket.bind(f"tcp://{self.process.host}:{port}")
                return f"tcp://{self.process.host}:{port}"
            return f"tcp://{self.process.host}:{socket.bind_to_random_port(f'tcp://{self.process.host}')}"
        if transport == "inproc":
            address = f"inproc://deepserve-{id(self)}-{name}"
        else:
            self._tmpdir = self._tmpdir or tempfile.mkdtemp(prefix="deepserve-")
            address = f"ipc://{os.path.join(self._tmpdir, name)}"
        socket.bind(address)
        return address

    def _launch(self, input_address: str, output_address: str) -> Any:
        if self.process.transport == "inproc":
            return self._launch_thread(input_address, output_address)
        spawn = multiprocessing.get_context("spawn")
        args = (encode_engine_config(self.config), input_address, output_address, os.getpid(),
                self.eos_token_ids, self.process.engine_niceness)
        # daemon: multiprocessing terminates it at interpreter exit even if shutdown() was skipped
        worker = spawn.Process(target=run_engine_core, args=args, name="deepserve-engine", daemon=True)
        worker.start()
        return worker

    def _launch_thread(self, input_address: str, output_address: str) -> threading.Thread:
        context = zmq.Context.shadow(self._context.underlying)
        factory = self.core_factory or (lambda: build_core(self.config, self.eos_token_ids))
        thread = threading.Thread(target=run_inproc_core, args=(context, factory, input_address, output_address),
                                  name="deepserve-engine", daemon=True)
        thread.start()
        return thread

    async def _wait_ready(self) -> EngineReady:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.process.ready_timeout_s
        while loop.time() < deadline:
            alive = self._worker.is_alive()
            message = await self._poll_message(0 if not alive else self._watch_ms)
            if isinstance(message, EngineReady):
                return message
            if isinstance(message, EngineError):
                raise self._start_error(message)
            if message is None and not alive:
                raise EngineStartError(f"engine process exited with code {self._exitcode()} while starting",
                                       self._exitcode())
        raise EngineStartError(f"engine not ready within {self.process.ready_timeout_s} s")

    def _start_error(self, message: EngineError) -> Exception:
        self._join(self.process.shutdown_timeout_s)
        kind = _START_ERRORS.get(message.error_type)
        if kind is not None:
            return kind(message.message)
        return EngineStartError(f"engine failed to start: {message.error_type}: {message.message}",
                                self._exitcode())

    # ---- messages --------------------------------------------------------------------------------

    def send_add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 arrival_time: float = 0.0) -> None:
        self._send(AddRequest(request_id, list(prompt_token_ids), params_to_msg(params), arrival_time))

    def send_abort(self, request_ids: list[str]) -> None:
        if request_ids and self.is_running:
            self._send(AbortRequests(list(request_ids)))

    def _send(self, message: Any) -> None:
        if self.error is not None:
            raise self.error
        if not self.is_running:
            raise EngineDeadError("the engine is not running (not started, or shut down)")
        self._input.send(self.codec.encode(message), zmq.NOBLOCK)

    async def recv(self) -> EngineOutputs:
        """The next EngineOutputs; raises EngineDeadError (promptly) once the engine is gone."""
        while True:
            if self.error is not None:
                raise self.error
            if not self.is_running:
                raise EngineDeadError("the engine was shut down")
            message = await self._poll_message(self._watch_ms)
            if isinstance(message, EngineOutputs):
                return message
            if isinstance(message, EngineError):
                self.mark_dead(f"engine failed: {message.error_type}: {message.message}")

    async def _poll_message(self, timeout_ms: int) -> Any:
        if not await self._output.poll(timeout_ms):
            return None
        return self.codec.decode_engine(await self._output.recv(zmq.NOBLOCK))

    @property
    def _watch_ms(self) -> int:
        return max(1, int(self.process.watchdog_interval_s * 1000))

    # ---- liveness --------------------------------------------------------------------------------

    async def _watch(self) -> None:
        while not self._closing and self.error is None:
            if not self._worker.is_alive():
                self.mark_dead(f"engine process exited unexpectedly (exit code {self._exitcode()})")
                return
            await asyncio.sleep(self.process.watchdog_interval_s)

    def mark_dead(self, why: str) -> None:
        """Declare the engine gone (first call wins): `error` is set and `on_death` runs once."""
        if self.error is not None or self._closing:
            return
        logger.error("%s", why)
        self.error = EngineDeadError(why)
        if self.on_death is not None:
            self.on_death(self.error)

    def _exitcode(self) -> int | None:
        return getattr(self._worker, "exitcode", None)

    # ---- stop ------------------------------------------------------------------------------------

    def shutdown(self, timeout: float | None = None) -> None:
        """Ask the engine to stop, wait up to `timeout`, kill it if needed, clean up. Idempotent.

        Call it from the event loop's thread, or after that loop has stopped.
        """
        timeout = self.process.shutdown_timeout_s if timeout is None else timeout
        self._closing = True
        self._cancel_watchdog()
        if self._worker is not None and self._worker.is_alive() and self._input is not None:
            self._input.send(self.codec.encode(Shutdown()), zmq.NOBLOCK)
            self._join(timeout)
        self._kill()
        self._close_sockets()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    def _cancel_watchdog(self) -> None:
        if self._watchdog is not None and not self._watchdog.done():
            try:
                self._watchdog.cancel()
            except RuntimeError:  # its loop is closed already
                pass

    def _join(self, timeout: float) -> None:
        if self._worker is not None:
            self._worker.join(timeout)

    def _kill(self) -> None:
        if isinstance(self._worker, multiprocessing.process.BaseProcess) and self._worker.is_alive():
            logger.warning("engine process %s did not stop in time; killing it", self._worker.pid)
            self._worker.kill()
            self._worker.join(5)

    def _close_sockets(self) -> None:
        for socket in (self._input, self._output):
            if socket is not None and not socket.closed:
                socket.close(linger=0)
        if self._context is not None and not (self._worker is not None and self._worker.is_alive()):
            self._context.term()  # waits for the sockets of an in-process engine thread: only once it ended
        self._context = None


def run_inproc_core(context: zmq.Context, factory: Callable[[], Any], input_address: str,
                    output_address: str) -> None:
    """The engine loop in a thread of this process (transport "inproc"); same messages as a process."""
    serve_core(context, factory, input_address, output_address)
