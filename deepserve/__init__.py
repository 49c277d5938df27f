"""deepserve: run DeepSeek-family LLMs on your own hardware.

    from deepserve import LLM, SamplingParams

Both names are imported on first use, so `import deepserve` stays cheap (no torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]

_LAZY = {
    "LLM": "deepserve.engine.llm",
    "SamplingParams": "deepserve.sampling_params",
}

if TYPE_CHECKING:
    from deepserve.engine.llm import LLM
    from deepserve.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'deepserve' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
