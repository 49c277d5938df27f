"""Decode-attention configurations at serving batch sizes, per KV cache dtype (qwen-7b shapes, H 28, H_kv 4, D 128).

For each (batch, context) case and each cache dtype (bf16, int8, fp8), times `paged_decode_attention` at every
(BLOCK_N, warps, stages) of the grid with the split count the kernel picks, and prints the default
configuration's time (`decode_tiles`' tile at 4 warps, as the kernel runs unasked) next to the best one
(median of `triton.testing.do_bench`, L2 flushed between runs).
Bandwidth counts the cache bytes read (D bytes + a 4-byte scale per 8-bit row, 2 D bytes per bf16 row).
`--json PATH` appends one line per case (the best and the default).

    python benchmarks/kernels_attention_sweep.py [--cases 256x640,256x2048,32x2048] [--json PATH]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))  # kernels_attention, as a script or imported
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # deepserve from this checkout

from kernels_attention import H, H_KV, D, SCALE, bench, paged_batch, row_bytes  # noqa: E402
from deepserve.bench.offline import append_record  # noqa: E402
from deepserve.kernels.paged_decode_attention import decode_tiles, paged_decode_attention  # noqa: E402

GRID = list(itertools.product((32, 64, 128), (4, 8), (2, 3, 4)))  # BLOCK_N, warps, stages


def sweep_case(batch: int, ctx: int, kv: str) -> dict:
    p = paged_batch(batch, ctx, kv)
    q = torch.randn(batch, H, D, device="cuda", dtype=torch.bfloat16)
    times = {}
    for bn, nw, ns in GRID:
        times[(bn, nw, ns)] = bench(lambda: paged_decode_attention(q, p.kv_cache, p.block_tables, p.seq_lens, SCALE,
                                                                   block_n=bn, num_warps=nw, num_stages=ns,
                                                                   kv_scales=p.kv_scales))
    best = min(times, key=times.get)
    tiles = decode_tiles(batch, H_KV, kv != "auto", torch.cuda.get_device_properties(0).multi_processor_count)
    default = (tiles.block_n, 4, tiles.num_stages)  # what paged_decode_attention runs unasked (4 warps)
    kv_bytes = batch * ctx * H_KV * row_bytes(kv) * 2
    return {"kernel": "decode-sweep", "batch": batch, "context": ctx, "kv_cache_dtype": kv,
            "best_config": "BLOCK_N={} warps={} stages={}".format(*best), "best_ms": times[best],
            "best_gb_s": kv_bytes / times[best] / 1e6, "default_ms": times[default],
            "default_gb_s": kv_bytes / times[default] / 1e6,
            "default_config": "BLOCK_N={} warps={} stages={}".format(*default),
            "top3": [("BLOCK_N={} warps={} stages={}".format(*c), round(times[c] * 1e3, 1))
                     for c in sorted(times, key=times.get)[:3]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="256x640,256x2048,32x2048", help="BxCTX,... (every sequence CTX long)")
    parser.add_argument("--kv", default="auto,int8,fp8", help="cache dtypes, comma-separated")
    parser.add_argument("--json", help="append one JSON line per case to this file")
    args = parser.parse_args()
    meta = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
            "model": "qwen-7b", "dtype": "bf16"}
    for case, kv in itertools.product(args.cases.split(","), args.kv.split(",")):
        batch, ctx = (int(v) for v in case.split("x"))
        row = sweep_case(batch, ctx, kv)
        print(f"B={batch:<4} ctx={ctx:<5} {kv:<5} default {row['default_ms'] * 1e3:7.1f} us "
              f"({row['default_gb_s']:6.0f} GB/s)  best {row['best_ms'] * 1e3:7.1f} us ({row['best_gb_s']:6.0f} GB/s) "
              f"{row['best_config']}  top3 {row['top3']}", flush=True)
        append_record({**meta, **row}, args.json)


if __name__ == "__main__":
    main()
