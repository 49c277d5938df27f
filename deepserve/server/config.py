"""ServerConfig: the HTTP server's settings (frozen; built once from the CLI)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"  # loopback unless --host says otherwise
    port: int = 8000
    max_n: int = 16  # cap on `n` (times the number of prompts of a batch completion)
    max_body_bytes: int = 16 << 20
    max_json_depth: int = 64
    default_completion_max_tokens: int = 16  # /v1/completions without max_tokens (OpenAI's default)
    log_level: str = "info"
    shutdown_timeout_s: float = 10.0
