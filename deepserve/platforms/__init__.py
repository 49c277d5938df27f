"""Platforms: which accelerator the engine runs on, and what it can do.

    current_platform()        the platform detected at start-up (first available in DETECTION_ORDER,
                              after any plugin), built once and cached
    get_platform("cuda")      the platform of a name or a torch device string ("cuda:1" -> cuda)

Built-in platforms are imported lazily by module path. Out-of-tree accelerators (rocm, ascend,
cambricon, musa, ...) register a `Platform` subclass through the `deepserve.platforms` entry-point
group (`name = "package.module:ClassName"`); a plugin that reports itself available wins detection.
"""

from __future__ import annotations

import functools
import importlib
from importlib.metadata import entry_points
from types import MappingProxyType

import torch

from deepserve.platforms.interface import MemoryInfo, MemoryStats, Platform

BUILTIN = MappingProxyType({
    "cuda": "deepserve.platforms.cuda:CudaPlatform",
    "cpu": "deepserve.platforms.cpu:CpuPlatform",
})
# Names reserved for plugins (their module paths come from entry points).
PLUGIN_NAMES = ("rocm", "ascend", "cambricon", "musa")
DETECTION_ORDER = ("cuda", "cpu")
ENTRY_POINT_GROUP = "deepserve.platforms"

__all__ = ["MemoryInfo", "MemoryStats", "Platform", "current_platform", "get_platform",
           "platform_class", "available_names"]


def _load(target: str) -> type[Platform]:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


@functools.lru_cache(maxsize=1)
def _plugin_targets() -> MappingProxyType:
    """name -> "module:Class" of installed plugins (read once)."""
    return MappingProxyType({ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)})


def available_names() -> tuple[str, ...]:
    """Every platform name this install knows about (built in or plugged in)."""
    return tuple(dict.fromkeys([*BUILTIN, *_plugin_targets()]))


def platform_class(name: str) -> type[Platform]:
    """The class registered under `name`; ValueError naming the known ones."""
    target = _plugin_targets().get(name) or BUILTIN.get(name)
    if target is None:
        hint = " (install its deepserve plugin)" if name in PLUGIN_NAMES else ""
        raise ValueError(f"unknown platform {name!r}{hint}; known: {', '.join(available_names())}")
    return _load(target)


@functools.lru_cache(maxsize=None)
def get_platform(device: str) -> Platform:
    """The platform of a name or torch device string ("cuda", "cuda:0", "cpu", "auto")."""
    if device == "auto":
        return current_platform()
    return platform_class(device.split(":", 1)[0])()


@functools.lru_cache(maxsize=1)
def current_platform() -> Platform:
    """The first available platform: plugins first, then DETECTION_ORDER (cpu always is)."""
    for name in [*_plugin_targets(), *DETECTION_ORDER]:
        cls = platform_class(name)
        if cls.is_available():
            return cls()
    raise RuntimeError("no platform available")  # unreachable: the CPU always is


def upload(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on `device`, through that device's platform (asynchronously on CUDA); the
    tensor itself when the device is the CPU."""
    device = torch.device(device)
    if device.type == "cpu":
        return tensor
    return get_platform(device.type).upload(tensor, device)
