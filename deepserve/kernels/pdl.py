"""Programmatic dependent launch (PDL) for the decode-path Triton kernels (CUDA, compute capability 9.0+).

At batch-1 decode a step is a few hundred short kernels (a V2-Lite step: 414, busy 2.18 of its 2.30 ms
on an H200), so each kernel's launch latency and tail count. A kernel launched with PDL may be scheduled
while the kernel before it on the stream is still running: its CTAs become resident and run their
prologue once every CTA of the previous kernel has signalled `griddepcontrol.launch_dependents` (or
exited), instead of after the previous grid has completed and flushed its memory.

Contract of a kernel that takes `PDL: tl.constexpr = False`:
  * `pdl_prologue(PDL)` is its FIRST statement: `griddepcontrol.wait` blocks until the previous grid
    has completed and its memory is visible, before any load or store of the kernel, so the kernel
    reads and writes exactly what it would without PDL; only then `griddepcontrol.launch_dependents`
    lets the next kernel launch (after the wait, so at most one grid waits behind a running one).
    A kernel with several waves of heavy CTAs takes `pdl_wait(PDL)` instead (no early launch of the
    next kernel: its waiting CTAs would hold SM slots the later waves need). Measured on an H200 (run
    s5e2) with the early trigger in every kernel: qwen-7b decode 3.88 vs 4.01 ms/token without PDL,
    qwen-1.5b 1.40 vs 1.53, but V2-Lite 2.244 vs 2.238 and its 128-token prefill 39 vs 26 ms; the
    fused MoE (146 us per prefill call, several waves) is the suspect, so it only waits.
  * its launch passes `**pdl_launch(device)`: {"PDL": True, "launch_pdl": True} on an sm_90+ CUDA
    device unless DEEPSERVE_PDL=0, else {} (PDL stays False: the prologue compiles to nothing and the
    interpreter never meets the instructions).
Ordering is transitive: a kernel's wait returns after the previous grid completed, and that grid
completed only after its own wait returned, so every earlier kernel's writes are visible. A kernel
without PDL (cuBLAS, torch) after or before one with it keeps ordinary stream order. Under CUDA-graph
capture the launch attribute becomes a programmatic edge of the graph.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from deepserve import envs


@triton.jit
def pdl_prologue(PDL: tl.constexpr):
    """Wait for the previous grid (its writes visible), then let the next kernel launch. No-op without PDL."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Wait for the previous grid only: the next kernel launches when this one's CTAs have all exited.
    For kernels of many heavy CTAs (the fused MoE GEMMs), whose later waves would otherwise share the
    SMs with the next kernel's early, waiting CTAs. No-op without PDL."""
    if PDL:
        gdc_wait()


def pdl_launch(device: torch.device) -> dict[str, bool]:
    """Launch keywords of a PDL-aware kernel on `device`: PDL on sm_90+ CUDA devices unless DEEPSERVE_PDL=0."""
    if device.type != "cuda":
        return {}
    return {"PDL": True, "launch_pdl": True} if _pdl_on(device.index or 0) else {}


@functools.lru_cache(maxsize=None)
def _pdl_on(index: int) -> bool:
    """Asked once per device (this sits on every launch of the instrumented kernels)."""
    return envs.pdl_enabled() and torch.cuda.get_device_capability(index) >= (9, 0)
