"""Plain stats data filled by the engine side; `server/metrics.py` turns it into Prometheus series.

    RequestStats      one per finished request (AsyncLLM calls `on_request_finished(stats)`)
    EngineStatsMsg    the engine's periodic snapshot (deepserve/engine/messages.py), via AsyncLLM.stats()

All times are `time.monotonic()` seconds (CLOCK_MONOTONIC is system-wide, so the engine process's
`first_scheduled_time` compares with the server's arrival time on the same host).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestStats:
    request_id: str
    arrival_time: float  # generate() was called
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_generated_tokens: int = 0
    first_scheduled_time: float | None = None  # the engine first ran it
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)  # when each batch of new tokens arrived
    finish_time: float | None = None
    finish_reason: str | None = None  # stop | length | abort | error

    def record_tokens(self, now: float, num_new: int) -> None:
        if num_new <= 0:
            return
        if self.first_token_time is None:
            self.first_token_time = now
        self.token_times.append(now)
        self.num_generated_tokens += num_new

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def queue_time(self) -> float | None:
        if self.first_scheduled_time is None:
            return None
        return max(0.0, self.first_scheduled_time - self.arrival_time)

    @property
    def e2e_latency(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time

    @property
    def time_per_output_token(self) -> float | None:
        """Mean seconds per token after the first (None with fewer than two tokens)."""
        if self.num_generated_tokens < 2 or not self.token_times or self.first_token_time is None:
            return None
        return (self.token_times[-1] - self.first_token_time) / (self.num_generated_tokens - 1)

    @property
    def inter_token_latencies(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]
