"""The only module that reads DEEPSERVE_* environment variables.

Every value is read when its function is called (never at import), so tests can set the
environment with `monkeypatch.setenv` and code that wants one consistent view takes a frozen
`EnvSnapshot` once at start-up with `snapshot()`.

    DEEPSERVE_CACHE_DIR   converted models and other caches (default ~/.cache/deepserve)
    DEEPSERVE_API_KEY     bearer token the server requires (default: none, no auth)
    DEEPSERVE_LOG_LEVEL   logging level name (default INFO)
    DEEPSERVE_PDL         0 turns off programmatic dependent launch of the decode kernels on sm_90+
                          GPUs (default 1: on; kernels/pdl.py)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def cache_dir() -> Path:
    """Root of deepserve's on-disk caches (created by whoever writes into it)."""
    value = os.environ.get("DEEPSERVE_CACHE_DIR", "").strip()
    if value:
        return Path(value).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "deepserve"


def api_key() -> str | None:
    """The API key the server checks, or None when the variable is unset or empty."""
    value = os.environ.get("DEEPSERVE_API_KEY", "").strip()
    return value or None


def log_level() -> str:
    """Upper-case logging level name; an unknown name raises ValueError naming the variable."""
    value = os.environ.get("DEEPSERVE_LOG_LEVEL", "INFO").strip().upper() or "INFO"
    if value not in _LOG_LEVELS:
        raise ValueError(f"DEEPSERVE_LOG_LEVEL={value!r} is not one of {', '.join(_LOG_LEVELS)}")
    return value


def pdl_enabled() -> bool:
    """DEEPSERVE_PDL: "1" (default) or "0"; anything else raises ValueError naming the variable."""
    value = os.environ.get("DEEPSERVE_PDL", "1").strip() or "1"
    if value not in ("0", "1"):
        raise ValueError(f"DEEPSERVE_PDL={value!r} must be 0 or 1")
    return value == "1"


def triton_interpret() -> bool:
    """TRITON_INTERPRET (Triton's own variable): whether Triton kernels run in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


@dataclass(frozen=True)
class EnvSnapshot:
    cache_dir: Path
    api_key: str | None
    log_level: str
    pdl: bool


def snapshot() -> EnvSnapshot:
    """All DEEPSERVE_* values read now, frozen."""
    return EnvSnapshot(cache_dir=cache_dir(), api_key=api_key(), log_level=log_level(), pdl=pdl_enabled())
