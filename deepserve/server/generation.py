"""Running one API request on the engine: its jobs, their merged outputs, the body or SSE stream.

An API request becomes one engine request per (prompt, sample), "<id>-<choice index>". Their
delta outputs are merged as they come and folded into one `ChoiceState` per choice. A client that
goes away aborts every job still running (closing the engine's iterators). `stop_generations()`
of the server state ends them too: while draining each unfinished choice ends with
finish_reason "abort"; when the engine died the request fails with a 503.
A job counts as waiting in `Admission` from its submission to its first output; before that, the
request's reservation (taken at admission) holds its place, until the jobs enter or the response ends.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from deepserve.engine.outputs import RequestOutput
from deepserve.sampling_params import SamplingParams
from deepserve.server import responses as R
from deepserve.server.errors import APIError
from deepserve.server.lifecycle import STOP, Phase, ServerState, WaitTicket

DONE = "data: [DONE]\n\n"


@dataclass(frozen=True)
class Prompt:
    text: str | None
    token_ids: list[int]


@dataclass(frozen=True)
class Job:
    """One engine request: sample `index` of the API request (prompt `prompt_index`)."""

    index: int
    prompt_index: int
    request_id: str
    prompt: Prompt
    params: SamplingParams


class ClientGone(Exception):
    pass


class Stopped(Exception):
    """The server ended the generation (drain timeout or engine death)."""


def engine_error(exc: BaseException) -> APIError:
    """An engine-side failure: the engine rejected the request (400) or is gone (503)."""
    if isinstance(exc, (ValueError, TypeError)):
        return APIError.invalid(None, str(exc))
    return APIError(503, f"engine is not running ({type(exc).__name__})", type="server_error", code="engine_dead")


class Generation:
    def __init__(self, state: ServerState, model_name: str):
        self.state = state
        self.model_name = model_name

    async def respond(self, request: Request, jobs: list[Job], fmt: R.ResponseFormatter, base: str,
                      stream: bool, include_usage: bool, reservation: WaitTicket | None = None) -> Response:
        """Takes over `reservation`: given back when the jobs enter the queue or the response ends."""
        head = R.envelope(fmt.chunk_object if stream else fmt.object, base, self.model_name)
        if stream:
            events = self._events(jobs, fmt, head, include_usage, reservation)
            return ReservedStreamingResponse(reservation, events, media_type="text/event-stream",
                                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            choices = await until_disconnected(request, self._collect(jobs, fmt, reservation))
        except ClientGone:
            return Response(status_code=499)
        finally:
            if reservation is not None:
                reservation.leave()
        body = head | {"choices": [fmt.choice(i, choices[i]) for i in sorted(choices)],
                       "usage": usage(jobs, choices)}
        return JSONResponse(body)

    async def _collect(self, jobs: list[Job], fmt: R.ResponseFormatter,
                       reservation: WaitTicket | None) -> dict[int, R.ChoiceState]:
        choices = {job.index: fmt.new_state() for job in jobs}
        try:
            async with aclosing(self._merge(jobs, reservation)) as merged:
                async for job, output in merged:
                    choices[job.index].add(output)
        except Stopped:
            self._end_stopped(choices)
        except APIError:
            raise
        except Exception as exc:  # noqa: BLE001 - from the engine
            raise engine_error(exc) from None
        return choices

    def _end_stopped(self, choices: dict[int, R.ChoiceState]) -> list[tuple[int, Any]]:
        """Unfinished choices end with "abort" (draining); a dead engine is an error instead."""
        if self.state.phase is Phase.DEAD:
            raise engine_error(RuntimeError("engine died"))
        return [(i, c.abort()) for i, c in choices.items() if c.finish_reason is None]

    async def _events(self, jobs: list[Job], fmt: R.ResponseFormatter, head: dict,
                      include_usage: bool, reservation: WaitTicket | None) -> AsyncIterator[str]:
        choices = {job.index: fmt.new_state() for job in jobs}
        try:
            for job in jobs:
                first = fmt.first_chunk_choice(job.index)
                if first is not None:
                    yield sse(head | {"choices": [first]})
            async for index, delta in self._stream_deltas(jobs, choices, reservation):
                for choice in fmt.chunk_choices(index, delta, choices[index]):
                    yield sse(head | {"choices": [choice]})
            if include_usage:
                yield sse(head | {"choices": [], "usage": usage(jobs, choices)})
        except APIError as exc:
            yield sse(exc.body())
        except Exception as exc:  # noqa: BLE001 - from the engine
            yield sse(engine_error(exc).body())
        yield DONE

    async def _stream_deltas(self, jobs: list[Job], choices: dict[int, R.ChoiceState],
                             reservation: WaitTicket | None) -> AsyncIterator[tuple]:
        try:
            async with aclosing(self._merge(jobs, reservation)) as merged:
                async for job, output in merged:
                    yield job.index, choices[job.index].add(output)
        except Stopped:
            for item in self._end_stopped(choices):
                yield item

    async def _merge(self, jobs: list[Job],
                     reservation: WaitTicket | None) -> AsyncIterator[tuple[Job, RequestOutput]]:
        """Outputs of all jobs as they come; closing this aborts every job still running."""
        queue: asyncio.Queue = asyncio.Queue()
        tickets = {job.index: self.state.admission.enter(len(job.prompt.token_ids)) for job in jobs}
        if reservation is not None:
            reservation.leave()  # the jobs hold the request's place now
        tasks = [asyncio.create_task(self._pump(job, queue)) for job in jobs]
        self.state.streams.add(queue)
        try:
            running = len(tasks)
            while running:
                item = await queue.get()
                if item is STOP:
                    raise Stopped()
                job, output = item
                tickets[job.index].leave()
                if isinstance(output, BaseException):
                    raise output
                if output is None:
                    running -= 1
                else:
                    yield job, output
        finally:
            self.state.streams.discard(queue)
            for task, ticket in zip(tasks, tickets.values()):
                task.cancel()
                ticket.leave()

    async def _pump(self, job: Job, queue: asyncio.Queue) -> None:
        try:
            async for output in self.state.engine.generate(job.request_id, job.prompt.token_ids, job.params):
                queue.put_nowait((job, output))
            queue.put_nowait((job, None))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((job, exc))


class ReservedStreamingResponse(StreamingResponse):
    """A stream that gives its request's queue reservation back when it ends, even if it ended
    (client gone) before the stream's first line, when the jobs never entered the queue."""

    def __init__(self, reservation: WaitTicket | None, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.reservation = reservation

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self.reservation is not None:
                self.reservation.leave()


# ---- helpers ------------------------------------------------------------------------------------


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def usage(jobs: list[Job], choices: dict[int, R.ChoiceState]) -> dict:
    """Token counts of one API request: each prompt counts once, however many samples it has."""
    firsts = {job.prompt_index: job for job in reversed(jobs)}
    return R.usage_body(
        prompt_tokens=sum(len(job.prompt.token_ids) for job in firsts.values()),
        completion_tokens=sum(c.num_tokens for c in choices.values()),
        cached_tokens=sum(choices[job.index].num_cached_tokens for job in firsts.values()),
    )


async def until_disconnected(request: Request, work: Any) -> Any:
    """Await `work`; if the client disconnects first, cancel it (aborting its requests)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientGone()
    finally:
        task.cancel()
        watch.cancel()


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
