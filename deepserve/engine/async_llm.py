"""AsyncLLM: an asyncio front for an in-process `LLMEngine`, stepped by one background thread.

    server coroutine --add/abort--> inbox (deque, under a Condition) --> engine thread
    engine thread: drain inbox -> engine.step() -> outputs --call_soon_threadsafe--> asyncio.Queue
    generate(): awaits its queue, yields RequestOutputs (delta: what is new since the last one)

Only the engine thread touches the engine after `start()`. It sleeps on the condition while it has
no work (no busy spin). If `step()` raises, every in-flight request receives the error as
`EngineDeadError`, `healthy` turns False and new requests are refused.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator, NamedTuple

from deepserve.engine.outputs import RequestOutput
from deepserve.sampling_params import SamplingParams

logger = logging.getLogger("deepserve.engine")


class EngineDeadError(RuntimeError):
    """The engine loop stopped (it raised, or it was shut down); no request can be served."""


class _Add(NamedTuple):
    request_id: str
    prompt: str | list[int]
    params: SamplingParams


class _Abort(NamedTuple):
    request_id: str


@dataclass
class _Stream:
    """Where one request's outputs go: an asyncio.Queue owned by the caller's event loop."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: RequestOutput | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody is listening any more
            pass


class AsyncLLM:
    def __init__(self, engine: Any, config: Any = None):
        self.engine = engine  # LLMEngine (or anything with its add_request/abort_request/step API)
        self.config = config  # EngineConfig, for max_model_len / vocab size / model name
        self._cond = threading.Condition()
        self._inbox: collections.deque[_Add | _Abort] = collections.deque()
        self._streams: dict[str, _Stream] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._error: BaseException | None = None

    @classmethod
    def from_config(cls, config: Any) -> "AsyncLLM":
        """Load the model and tokenizer (slow); the loop starts only with `start()`."""
        from deepserve.engine.llm_engine import LLMEngine

        return cls(LLMEngine.from_config(config), config)

    # ---- facts the server needs ---------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int | None:
        return None if self.config is None else self.config.max_model_len

    @property
    def vocab_size(self) -> int | None:
        return None if self.config is None else self.config.model_config.vocab_size

    @property
    def healthy(self) -> bool:
        return self._error is None and self._thread is not None and self._thread.is_alive()

    @property
    def num_in_flight(self) -> int:
        with self._cond:
            return len(self._streams)

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("AsyncLLM already started")
        self._thread = threading.Thread(target=self._run, name="deepserve-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stop the loop, fail the requests still in flight, and join the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._fail_all(EngineDeadError("the engine was shut down"))

    # ---- requests (called from the event loop) --------------------------------------------------

    async def generate(self, request_id: str, prompt: str | list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as they come; closing the iterator early aborts the request."""
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._register(request_id, stream)
        finished = False
        try:
            self._post(_Add(request_id, prompt, params))
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine already dropped it
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request (client went away); its iterator gets nothing more. Idempotent."""
        with self._cond:
            if self._streams.pop(request_id, None) is None:
                return
            self._inbox.append(_Abort(request_id))
            self._cond.notify()

    def _register(self, request_id: str, stream: _Stream) -> None:
        with self._cond:
            if self._error is not None or self._stopping:
                raise EngineDeadError(f"the engine is not running ({self._error or 'shut down'})")
            if self._thread is None:
                raise RuntimeError("AsyncLLM.start() was not called")
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in flight")
            self._streams[request_id] = stream

    def _post(self, command: _Add | _Abort) -> None:
        with self._cond:
            self._inbox.append(command)
            self._cond.notify()

    # ---- the engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._wait_for_work():
                self._apply(self._drain())
                if self.engine.has_unfinished():
                    self._dispatch(self.engine.step())
        except BaseException as exc:  # noqa: BLE001 - any failure kills the loop and must be reported
            logger.exception("engine loop failed; failing all in-flight requests")
            with self._cond:
                self._error = exc
            self._fail_all(EngineDeadError(f"engine failed: {type(exc).__name__}: {exc}"))

    def _wait_for_work(self) -> bool:
        """Sleep until there is a command or unfinished work; False when asked to stop."""
        with self._cond:
            while not self._stopping and not self._inbox and not self.engine.has_unfinished():
                self._cond.wait()
            return not self._stopping

    def _drain(self) -> list[_Add | _Abort]:
        with self._cond:
            commands = list(self._inbox)
            self._inbox.clear()
        return commands

    def _apply(self, commands: list[_Add | _Abort]) -> None:
        for command in commands:
            if isinstance(command, _Abort):
                self.engine.abort_request(command.request_id)
            elif self._stream(command.request_id) is not None:  # not aborted meanwhile
                self._add(command)

    def _add(self, command: _Add) -> None:
        try:
            self.engine.add_request(command.request_id, command.prompt, command.params)
        except (ValueError, TypeError) as exc:  # this request is bad; the engine is fine
            stream = self._pop_stream(command.request_id)
            if stream is not None:
                stream.put(exc)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._pop_stream(output.request_id) if output.finished else self._stream(output.request_id)
            if stream is not None:
                stream.put(output)

    def _stream(self, request_id: str) -> _Stream | None:
        with self._cond:
            return self._streams.get(request_id)

    def _pop_stream(self, request_id: str) -> _Stream | None:
        with self._cond:
            return self._streams.pop(request_id, None)

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            stream.put(error)
