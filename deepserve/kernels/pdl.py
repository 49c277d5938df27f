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
    Two exceptions, each behind its caller's promise about the kernel launched just before (the only one
    that can still run then):
      - the decode GEMVs (kernels/gemv.py, kernels/gemv_dp4a.py) called with `static_weight=True` load their
        first weight chunk (gemv_dp4a's x-stationary kernel: chunks 0 and 1 of its first row block) before
        the wait (`if PREFETCH_W:` ahead of the prologue): that kernel never writes a layer's weight;
      - the decode attention (kernels/paged_decode_attention.py) called with `prefetch_kv=True` reads
        seq_lens, its block-table entries and its first tile's keys but each sequence's newest before the
        wait (`if PREFETCH_KV:`): that kernel is the cache write of the newest keys only. The newest key
        is read after the wait. tests/kernels/test_pdl.py checks which reads come before the wait.
  * its launch passes `**pdl_launch(device)`: {"PDL": True, "launch_pdl": True} on an sm_90+ NVIDIA
    device unless DEEPSERVE_PDL=0, else {} (PDL stays False and the prologue compiles to nothing): never
    under ROCm (torch reports "cuda" devices there too), under TRITON_INTERPRET=1, or with a Triton that
    lacks the griddepcontrol ops.
  * the fused MoE kernel takes `pdl_wait(PDL)`: it waits, but the next kernel launches only when all its
    CTAs have exited. The W8A8 int8 GEMMs (kernels/int8_gemm.py) do the same, by analogy with the fused
    MoE, not measured against the early trigger; the activation-quantisation kernels before them
    (int8_quant, fp8_quant, silu_and_mul_quant) trigger early, so the GEMM launches behind them.
    Measured on an H200 with the early trigger in every kernel (run s5e2, one run):
    qwen-7b decode 3.88 vs 4.01 ms/token without PDL, qwen-1.5b 1.40 vs 1.53, but V2-Lite decode 2.244
    vs 2.238 and its 128-token prefill 39 vs 26 ms; with the fused MoE only waiting (run s5final):
    V2-Lite decode 2.062 vs 2.237 without PDL, prefill 25.4 ms. Why the early trigger there hurt was not
    established (the next kernel's CTAs cannot take slots from the MoE's later waves: it launches only
    once every CTA, the last wave's included, has triggered); a profile of that prefill would tell.
Ordering is transitive: a kernel's wait returns after the previous grid completed, and that grid
completed only after its own wait returned, so every earlier kernel's writes are visible. A kernel
launched without the PDL attribute (cuBLAS, torch) before or after one of ours keeps ordinary stream
order. A third-party kernel that is itself launched with PDL and reads before its own wait would race
with our output: none on the decode path does that today (cuBLAS GEMMs, torch elementwise ops). Under
CUDA-graph capture the launch attribute becomes a programmatic edge of the graph (CUDA 12.3+).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from deepserve import envs

try:  # the griddepcontrol ops (Triton 3.3+); without them PDL stays off
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton
    gdc_launch_dependents = gdc_wait = None


@triton.jit
def pdl_prologue(PDL: tl.constexpr):
    """Wait for the previous grid (its writes visible), then let the next kernel launch. No-op without PDL."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Wait for the previous grid only: the next kernel launches when this one's CTAs have all exited
    (the fused MoE GEMMs: see the module docstring). No-op without PDL."""
    if PDL:
        gdc_wait()


def pdl_launch(device: torch.device) -> dict[str, bool]:
    """Launch keywords of a PDL-aware kernel on `device`: PDL on sm_90+ NVIDIA devices unless DEEPSERVE_PDL=0."""
    if device.type != "cuda":
        return {}
    return {"PDL": True, "launch_pdl": True} if _pdl_on(device.index or 0) else {}


@functools.lru_cache(maxsize=None)
def _pdl_on(index: int) -> bool:
    """Asked once per device (this sits on every launch of the instrumented kernels)."""
    if not envs.pdl_enabled() or envs.triton_interpret() or gdc_wait is None or torch.version.hip is not None:
        return False
    return torch.cuda.get_device_capability(index) >= (9, 0)
