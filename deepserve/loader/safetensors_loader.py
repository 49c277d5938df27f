"""Reading HF checkpoint folders: `model.safetensors`, or shards listed in
`model.safetensors.index.json`. Safetensors only; nothing here unpickles.

    files = find_checkpoint_files(folder)          # CheckpointFiles, every file checked to exist
    stream = WeightStream(files, expected_shapes)  # iterable of (hf_name, tensor)
    filled = model.load_weights(stream)            # stream.current_file names the file on error
    check_all_filled(params, filled, files)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open

from deepserve.loader.errors import LoadError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class CheckpointFiles:
    folder: Path
    files: tuple[Path, ...]  # in reading order
    index: Path | None = None  # the index.json when the checkpoint is sharded

    def describe(self) -> str:
        names = ", ".join(p.name for p in self.files)
        return f"{names} in {self.folder}" + (f" (listed by {self.index.name})" if self.index else "")


def _read_index(index: Path) -> tuple[Path, ...]:
    """Shard files named by an index.json, in first-mention order, each checked to exist."""
    try:
        raw = json.loads(index.read_text(encoding="utf-8"))
        weight_map = raw["weight_map"]
        shards = list(dict.fromkeys(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise LoadError(f"{index}: cannot read the shard index ({type(exc).__name__}: {exc})") from None
    paths = tuple(index.parent / name for name in shards)
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise LoadError(f"{index}: points to shard file(s) that do not exist: {', '.join(missing)}")
    return paths


def find_checkpoint_files(folder: str | Path) -> CheckpointFiles:
    """The safetensors files of a checkpoint folder, or LoadError saying what is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LoadError(f"{folder}: model folder does not exist")
    index = folder / INDEX_NAME
    if index.is_file():
        return CheckpointFiles(folder, _read_index(index), index)
    if (folder / SINGLE_NAME).is_file():
        return CheckpointFiles(folder, (folder / SINGLE_NAME,))
    found = tuple(sorted(folder.glob("*.safetensors")))
    if found:
        return CheckpointFiles(folder, found)
    others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    hint = f" (found {', '.join(others)}: pickle checkpoints are not loaded; convert to safetensors)" if others else ""
    raise LoadError(f"{folder}: no {SINGLE_NAME}, {INDEX_NAME} or *.safetensors file{hint}")


def _read_file(path: Path, device: str) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        with safe_open(str(path), framework="pt", device=device) as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)
    except (SafetensorError, OSError) as exc:
        raise LoadError(f"{path}: truncated or corrupt safetensors file ({exc})") from None


def file_tensor_names(path: Path) -> list[str]:
    """Tensor names stored in one safetensors file (reads the header only)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError) as exc:
        raise LoadError(f"{path}: truncated or corrupt safetensors file ({exc})") from None


class WeightStream:
    """Iterable of (hf_name, tensor) over every file; remembers the file being read.

    Tensors whose name equals a parameter name (`expected_shapes`) are shape-checked here, so that
    the error names the file; fused or renamed tensors are checked by the model's `load_weights`.
    `on_file(path)` is called after each file has been read (progress bars).
    """

    def __init__(self, files: CheckpointFiles, expected_shapes: Mapping[str, torch.Size] | None = None,
                 device: str = "cpu", on_file: Callable[[Path], None] | None = None):
        self.files = files
        self.expected_shapes = expected_shapes or {}
        self.device = device
        self.on_file = on_file
        self.current_file: Path | None = None

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for path in self.files.files:
            self.current_file = path
            for name, tensor in _read_file(path, self.device):
                self._check_shape(path, name, tensor)
                yield name, tensor
            if self.on_file is not None:
                self.on_file(path)

    def _check_shape(self, path: Path, name: str, tensor: torch.Tensor) -> None:
        expected = self.expected_shapes.get(name)
        if expected is not None and tuple(expected) != tuple(tensor.shape):
            raise LoadError(f"{path}: tensor {name} has shape {list(tensor.shape)}, "
                            f"the model expects {list(expected)}")


class StreamWrapper:
    """A (name, tensor) stream over another one (a WeightStream or a wrapper of one) that reports
    the inner stream's files, so load errors still name the file being read."""

    def __init__(self, inner):
        self.inner = inner

    @property
    def files(self):
        return self.inner.files

    @property
    def current_file(self):
        return self.inner.current_file


def load_into(model: torch.nn.Module, stream: WeightStream) -> set[str]:
    """Run `model.load_weights(stream)`; a ValueError from the model becomes a LoadError naming the file."""
    try:
        return set(model.load_weights(iter(stream)))
    except ValueError as exc:
        where = stream.current_file or stream.files.folder
        raise LoadError(f"{where}: {exc}") from None


def check_all_filled(param_names: Iterable[str], filled: set[str], files: CheckpointFiles) -> None:
    """LoadError naming the parameters no checkpoint tensor filled, and the files searched."""
    missing = [name for name in param_names if name not in filled]
    if not missing:
        return
    more = f" (and {len(missing) - 1} more: {', '.join(missing[1:6])}{', ...' if len(missing) > 6 else ''})"
    raise LoadError(f"missing tensor {missing[0]}{more if len(missing) > 1 else ''}: "
                    f"not found in {files.describe()}")
