"""ServerConfig: the HTTP server's settings (frozen; built once from the CLI)."""

from __future__ import annotations

from dataclasses import dataclass

LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"  # loopback unless --host says otherwise
    port: int = 8000
    api_keys: tuple[str, ...] = ()  # empty: no authentication
    allowed_origins: tuple[str, ...] = ()  # empty: no CORS headers at all
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    max_request_bytes: int = 16 << 20
    max_header_bytes: int = 16 << 10  # larger request heads get 431 and a closed connection
    max_json_depth: int = 64
    max_n: int = 16  # cap on `n` (times the number of prompts of a batch completion)
    max_waiting_requests: int | None = None  # None: unbounded queue
    max_waiting_tokens: int | None = None
    retry_after_s: int = 1  # Retry-After of a 429
    drain_timeout_s: float = 30.0  # SIGTERM: how long in-flight requests may still run
    default_completion_max_tokens: int = 16  # /v1/completions without max_tokens (OpenAI's default)
    log_level: str = "info"
    log_format: str = "text"  # text | json
    chat_template: str | None = None  # template text overriding tokenizer_config.json's
    reasoning_parser: str | None = None
    tool_call_parser: str | None = None
    metrics_port: int | None = None  # None: /metrics on the main port

    def __post_init__(self) -> None:
        checks = [
            (self.log_format in LOG_FORMATS, "log_format", f"must be one of {', '.join(LOG_FORMATS)}"),
            (0 <= self.port < 65536, "port", "must be in [0, 65535]"),
            (self.max_request_bytes > 0, "max_request_bytes", "must be positive"),
            (self.max_n >= 1, "max_n", "must be at least 1"),
            (self.drain_timeout_s >= 0, "drain_timeout_s", "must be >= 0"),
            ((self.ssl_certfile is None) == (self.ssl_keyfile is None), "ssl_certfile",
             "and ssl_keyfile must be given together"),
            (all(k for k in self.api_keys), "api_keys", "must not contain an empty key"),
            (self.max_waiting_requests is None or self.max_waiting_requests >= 0, "max_waiting_requests",
             "must be >= 0"),
            (self.max_waiting_tokens is None or self.max_waiting_tokens >= 0, "max_waiting_tokens", "must be >= 0"),
        ]
        for ok, name, why in checks:
            if not ok:
                raise ValueError(f"server config: {name} {why}")
