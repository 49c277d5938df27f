"""NVIDIA GPUs through torch.cuda: nccl, Triton attention, CUDA graphs, bf16 by default."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from deepserve.platforms.interface import HostCopy, MemoryInfo, MemoryStats, Platform


class CudaPlatform(Platform):
    name = "cuda"
    device_type = "cuda"
    dist_backend = "nccl"
    attention_backend = "triton"
    supports_graph_capture = True
    jit_kernels = True  # Triton
    supported_dtypes = (torch.bfloat16, torch.float16, torch.float32)
    default_dtype = torch.bfloat16

    @classmethod
    def is_available(cls) -> bool:
        return torch.cuda.is_available() and torch.version.hip is None

    def device_count(self) -> int:
        return torch.cuda.device_count()

    def device_name(self, index: int = 0) -> str:
        return torch.cuda.get_device_name(index)

    def supports_fp8(self, index: int = 0) -> bool:
        """FP8 tensor cores: compute capability 8.9+ (Ada, Hopper and later)."""
        return torch.cuda.get_device_capability(index) >= (8, 9)

    def supports_fp8_kv_cache(self, index: int = 0) -> bool:
        """Triton converts float8_e4m3fn (fp8e4nv) only on compute capability 8.9+, as for the GEMMs."""
        return self.supports_fp8(index)

    def mem_get_info(self, index: int = 0) -> MemoryInfo:
        free, total = torch.cuda.mem_get_info(index)
        return MemoryInfo(free=free, total=total)

    def memory_stats(self, index: int = 0) -> MemoryStats:
        return MemoryStats(allocated=torch.cuda.memory_allocated(index),
                           reserved=torch.cuda.memory_reserved(index),
                           peak_allocated=torch.cuda.max_memory_allocated(index))

    def reset_peak_memory_stats(self, index: int = 0) -> None:
        torch.cuda.reset_peak_memory_stats(index)

    def synchronize(self, index: int = 0) -> None:
        torch.cuda.synchronize(index)

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def oom_errors(self) -> tuple[type[BaseException], ...]:
        return (torch.cuda.OutOfMemoryError,)

    def graph_capturer(self):
        from deepserve.engine.cuda_graph import CudaGraphCapturer  # lazy: engine imports platforms

        return CudaGraphCapturer()

    def upload(self, tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        """Through pinned memory (the caching host allocator keeps the staging block alive until
        the copy has run)."""
        return tensor.pin_memory().to(device, non_blocking=True)

    def copy_to_host_async(self, tensor: torch.Tensor) -> HostCopy:
        """Into pinned memory, ordered after the work queued on the current stream."""
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return HostCopy(host, done.synchronize)

    @contextlib.contextmanager
    def stream_context(self) -> Iterator[None]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            yield
        torch.cuda.current_stream().wait_stream(stream)
