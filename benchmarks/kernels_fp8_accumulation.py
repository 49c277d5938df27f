"""What float32 accumulation costs the fp8 linears: torch._scaled_mm (cuBLASLt, row-wise scales, bf16 out) with
use_fast_accum off ("fp8-exact-accum": every partial sum promoted to float32) against on ("fp8" since session 17:
the tensor core's own reduced-precision running sum over all of K, as vLLM's CUTLASS fp8 kernels run on Hopper), at
qwen-7b's four linear shapes, with each one's error against the exact product.

    python benchmarks/kernels_fp8_accumulation.py [--tokens 256,2048,8192] [--run-id R]
        [--result-file benchmarks/results/gpu_quant_kernels.jsonl]

Times are gpu_quant.py's `time_ms` (CUDA-graph replays over cold weight copies, the median per call). The
error is max |y - exact| / max |exact| over the [M, N] output (bf16 output rounding alone is up to 2^-9 of a
value). One record per (linear, M, accumulation).
"""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # deepserve from this checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_quant

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_quant_kernels.jsonl"
LINEARS = {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944)}  # (N, K)


def e4m3(shape, device="cuda"):
    import torch

    return (torch.randn(shape, device=device) * 40).clamp(-448, 448).to(torch.float8_e4m3fn)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="256,2048,8192")
    p.add_argument("--run-id", default=uuid.uuid4().hex[:12])
    p.add_argument("--result-file", default=str(RESULTS))
    args = p.parse_args()

    import torch

    from deepserve.bench.offline import append_record, environment_fields
    from gpu_quant import time_ms

    env = environment_fields(torch.cuda.get_device_name(), args.run_id)
    print(f"{'linear':<8}{'M':>6}{'accurate us':>13}{'fast us':>10}{'ratio':>7}   max err accurate / fast")
    for name, (n, k) in LINEARS.items():
        weights = [e4m3((n, k)) for _ in range(max(1, -(-(160 << 20) // (n * k))))]  # more bytes than the L2
        w_scale = torch.rand(n, device="cuda") / 1000
        for m in (int(t) for t in args.tokens.split(",")):
            x, x_scale = e4m3((m, k)), torch.rand(m, device="cuda") / 100
            exact = (x.double() * x_scale.double()[:, None]) @ (weights[0].double() * w_scale.double()[:, None]).t()
            us, err = {}, {}
            for fast in (False, True):
                def run(w, fast=fast):
                    return torch._scaled_mm(x, w.t(), scale_a=x_scale[:, None], scale_b=w_scale[None, :],
                                            out_dtype=torch.bfloat16, use_fast_accum=fast)

                err[fast] = ((run(weights[0]).double() - exact).abs().max() / exact.abs().max()).item()
                us[fast] = 1000 * time_ms([lambda w=w: run(w) for w in weights])
                append_record({**env, "engine": "deepserve", "model": "qwen-7b", "dtype": "bfloat16", "quant": "fp8",
                               "workload": "kernel", "kernel": f"scaled_mm_{name}",
                               "variant": "fast-accum" if fast else "float32-accum", "batch": m, "n": n, "k": k,
                               "us": round(us[fast], 2), "max_rel_error": float(f"{err[fast]:.3e}"),
                               "notes": "benchmarks/kernels_fp8_accumulation.py: torch._scaled_mm row-wise, bf16 out, "
                                        f"use_fast_accum={fast}; gpu_quant.time_ms (CUDA-graph replays over cold "
                                        "weight copies, median); max_rel_error: max |y - exact| / max |exact|"},
                              args.result_file)
            print(f"{name:<8}{m:>6}{us[False]:>13.1f}{us[True]:>10.1f}{us[False] / us[True]:>7.3f}   "
                  f"{err[False]:.2e} / {err[True]:.2e}", flush=True)


if __name__ == "__main__":
    main()
