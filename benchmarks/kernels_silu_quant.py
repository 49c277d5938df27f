"""SiLU-and-mul fused with the W8A8 activation quantisation (the dense MLP's down-projection input) on one
GPU: the fused launch ("chunked") and the unfused pair (silu_and_mul, then int8_quant / fp8_quant), the
fused one checked bit-equal to the unfused pair first.

    python benchmarks/kernels_silu_quant.py [--tokens 1,16,256,2048,8192] [--inters 18944,14336,8960]
        [--run-id R] [--result-file benchmarks/results/gpu_quant_kernels.jsonl]

Times are `triton.testing.do_bench_cudagraph` (CUDA-graph replays: no Python launch cost, as in a
captured decode step) of x [T, 2I] bf16; GB/s counts one read of x and one write of q. One record per
(quantisation, T, I, variant) with the run id (../shared/BENCHMARKS.md); a table is printed.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # deepserve from this checkout

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_quant_kernels.jsonl"
INTERS = {18944: "qwen-7b", 14336: "llama-8b", 8960: "qwen-1.5b"}


def variants(quant: str):
    """name -> fn(x) returning (q, scale)."""
    from deepserve.kernels.fp8_quant import fp8_quant
    from deepserve.kernels.int8_quant import int8_quant
    from deepserve.kernels.silu_and_mul import silu_and_mul
    from deepserve.kernels.silu_and_mul_quant import silu_and_mul_fp8_quant, silu_and_mul_int8_quant

    fused, alone = ((silu_and_mul_int8_quant, int8_quant) if quant == "int8"
                    else (silu_and_mul_fp8_quant, fp8_quant))
    return {"chunked": fused,
            "unfused": lambda x: alone(silu_and_mul(x))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="1,16,256,2048,8192")
    p.add_argument("--inters", default="18944,14336,8960")
    p.add_argument("--quants", default="int8,fp8")
    p.add_argument("--run-id", default=uuid.uuid4().hex[:12])
    p.add_argument("--result-file", default=str(RESULTS))
    args = p.parse_args()

    import torch
    from triton.testing import do_bench_cudagraph

    from deepserve.bench.offline import append_record, environment_fields

    env = environment_fields(torch.cuda.get_device_name(), args.run_id)
    print(f"{'quant':<6}{'T':>6}{'I':>7}  " + "".join(f"{v:>22}" for v in ("chunked", "unfused")))
    for quant in args.quants.split(","):
        fns = variants(quant)
        for inter in (int(i) for i in args.inters.split(",")):
            for tokens in (int(t) for t in args.tokens.split(",")):
                x = torch.randn(tokens, 2 * inter, device="cuda", dtype=torch.bfloat16)
                want = fns["unfused"](x)
                cells = []
                for name, fn in fns.items():
                    got = fn(x)
                    same = torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8)) and \
                        torch.equal(got[1], want[1])
                    us = 1000 * do_bench_cudagraph(lambda fn=fn: fn(x), rep=50)
                    gbs = (x.numel() * 2 + tokens * inter) / us / 1e3
                    cells.append(f"{us:9.1f} us {gbs:6.0f} GB/s{'' if same else ' DIFF'}")
                    append_record({**env, "engine": "deepserve", "model": INTERS.get(inter, f"I={inter}"),
                                   "dtype": "bfloat16", "quant": quant, "workload": "kernel",
                                   "kernel": f"silu_and_mul_{quant}_quant", "variant": name, "batch": tokens,
                                   "inter": inter, "us": round(us, 2), "gb_s": round(gbs, 1), "bits_equal": same,
                                   "notes": "benchmarks/kernels_silu_quant.py: do_bench_cudagraph (rep 50) of x "
                                            "[T, 2I] bf16; GB/s = (read of x + write of q) / time; bits_equal "
                                            "against the unfused pair"}, args.result_file)
                print(f"{quant:<6}{tokens:>6}{inter:>7}  " + "".join(f"{c:>22}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
