"""The `Platform` interface: what the engine asks of an accelerator (or of the CPU).

The engine never calls `torch.cuda` directly; it asks the platform of its device. A platform is
stateless (all answers come from the runtime when asked), so one instance per kind is shared.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import torch


@dataclass(frozen=True)
class MemoryInfo:
    """Device memory in bytes, as the driver reports it (all processes)."""

    free: int
    total: int


@dataclass(frozen=True)
class MemoryStats:
    """This process's allocator, in bytes (0 where the platform does not track it)."""

    allocated: int  # live tensors
    reserved: int  # held by the caching allocator
    peak_allocated: int  # since the last `reset_peak_memory_stats`


class HostCopy(NamedTuple):
    """A device-to-host copy in progress: `tensor` is valid once `wait()` returned."""

    tensor: torch.Tensor
    wait: Callable[[], None]


class Platform:
    """Base class: defaults describe a device with no special features. Subclasses override."""

    name: str = "base"
    device_type: str = "cpu"  # torch device type
    dist_backend: str = "gloo"  # torch.distributed backend
    attention_backend: str = "torch"  # name in the attention backend registry
    supports_graph_capture: bool = False
    jit_kernels: bool = False  # kernels compile at first launch: warm them up before serving
    supported_dtypes: tuple[torch.dtype, ...] = (torch.float32,)
    default_dtype: torch.dtype = torch.float32

    @classmethod
    def is_available(cls) -> bool:
        return False

    def device_count(self) -> int:
        return 1

    def device(self, index: int = 0) -> torch.device:
        return torch.device(self.device_type, index)

    def device_name(self, index: int = 0) -> str:
        return self.name

    def mem_get_info(self, index: int = 0) -> MemoryInfo:
        raise NotImplementedError(f"{self.name}: device memory is not reported")

    def memory_stats(self, index: int = 0) -> MemoryStats:
        return MemoryStats(0, 0, 0)

    def reset_peak_memory_stats(self, index: int = 0) -> None:
        return None

    def synchronize(self, index: int = 0) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def oom_errors(self) -> tuple[type[BaseException], ...]:
        """Exception types this platform raises when device memory runs out."""
        return (MemoryError,)

    def supports_fp8(self, index: int = 0) -> bool:
        """Whether float8_e4m3fn tensor-core GEMMs run here (block-FP8 checkpoints are then served
        in FP8; elsewhere they are dequantised at load)."""
        return False

    def supports_fp8_kv_cache(self, index: int = 0) -> bool:
        """Whether the attention backend here can store and read a float8_e4m3fn KV cache
        (--kv-cache-dtype fp8): only conversions, no FP8 GEMMs. By default where FP8 GEMMs run."""
        return self.supports_fp8(index)

    def resolve_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """`dtype` if the platform computes in it, else the default (e.g. bf16 -> fp32 on CPU)."""
        return dtype if dtype in self.supported_dtypes else self.default_dtype

    def graph_capturer(self):
        """A `deepserve.engine.cuda_graph.Capturer` (only where supports_graph_capture)."""
        raise NotImplementedError(f"{self.name} does not capture graphs")

    def upload(self, tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        """A host tensor on `device` without waiting for the work queued there, where the platform
        can (a copy from pageable memory waits for the device: no host/device overlap)."""
        return tensor.to(device)

    def copy_to_host_async(self, tensor: torch.Tensor) -> "HostCopy":
        """Start copying `tensor` to host memory behind the work queued before it; `wait()` on the
        result before reading it. Synchronous where the device is the host."""
        return HostCopy(tensor.to("cpu", copy=True), lambda: None)

    @contextlib.contextmanager
    def stream_context(self) -> Iterator[None]:
        """Run the enclosed work on a side stream where the platform has streams."""
        yield

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
