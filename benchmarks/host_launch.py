"""Host time of a launch wrapper, side by side in one run: the int8 GEMM's wrapper (`kernels/int8_gemm.int8_gemm`:
checks, config, output, TMA descriptors) with its kernel launch replaced by a no-op, its grid and block sizes
from `kernels/sizes.py` ("sizes") or from Triton's `cdiv` ("triton", what the wrappers used before), plus one
host call of each `cdiv` on its own; and, where Gluon imports, one TMA descriptor of the warp-specialised GEMMs
(`kernels/int8_gemm_ws.descriptor`, two per launch) with its box layout cached per shape ("ws-descriptor") and
asked of Gluon on every call ("ws-descriptor-uncached", what the wrapper did before).

    python benchmarks/host_launch.py [--calls 2000] [--repeats 7] [--run-id R]
        [--result-file benchmarks/results/cpu.jsonl]

The device is the CPU (tensors and the no-op launch are the same in both variants, so the difference is the
size arithmetic); the figure is the smallest of `--repeats` means over `--calls` calls. What Triton's own
launcher costs on a GPU host is not in it. One record per variant.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # deepserve from this checkout
RESULTS = Path(__file__).resolve().parent / "results" / "cpu.jsonl"


class _NoLaunch:
    """Stands in for a Triton kernel: `kernel[grid](...)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def per_call_us(fn, calls: int, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return 1e6 * best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--run-id", default=uuid.uuid4().hex[:12])
    p.add_argument("--result-file", default=str(RESULTS))
    args = p.parse_args()

    import torch
    import triton

    import deepserve.kernels.int8_gemm as gemm
    from deepserve.bench.offline import append_record, environment_fields
    from deepserve.kernels import sizes

    gemm._int8_gemm_kernel = gemm._int8_gemm_tma_kernel = _NoLaunch()
    m, k, n = 8192, 2048, 3072  # a V2-Lite prefill step's q_proj
    x_q, w_q = torch.zeros(m, k, dtype=torch.int8), torch.zeros(n, k, dtype=torch.int8)
    x_s, w_s = torch.ones(m), torch.ones(n)
    env = environment_fields(f"cpu-{os.cpu_count()}", args.run_id)
    figures = {}
    for variant, cdiv in (("triton", triton.cdiv), ("sizes", sizes.cdiv)):
        gemm.cdiv = cdiv
        figures[variant] = {"int8_gemm_wrapper": per_call_us(lambda: gemm.int8_gemm(x_q, x_s, w_q, w_s), args.calls,
                                                             args.repeats),
                            "cdiv_call": per_call_us(lambda: cdiv(8192, 128), args.calls * 10, args.repeats)}
    gemm.cdiv = sizes.cdiv
    for variant, us in figures.items():
        print(f"{variant:<8} int8_gemm wrapper {us['int8_gemm_wrapper']:7.2f} us   one cdiv {us['cdiv_call']:6.3f} us")
        append_record({**env, "engine": "deepserve", "model": "v2-lite q_proj M=8192", "dtype": "int8",
                       "quant": "int8", "workload": "host-launch", "variant": variant,
                       "int8_gemm_wrapper_us": round(us["int8_gemm_wrapper"], 2),
                       "cdiv_call_us": round(us["cdiv_call"], 4),
                       "notes": "benchmarks/host_launch.py: the int8_gemm wrapper with a no-op launch on CPU tensors, "
                                "its sizes from triton.cdiv or kernels/sizes.cdiv; min over repeats of the mean "
                                "per call"},
                      args.result_file)
    descriptor_figures(env, x_q, args)


def descriptor_figures(env: dict, x_q, args) -> None:
    """int8_gemm_ws.descriptor of x_q in 128 x 128 boxes: the cached box layout against Gluon's per call."""
    from deepserve.bench.offline import append_record
    from deepserve.kernels import int8_gemm_ws as ws

    if ws.gl is None:
        print("no Gluon in this Triton: ws-descriptor not timed")
        return
    cached = ws.box_layout

    def uncached(rows, cols):
        return cached.__wrapped__(rows, cols)

    figures = {}
    for variant, layout in (("ws-descriptor-uncached", uncached), ("ws-descriptor", cached)):
        ws.box_layout = layout
        figures[variant] = per_call_us(lambda: ws.descriptor(x_q, 128, 128), args.calls, args.repeats)
    ws.box_layout = cached
    for variant, us in figures.items():
        print(f"{variant:<24} {us:7.2f} us")
        append_record({**env, "engine": "deepserve", "model": "x_q [8192, 2048] int8, 128 x 128 boxes",
                       "dtype": "int8", "quant": "int8", "workload": "host-launch", "variant": variant,
                       "descriptor_us": round(us, 2),
                       "notes": "benchmarks/host_launch.py: kernels/int8_gemm_ws.descriptor (two per launch of the "
                                "warp-specialised GEMMs) with the box layout cached or asked of Gluon each call; "
                                "min over repeats of the mean per call"}, args.result_file)


if __name__ == "__main__":
    main()
