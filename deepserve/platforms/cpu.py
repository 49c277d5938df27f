"""The CPU platform: float32 compute, gloo, the PyTorch attention backend, no graphs."""

from __future__ import annotations

import os

import torch

from deepserve.platforms.interface import MemoryInfo, Platform


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"
    dist_backend = "gloo"
    attention_backend = "torch"
    supports_graph_capture = False
    supported_dtypes = (torch.float32,)  # bf16 matmuls are ~100x slower on CPU (docs/design.md)
    default_dtype = torch.float32

    @classmethod
    def is_available(cls) -> bool:
        return True

    def device(self, index: int = 0) -> torch.device:
        return torch.device("cpu")

    def device_name(self, index: int = 0) -> str:
        return f"cpu-{os.cpu_count()}"

    def supports_fp8_kv_cache(self, index: int = 0) -> bool:
        """torch converts float8_e4m3fn on the host, and the PyTorch attention backend dequantises
        the cache rows it gathers."""
        return True

    def mem_get_info(self, index: int = 0) -> MemoryInfo:
        """Host memory from /proc/meminfo (MemAvailable, MemTotal); zeros where it is absent."""
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            return MemoryInfo(0, 0)
        kib = {k: int(v.split()[0]) * 1024 for k, v in fields.items() if v.split()}
        return MemoryInfo(free=kib.get("MemAvailable", 0), total=kib.get("MemTotal", 0))
