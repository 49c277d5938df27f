"""Platform detection and the registry (runs on a CPU-only machine)."""

from __future__ import annotations

import re
from pathlib import Path
from types import MappingProxyType

import pytest
import torch

import deepserve.platforms as platforms
from deepserve.engine.args import _resolve_device
from deepserve.platforms import Platform, current_platform, get_platform
from deepserve.platforms.cpu import CpuPlatform
from deepserve.platforms.cuda import CudaPlatform

ENGINE = Path(platforms.__file__).resolve().parent.parent / "engine"


class FakeAccelerator(Platform):
    name = "fakeacc"
    device_type = "cpu"  # computes on the host so the test can build tensors
    dist_backend = "fakeccl"

    @classmethod
    def is_available(cls) -> bool:
        return True


@pytest.fixture
def fresh_caches():
    for fn in (platforms.current_platform, platforms.get_platform, platforms._plugin_targets):
        fn.cache_clear()
    yield
    for fn in (platforms.current_platform, platforms.get_platform, platforms._plugin_targets):
        fn.cache_clear()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks detection on a machine without CUDA")
def test_cpu_machine_detects_cpu(fresh_caches):
    p = current_platform()
    assert isinstance(p, CpuPlatform)
    assert (p.device_type, p.dist_backend, p.supports_graph_capture) == ("cpu", "gloo", False)
    assert _resolve_device("auto") == "cpu"
    assert _resolve_device("cuda") == "cuda"


def test_current_platform_is_built_once(fresh_caches):
    assert current_platform() is current_platform()
    assert get_platform("auto") is current_platform()


def test_cuda_platform_describes_itself_without_a_gpu():
    p = get_platform("cuda:1")
    assert isinstance(p, CudaPlatform)
    assert (p.dist_backend, p.supports_graph_capture, p.default_dtype) == ("nccl", True, torch.bfloat16)
    assert torch.cuda.OutOfMemoryError in p.oom_errors()


def test_cpu_platform_answers():
    p = CpuPlatform()
    assert p.resolve_dtype(torch.bfloat16) == torch.float32
    assert p.resolve_dtype(torch.float32) == torch.float32
    assert p.device() == torch.device("cpu")
    assert p.device_name().startswith("cpu-")
    info = p.mem_get_info()
    assert info.total >= info.free >= 0
    assert p.memory_stats().allocated == 0
    p.synchronize()
    p.empty_cache()
    with p.stream_context():
        pass
    with pytest.raises(NotImplementedError):
        p.graph_capturer()


def test_unknown_and_plugin_names_explain_themselves(fresh_caches):
    with pytest.raises(ValueError, match="install its deepserve plugin"):
        get_platform("ascend")
    with pytest.raises(ValueError, match="known: cuda, cpu"):
        get_platform("tpu9")


def test_plugin_from_entry_points_wins_detection(fresh_caches, monkeypatch):
    target = MappingProxyType({"fakeacc": f"{__name__}:FakeAccelerator"})
    monkeypatch.setattr(platforms, "_plugin_targets", lambda: target)
    platforms.current_platform.cache_clear()
    assert isinstance(current_platform(), FakeAccelerator)
    assert "fakeacc" in platforms.available_names()
    assert get_platform("fakeacc").dist_backend == "fakeccl"


def test_engine_calls_no_torch_cuda_directly():
    """Device questions go through the platform; only the graph capturer touches torch.cuda."""
    allowed = {"cuda_graph.py"}
    offenders = [p.name for p in ENGINE.glob("*.py")
                 if p.name not in allowed and re.search(r"torch\.cuda\.", p.read_text())]
    assert offenders == []
