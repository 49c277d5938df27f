"""Block-FP8 linear on the GPU at DeepSeek-V3 shapes: activation quantisation + block-scaled GEMM
(`deepserve/kernels/block_fp8_{quant,gemm}.py`) against a bf16 cuBLAS GEMM of the same shape.

    python benchmarks/block_fp8_gemm.py [--m 1 32 512] > results.jsonl

One JSON line per (M, N, K): microseconds of quant, gemm, quant+gemm and bf16 mm, the GEMM's weight
bandwidth (GB/s, what decode is bound by) and TFLOP/s. Needs an FP8 GPU (compute capability 8.9+).
"""

from __future__ import annotations

import argparse
import json

import torch
import triton.testing

from deepserve.kernels.block_fp8_gemm import block_fp8_gemm, gemm_config
from deepserve.kernels.block_fp8_quant import block_fp8_quant
from deepserve.quant.block_fp8_ref import block_fp8_quantize_weight_ref

# (name, N, K): q_a, kv_a, q_b (128 heads x 192), o_proj, dense gate|up and down, expert gate|up and down
SHAPES = [("q_a", 1536, 7168), ("kv_a", 576, 7168), ("q_b", 24576, 1536), ("o", 7168, 16384),
          ("dense_gate_up", 36864, 7168), ("dense_down", 7168, 18432), ("expert_gate_up", 4096, 7168),
          ("expert_down", 7168, 2048)]


def _us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100) * 1e3


def bench(m: int, name: str, n: int, k: int) -> dict:
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
    w_q, w_s = block_fp8_quantize_weight_ref(w)
    a_q, a_s = block_fp8_quant(x)
    quant = _us(lambda: block_fp8_quant(x))
    gemm = _us(lambda: block_fp8_gemm(a_q, a_s, w_q, w_s))
    both = _us(lambda: block_fp8_gemm(*block_fp8_quant(x), w_q, w_s))
    bf16 = _us(lambda: x @ w.t())
    return {"layer": name, "m": m, "n": n, "k": k, "config": gemm_config(m, n)._asdict(),
            "quant_us": round(quant, 2), "gemm_us": round(gemm, 2), "quant_gemm_us": round(both, 2),
            "bf16_mm_us": round(bf16, 2), "gemm_weight_gbps": round(n * k / gemm / 1e3, 1),
            "gemm_tflops": round(2 * m * n * k / gemm / 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, nargs="+", default=[1, 32, 512])
    args = parser.parse_args()
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "triton": triton.__version__}))
    for m in args.m:
        for name, n, k in SHAPES:
            print(json.dumps(bench(m, name, n, k)), flush=True)


if __name__ == "__main__":
    main()
