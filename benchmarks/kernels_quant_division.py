"""How much of a per-token quantisation kernel is its division, on one GPU: a row-quantising kernel (the row
max given, int8 q = rint(v / scale)) with three element steps, side by side:

    div_rn     tl.div_rn(v, scale): PTX div.rn.f32, what the int8 / fp8 quant kernels ran until run s8g;
    markstein  int8_quant.divide_by_scale's fast path: r = RN(1 / scale) per row, y = v * r, two FMA
               corrections (the IEEE quotient: the same bits, checked here on every element);
    mul        v * r alone (not exact: a lower bound on the time; its differing elements are counted).

    python benchmarks/kernels_quant_division.py [--tokens 256,8192] [--cols 18944] [--run-id R]
        [--result-file benchmarks/results/gpu_quant_kernels.jsonl]

Inputs: bf16 rows over four decades of scale, and f32 rows whose quotients sit within 3 ulps of k + 1/2
(tests/kernels/quant_cases.near_tie_rows), where a quotient 1 ulp off rounds the other way. Times are
`triton.testing.do_bench_cudagraph` (rep 50). One record per (T, variant).
"""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # deepserve and tests from this checkout
RESULTS = ROOT / "benchmarks" / "results" / "gpu_quant_kernels.jsonl"
VARIANTS = {"div_rn": 0, "markstein": 1, "mul": 2}


import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.language.extra import libdevice  # noqa: E402

from deepserve.kernels.int8_quant import divide_by_scale  # noqa: E402


@triton.jit
def _quant_rows(h_ptr, amax_ptr, q_ptr, N, MODE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (row, 4096 columns): scale from the row max, q = rint(v / scale) clamped, by MODE's division."""
    row = tl.program_id(0).to(tl.int64)
    scale = tl.div_rn(tl.maximum(tl.load(amax_ptr + row), 1e-8), 127.0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    v = tl.load(h_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    if MODE == 0:
        y = tl.div_rn(v, scale)
    elif MODE == 1:
        y = divide_by_scale(v, scale, True)
    else:
        y = v * tl.div_rn(1.0, scale)
    y = tl.minimum(tl.maximum(libdevice.rint(y), -127.0), 127.0)
    tl.store(q_ptr + row * N + cols, y.to(tl.int8), mask=mask)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="256,8192")
    p.add_argument("--cols", type=int, default=18944)
    p.add_argument("--run-id", default=uuid.uuid4().hex[:12])
    p.add_argument("--result-file", default=str(RESULTS))
    args = p.parse_args()

    import torch
    from triton.testing import do_bench_cudagraph

    from deepserve.bench.offline import append_record, environment_fields
    from tests.kernels.quant_cases import near_tie_rows

    fn, env = _quant_rows, environment_fields(torch.cuda.get_device_name(), args.run_id)

    def run(h, amax, mode):
        q = torch.empty(h.shape, dtype=torch.int8, device=h.device)
        fn[(h.shape[0], triton.cdiv(h.shape[1], 4096))](h, amax, q, h.shape[1], MODE=mode, BLOCK_N=4096, num_warps=8)
        return q

    torch.manual_seed(0)
    ties = near_tie_rows(256, args.cols, 127.0, torch.arange(0, 127) + 0.5).cuda()
    ties_want = run(ties, ties.abs().amax(1), 0)
    print(f"{'T':>6}  " + "".join(f"{v:>28}" for v in VARIANTS))
    for m in (int(t) for t in args.tokens.split(",")):
        h = (torch.randn(m, args.cols, device="cuda") * torch.logspace(-3, 1, m, device="cuda")[:, None]).bfloat16()
        amax = h.float().abs().amax(1)
        want = run(h, amax, 0)
        cells = []
        for name, mode in VARIANTS.items():
            diff = int((run(h, amax, mode) != want).sum())
            diff += int((run(ties, ties.abs().amax(1), mode) != ties_want).sum())
            us = 1000 * do_bench_cudagraph(lambda mode=mode: run(h, amax, mode), rep=50)
            cells.append(f"{us:9.1f} us {diff:>9} diff")
            append_record({**env, "engine": "deepserve", "model": f"I={args.cols}", "dtype": "bfloat16",
                           "quant": "int8", "workload": "kernel", "kernel": "quant_division", "variant": name,
                           "batch": m,
                           "cols": args.cols, "us": round(us, 2), "elements_differing_from_div_rn": diff,
                           "notes": "benchmarks/kernels_quant_division.py: rows quantised with the row max given; "
                                    "do_bench_cudagraph (rep 50) of the bf16 rows; differing elements counted over "
                                    "them and 256 near-tie f32 rows"}, args.result_file)
        print(f"{m:>6}  " + "".join(f"{c:>28}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
