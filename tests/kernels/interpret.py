"""Run the Triton kernels of `deepserve.kernels` on CPU (interpreter) when no GPU is present.

Triton decides between compiling and interpreting when `@triton.jit` decorates a function, i.e.
when the kernel module is imported, by reading TRITON_INTERPRET then. Tests therefore get their
kernel modules through `load_kernel_module`, which sets the variable first (CPU only) and
re-imports a module that an earlier import had already compiled for the GPU.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

INTERPRET = not torch.cuda.is_available()
if INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"


def device() -> torch.device:
    """Where kernel tests put their tensors: the GPU when there is one, else the CPU (interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _has_compiled_kernels(module: ModuleType) -> bool:
    from triton.runtime.jit import JITFunction

    return any(type(v) is JITFunction for v in vars(module).values())


def load_kernel_module(name: str) -> ModuleType:
    """`deepserve.kernels.<name>`, its kernels interpreted on a machine without a GPU."""
    module = importlib.import_module(f"deepserve.kernels.{name}")
    if INTERPRET and _has_compiled_kernels(module):
        module = importlib.reload(module)
    return module
