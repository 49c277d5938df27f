"""AsyncLLM: the server's engine front, over an engine core in its own process.

    generate() --tokenize--> EngineCoreClient.send_add --ZMQ--> engine process (token ids only)
    output task: client.recv() -> OutputProcessor (detokenise, stop strings) -> per-request queues
    generate(): awaits its queue, yields RequestOutputs (DELTA: what is new since the last one)

    llm = AsyncLLM.from_config(engine_config)     # loads the tokenizer; starts nothing
    await llm.start()                             # spawns the engine, waits until it is loaded
    ...
    llm.shutdown()                                # from the loop's thread, or after the loop ended

Tokenisation, detokenisation and stop strings happen here; a stop string found here aborts the
request in the engine. When the engine dies, every in-flight generate() raises EngineDeadError,
`healthy` turns False, `dead` is set and `on_engine_death(error)` runs. `on_request_finished`
receives one `RequestStats` per finished, aborted or failed request (for server/metrics.py).
`EngineProcessConfig(transport="inproc")` runs the same engine loop in a thread of this process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from deepserve.config import EngineConfig
from deepserve.engine.core_client import EngineCoreClient, EngineDeadError, EngineProcessConfig
from deepserve.engine.messages import EngineOutputs, EngineStatsMsg, output_from_msg
from deepserve.engine.output_processor import OutputKind, OutputProcessor
from deepserve.engine.outputs import RequestOutput
from deepserve.engine.stats import RequestStats
from deepserve.sampling_params import SamplingParams

__all__ = ["AsyncLLM", "EngineDeadError"]

logger = logging.getLogger("deepserve.engine")


@dataclass
class _Stream:
    queue: asyncio.Queue  # RequestOutput | BaseException
    stats: RequestStats


class AsyncLLM:
    def __init__(self, config: EngineConfig, tokenizer: Any, client: EngineCoreClient):
        self.config = config
        self._tokenizer = tokenizer
        self.client = client
        self.client.on_death = self._on_engine_dead
        self.output_processor = OutputProcessor(getattr(tokenizer, "backend", tokenizer))
        self.dead = asyncio.Event()  # set when the engine died (not on a requested shutdown)
        self.on_engine_death: Callable[[EngineDeadError], None] | None = None
        self.on_request_finished: Callable[[RequestStats], None] | None = None
        self._streams: dict[str, _Stream] = {}
        self._stats = EngineStatsMsg()
        self._output_task: asyncio.Task | None = None
        self._stopped = False

    @classmethod
    def from_config(cls, config: EngineConfig, process: EngineProcessConfig = EngineProcessConfig(),
                    core_factory: Callable[[], Any] | None = None) -> "AsyncLLM":
        """Load the tokenizer (fast); the engine process starts only with `await start()`."""
        from deepserve.loader.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(config.model)
        eos = tuple(dict.fromkeys(tokenizer.eos_token_ids + config.model_config.eos_token_id))
        return cls(config, tokenizer, EngineCoreClient(config, eos, process, core_factory))

    # ---- facts the server needs ---------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.config.model_config.vocab_size

    @property
    def healthy(self) -> bool:
        return self.client.is_running and not self._stopped

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    def num_waiting_requests(self) -> int:
        """Requests admitted here but not running in the engine yet (queued there or in transit)."""
        return max(0, len(self._streams) - self._stats.num_running)

    def stats(self) -> EngineStatsMsg:
        """The latest engine snapshot (all zeros before the first step)."""
        return self._stats

    # ---- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Spawn the engine and wait until its model is loaded (LoadError / EngineStartError if not)."""
        await self.client.start()
        self._output_task = asyncio.create_task(self._pump_outputs(), name="deepserve-engine-outputs")

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop the engine (join, kill if needed) and fail the requests still in flight. Idempotent."""
        self._stopped = True
        if self._output_task is not None and not self._output_task.done():
            try:
                self._output_task.cancel()
            except RuntimeError:  # its loop is closed already
                pass
        self.client.shutdown(timeout)
        self._fail_all(EngineDeadError("the engine was shut down"), "abort")

    # ---- requests ---------------------------------------------------------------------------------

    async def generate(self, request_id: str, prompt: str | list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as they come; closing the iterator early aborts the request."""
        stream = self._admit(request_id, prompt, params)
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True  # already dropped everywhere
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request (client went away); its iterator gets nothing more. Idempotent."""
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return
        self.output_processor.abort_requests([request_id])
        self._finish_stats(stream, "abort")
        if self.client.is_running:
            self.client.send_abort([request_id])

    def _admit(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> _Stream:
        self._check_running()
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in flight")
        text, token_ids = (prompt, self._tokenizer.encode(prompt)) if isinstance(prompt, str) else (None, list(prompt))
        if not token_ids:
            raise ValueError(f"request {request_id!r} has an empty prompt")
        arrival = time.monotonic()
        self.output_processor.add_request(request_id, text, token_ids, params, OutputKind.DELTA)
        stream = _Stream(asyncio.Queue(), RequestStats(request_id, arrival, num_prompt_tokens=len(token_ids)))
        self._streams[request_id] = stream
        self.client.send_add(request_id, token_ids, params, arrival)
        return stream

    def _check_running(self) -> None:
        if self.client.error is not None:
            raise self.client.error
        if self._stopped:
            raise EngineDeadError("the engine was shut down")
        if not self.client.is_running:
            raise RuntimeError("AsyncLLM.start() was not awaited")

    # ---- outputs (one task) -------------------------------------------------------------------------

    async def _pump_outputs(self) -> None:
        try:
            while True:
                self._dispatch(await self.client.recv())
        except EngineDeadError as exc:
            self._on_engine_dead(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken output path is as bad as a dead engine
            logger.exception("engine output handling failed")
            self.client.mark_dead(f"engine output handling failed: {type(exc).__name__}: {exc}")

    def _dispatch(self, message: EngineOutputs) -> None:
        if message.stats is not None:
            self._stats = message.stats
        now = time.monotonic()
        outputs = []
        for out in message.outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # aborted here already
            if out.error is not None:
                self._fail(out.request_id, ValueError(out.error), "error")
                continue
            self._record(stream.stats, out, now)
            outputs.append(output_from_msg(out))
        self._deliver(self.output_processor.process(outputs), now)

    @staticmethod
    def _record(stats: RequestStats, out: Any, now: float) -> None:
        if out.first_scheduled_time is not None and stats.first_scheduled_time is None:
            stats.first_scheduled_time = out.first_scheduled_time
        stats.num_cached_tokens = out.num_cached_tokens or stats.num_cached_tokens
        stats.record_tokens(now, len(out.new_token_ids))

    def _deliver(self, processed: Any, now: float) -> None:
        if processed.requests_to_abort and self.client.is_running:
            self.client.send_abort(processed.requests_to_abort)
        for output in processed.request_outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            if output.finished:
                del self._streams[output.request_id]
                self._finish_stats(stream, output.outputs[0].finish_reason, now)
            stream.queue.put_nowait(output)

    # ---- endings -------------------------------------------------------------------------------------

    def _fail(self, request_id: str, error: BaseException, reason: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return
        self.output_processor.abort_requests([request_id])
        self._finish_stats(stream, reason)
        stream.queue.put_nowait(error)

    def _fail_all(self, error: BaseException, reason: str) -> None:
        for request_id in list(self._streams):
            self._fail(request_id, error, reason)

    def _on_engine_dead(self, error: EngineDeadError) -> None:
        if self.dead.is_set() or self._stopped:
            return
        self.dead.set()
        self._fail_all(error, "error")
        if self.on_engine_death is not None:
            self.on_engine_death(error)

    def _finish_stats(self, stream: _Stream, reason: str | None, now: float | None = None) -> None:
        stats = stream.stats
        stats.finish_time = time.monotonic() if now is None else now
        stats.finish_reason = reason
        if self.on_request_finished is not None:
            try:
                self.on_request_finished(stats)
            except Exception:  # noqa: BLE001 - metrics must never break serving
                logger.exception("on_request_finished failed")
