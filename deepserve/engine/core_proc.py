"""The engine-core process: token ids in, token ids out, over ZMQ with msgpack messages.

    server (EngineCoreClient)                       engine process (run_engine_core)
      PUSH --AddRequest/AbortRequests/Shutdown-->  PULL  (input address)
      PULL <--EngineReady/EngineOutputs/Error---   PUSH  (output address)

`run_engine_core` loads the model, builds `EngineCore`, sends `EngineReady`, then runs `CoreLoop`:
block on the input socket while idle, poll it without waiting while there is work, apply adds
and aborts, `step()`, send the outputs with a stats snapshot. A request that `add_request`
refuses (ValueError) finishes alone with an `error`; any other exception sends a fatal
`EngineError` and the process exits 1 (a failed load too, so the parent learns why). The process
ignores SIGINT (Ctrl-C reaches the whole process group; the server decides when the engine stops)
and exits by itself when its parent dies, so no orphan outlives the server.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

import zmq

from deepserve.engine.messages import (AbortRequests, AddRequest, EngineError, EngineOutputs, EngineReady,
                                       EngineStatsMsg, MessageCodec, MessageError, RequestOutputMsg, Shutdown,
                                       decode_engine_config, output_to_msg, params_from_msg)

logger = logging.getLogger("deepserve.engine")

IDLE_POLL_MS = 500  # how long an idle loop blocks on the input socket before looking again
SEND_LINGER_MS = 2000  # how long a closing socket may still flush (e.g. the last EngineError)
ORPHAN_CHECK_S = 0.5


class CoreLoop:
    """Drives one engine core from messages until Shutdown (or the input says stop)."""

    def __init__(self, core: Any, inbox: zmq.Socket, outbox: zmq.Socket, codec: MessageCodec | None = None):
        self.core = core  # EngineCore, or anything with its add/abort/step/has_unfinished/stats API
        self.inbox = inbox
        self.outbox = outbox
        self.codec = codec or MessageCodec()
        self.running = True
        self._pending: list[RequestOutputMsg] = []  # refused / aborted requests, sent with the next message
        self._unscheduled: dict[str, float | None] = {}  # added, no output yet -> first time it ran
        self._step_prompt_tokens = 0
        self._step_generation_tokens = 0

    @property
    def in_flight(self) -> list[str]:
        return list(self._unscheduled)

    def run(self) -> None:
        while self.running:
            received = self._receive(block=not self.core.has_unfinished())
            for message in received:
                self._apply(message)
            if not self.running:
                return
            if self.core.has_unfinished() or received:
                self._step()

    def _receive(self, block: bool) -> list[Any]:
        """Every message waiting now; when `block`, first wait up to IDLE_POLL_MS for one."""
        if not self.inbox.poll(IDLE_POLL_MS if block else 0):
            return []
        messages = []
        while True:
            try:
                data = self.inbox.recv(zmq.NOBLOCK)
            except zmq.Again:
                return messages
            try:
                messages.append(self.codec.decode_client(data))
            except MessageError as exc:
                logger.error("dropping an invalid message from the server: %s", exc)

    def _apply(self, message: Any) -> None:
        if isinstance(message, AddRequest):
            self._add(message)
        elif isinstance(message, AbortRequests):
            self._abort(message.request_ids)
        elif isinstance(message, Shutdown):
            self.running = False

    def _add(self, message: AddRequest) -> None:
        try:
            params = params_from_msg(message.params)
            self.core.add_request(message.request_id, list(message.prompt_token_ids), params)
        except (ValueError, TypeError) as exc:
            self._pending.append(RequestOutputMsg(message.request_id, finish_reason="abort", error=str(exc)))
            return
        self._unscheduled[message.request_id] = None

    def _abort(self, request_ids: list[str]) -> None:
        for out in self.core.abort_requests(list(request_ids)) or []:
            self._pending.append(output_to_msg(out))
        for request_id in request_ids:
            self._unscheduled.pop(request_id, None)

    def _step(self) -> None:
        started = time.monotonic()
        outputs = self.core.step() if self.core.has_unfinished() else []
        self._mark_scheduled(started, [out.request_id for out in outputs])
        messages = self._pending + [self._to_msg(out) for out in outputs]
        self._pending = []
        self._send(EngineOutputs(messages, self._stats()))

    def _mark_scheduled(self, when: float, output_ids: list[str]) -> None:
        running = getattr(getattr(self.core, "scheduler", None), "running", ())
        for request_id in [seq.request_id for seq in running] + output_ids:
            if request_id in self._unscheduled and self._unscheduled[request_id] is None:
                self._unscheduled[request_id] = when

    def _to_msg(self, out: Any) -> RequestOutputMsg:
        first = out.request_id in self._unscheduled
        scheduled = self._unscheduled.pop(out.request_id, None)
        if first:
            self._step_prompt_tokens += out.num_prompt_tokens
        self._step_generation_tokens += len(out.new_token_ids)
        return output_to_msg(out, scheduled)

    def _stats(self) -> EngineStatsMsg:
        s = self.core.stats()
        block_manager = getattr(self.core, "block_manager", None)
        cache = block_manager.stats() if block_manager is not None else None
        msg = EngineStatsMsg(
            num_running=s.num_running, num_waiting=s.num_waiting, kv_cache_usage=s.kv_cache_usage,
            prefix_cache_hit_rate=s.prefix_cache_hit_rate, num_preemptions=s.num_preemptions,
            prefix_queried_tokens=getattr(cache, "prefix_queried_tokens", 0),
            prefix_hit_tokens=getattr(cache, "prefix_hit_tokens", 0),
            step_prompt_tokens=self._step_prompt_tokens, step_generation_tokens=self._step_generation_tokens,
            spec_num_draft_tokens=getattr(s, "spec_num_draft_tokens", 0),
            spec_num_accepted_tokens=getattr(s, "spec_num_accepted_tokens", 0),
            timestamp=time.monotonic())
        self._step_prompt_tokens = self._step_generation_tokens = 0
        return msg

    def _send(self, message: Any) -> None:
        self.outbox.send(self.codec.encode(message))


# ---- the process entry ---------------------------------------------------------------------------


def run_engine_core(config_bytes: bytes, input_address: str, output_address: str, parent_pid: int,
                    eos_token_ids: tuple[int, ...] = (), niceness: int = 0) -> None:
    """Entry of the spawned engine process (all arguments are plain builtins)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if niceness:
        os.nice(niceness)  # below the server's priority: see EngineProcessConfig.engine_niceness
    watch_parent(parent_pid, ipc_paths([input_address, output_address]))
    code = serve_core(zmq.Context(), lambda: build_core(decode_engine_config(config_bytes), eos_token_ids),
                      input_address, output_address)
    if code:
        sys.exit(code)


def serve_core(context: zmq.Context, build: Callable[[], Any], input_address: str, output_address: str) -> int:
    """Connect, build the core, announce it, loop, close; the exit code (0: clean Shutdown)."""
    inbox, outbox = connect_sockets(context, input_address, output_address)
    try:
        return load_and_loop(build, inbox, outbox, MessageCodec())
    finally:
        inbox.close(linger=0)
        outbox.close(linger=SEND_LINGER_MS)


def connect_sockets(context: zmq.Context, input_address: str, output_address: str) -> tuple[zmq.Socket, zmq.Socket]:
    inbox = context.socket(zmq.PULL)
    inbox.connect(input_address)
    outbox = context.socket(zmq.PUSH)
    outbox.connect(output_address)
    return inbox, outbox


def load_and_loop(build: Callable[[], Any], inbox: zmq.Socket, outbox: zmq.Socket, codec: MessageCodec) -> int:
    try:
        core = build()
    except BaseException as exc:  # noqa: BLE001 - the parent must learn why the load failed
        logger.exception("engine failed to load")
        outbox.send(codec.encode(error_message(exc, [])))
        return 1
    outbox.send(codec.encode(ready_message(core)))
    return run_loop(CoreLoop(core, inbox, outbox, codec))


def run_loop(loop: CoreLoop) -> int:
    try:
        loop.run()
    except BaseException as exc:  # noqa: BLE001 - any failure ends the engine and must be reported
        logger.exception("engine core failed")
        loop.outbox.send(loop.codec.encode(error_message(exc, loop.in_flight)))
        return 1
    return 0


def build_core(config: Any, eos_token_ids: tuple[int, ...]) -> Any:
    from deepserve.engine.engine_core import EngineCore
    from deepserve.loader.model_loader import load_model

    model = load_model(config, progress=False)
    return EngineCore(config, model, tuple(eos_token_ids))


def ready_message(core: Any) -> EngineReady:
    config = core.config
    return EngineReady(vocab_size=config.model_config.vocab_size, max_model_len=config.max_model_len,
                       num_kv_blocks=core.block_manager.num_blocks, block_size=config.cache.block_size,
                       pid=os.getpid())


def error_message(exc: BaseException, request_ids: list[str]) -> EngineError:
    return EngineError(message=str(exc) or type(exc).__name__, error_type=type(exc).__name__,
                       request_ids=request_ids, fatal=True)


def ipc_paths(addresses: list[str]) -> list[str]:
    return [address.removeprefix("ipc://") for address in addresses if address.startswith("ipc://")]


def remove_socket_files(paths: list[str]) -> None:
    """Remove the ipc socket files and their folder, which a killed parent could not clean up."""
    for path in paths:
        with contextlib.suppress(OSError):
            os.unlink(path)
    for folder in {os.path.dirname(path) for path in paths}:
        with contextlib.suppress(OSError):
            os.rmdir(folder)  # only if empty


def watch_parent(parent_pid: int, socket_files: list[str] = (),
                 exit_now: Callable[[int], None] = os._exit) -> threading.Thread:
    """A daemon thread that ends this process as soon as its parent is gone (re-parented)."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(ORPHAN_CHECK_S)
        logger.error("the server process %d is gone; the engine process exits", parent_pid)
        remove_socket_files(list(socket_files))
        exit_now(1)

    thread = threading.Thread(target=watch, name="deepserve-parent-watch", daemon=True)
    thread.start()
    return thread
