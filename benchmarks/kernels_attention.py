"""GPU micro-benchmark of the paged attention kernels (qwen-7b shapes: H 28, H_kv 4, D 128, bf16).

Decode: batch 1 / 32 / 256 at context 512 / 2048 / 8192 (every sequence at that length, blocks of
16 shuffled over the cache). Each case is timed with `triton.testing.do_bench` (median ms, L2
flushed between runs) and reported as achieved bandwidth over the bytes of K/V it must read
(B * ctx * H_kv * D * 2 (K and V) * 2 bytes; q and out are negligible), next to the PyTorch
backend's gather + SDPA decode where that fits (batch * ctx <= 64K). Prefill and the KV write
get a few rows too (TFLOP/s of causal attention, bandwidth of the write).
`--sweep` also tries decode configurations (BLOCK_N, warps, stages, splits) and prints the best.
`--kv-cache-dtype int8|fp8` runs every row over an 8-bit cache (the bf16 cache quantised, float32
scales per token and head); bandwidth then counts D + 4 bytes per K or V row.
`--json PATH` appends one JSON line per row.

    .venv/bin/python benchmarks/kernels_attention.py [--sweep] [--kv-cache-dtype auto|int8|fp8]
                                                     [--json benchmarks/results/kernels_attention.jsonl]
"""

from __future__ import annotations

import argparse
import itertools
from typing import Callable, NamedTuple

import torch
import triton
import triton.testing

from deepserve.bench.offline import append_record
from deepserve.kernels.kv_cache_write import kv_cache_write
from deepserve.kernels.paged_decode_attention import choose_num_splits, paged_decode_attention
from deepserve.kernels.paged_prefill_attention import paged_prefill_attention
from deepserve.layers.attention import batched_decode_attention
from deepserve.layers.kv_quant import kv_storage_dtype, quantize_kv

H, H_KV, D, BLOCK = 28, 4, 128, 16
BF16 = torch.bfloat16
SCALE = D ** -0.5


class Paged(NamedTuple):
    kv_cache: torch.Tensor  # [2, N, BLOCK, H_KV, D] bf16, or int8 / float8_e4m3fn
    block_tables: torch.Tensor  # [B, W] int32
    seq_lens: torch.Tensor  # [B] int32
    kv_scales: torch.Tensor | None  # [2, N, BLOCK, H_KV] f32 for an 8-bit cache


def paged_batch(batch: int, ctx: int, kv: str = "auto") -> Paged:
    """Every sequence `ctx` long, its blocks a random permutation of the cache (no locality);
    kv "int8" / "fp8": the cache quantised per token and head."""
    per_seq = triton.cdiv(ctx, BLOCK)
    cache = torch.randn(2, batch * per_seq + 1, BLOCK, H_KV, D, device="cuda", dtype=BF16)
    scales = None
    if kv != "auto":
        cache, scales = quantize_kv(cache, kv_storage_dtype(kv, BF16))
    tables = (torch.randperm(batch * per_seq, device="cuda") + 1).view(batch, per_seq).int()
    return Paged(cache, tables, torch.full((batch,), ctx, dtype=torch.int32, device="cuda"), scales)


def row_bytes(kv: str) -> int:
    """Bytes of one K or V row (token, KV head): D elements (+ a float32 scale when 8-bit)."""
    return D * 2 if kv == "auto" else D + 4


def bench(fn: Callable[[], object]) -> float:
    fn()
    return triton.testing.do_bench(fn, warmup=25, rep=100)


def decode_rows(batches, contexts, with_torch: bool, kv: str = "auto"):
    for batch, ctx in itertools.product(batches, contexts):
        p = paged_batch(batch, ctx, kv)
        q = torch.randn(batch, H, D, device="cuda", dtype=BF16)
        kv_bytes = batch * ctx * H_KV * row_bytes(kv) * 2
        splits = choose_num_splits(batch, H_KV, ctx, torch.cuda.get_device_properties(0).multi_processor_count)
        ms = bench(lambda: paged_decode_attention(q, p.kv_cache, p.block_tables, p.seq_lens, SCALE,
                                                  kv_scales=p.kv_scales))
        row = {"kernel": "decode", "batch": batch, "context": ctx, "splits": splits, "ms": ms,
               "gb_s": kv_bytes / ms / 1e6, "kv_cache_dtype": kv}
        if with_torch and batch * ctx <= 65536:
            tables = p.block_tables.long()
            row["torch_us"] = 1e3 * bench(lambda: batched_decode_attention(q, p.kv_cache, tables, p.seq_lens, SCALE,
                                                                           p.kv_scales))
        yield row
        del p


def sweep_decode(batch: int, ctx: int, kv: str = "auto"):
    """Best (BLOCK_N, warps, stages, splits) for one decode case, by median time."""
    p = paged_batch(batch, ctx, kv)
    q = torch.randn(batch, H, D, device="cuda", dtype=BF16)
    auto = choose_num_splits(batch, H_KV, ctx, torch.cuda.get_device_properties(0).multi_processor_count)
    results = []
    for bn, nw, ns, splits in itertools.product((16, 32, 64, 128), (4, 8), (2, 3), sorted({1, auto, 2 * auto, 64})):
        fn = lambda: paged_decode_attention(q, p.kv_cache, p.block_tables, p.seq_lens, SCALE,
                                            num_splits=min(splits, 128), block_n=bn, num_warps=nw, num_stages=ns,
                                            kv_scales=p.kv_scales)
        results.append((bench(fn), bn, nw, ns, splits))
    ms, bn, nw, ns, splits = min(results)
    kv_bytes = batch * ctx * H_KV * row_bytes(kv) * 2
    return {"kernel": "decode-best", "batch": batch, "context": ctx, "splits": splits, "ms": ms,
            "gb_s": kv_bytes / ms / 1e6, "config": f"BLOCK_N={bn} warps={nw} stages={ns}"}


def prefill_rows(kv: str = "auto"):
    """(context, new tokens) per sequence x sequences: fresh prefills and chunks after a prefix."""
    for ctx, new, seqs in ((2048, 2048, 4), (4096, 512, 8), (8192, 8192, 1)):
        p = paged_batch(seqs, ctx, kv)
        q = torch.randn(seqs * new, H, D, device="cuda", dtype=BF16)
        starts = torch.arange(0, seqs * new + 1, new, device="cuda", dtype=torch.int32)
        # QK^T and PV over the causal region: 2 matmuls * 2 flops * H * D per (query, visible key).
        visible = sum(ctx - new + i + 1 for i in range(new)) * seqs
        flops = 4 * H * D * visible
        for bm, bn, nw in ((64, 64, 4), (128, 64, 8), (128, 32, 8)):
            ms = bench(lambda: paged_prefill_attention(q, p.kv_cache, p.block_tables, starts, p.seq_lens, SCALE,
                                                       block_m=bm, block_n=bn, num_warps=nw, kv_scales=p.kv_scales))
            yield {"kernel": "prefill", "batch": seqs, "context": ctx, "new": new, "ms": ms,
                   "tflop_s": flops / ms / 1e9, "config": f"BLOCK_M={bm} BLOCK_N={bn} warps={nw}"}


def write_rows(kv_dtype: str = "auto"):
    cache = torch.zeros(2, 4096, BLOCK, H_KV, D, device="cuda").to(kv_storage_dtype(kv_dtype, BF16))
    scales = None if kv_dtype == "auto" else torch.zeros(2, 4096, BLOCK, H_KV, device="cuda")
    for tokens in (256, 8192):
        kv = torch.randn(tokens, 2 * H_KV, D, device="cuda", dtype=BF16)
        slots = torch.randperm(4096 * BLOCK, device="cuda")[:tokens]
        ms = bench(lambda: kv_cache_write(cache, kv[:, :H_KV], kv[:, H_KV:], slots, scales))
        moved = kv.numel() * 2 + 2 * tokens * H_KV * row_bytes(kv_dtype)  # read bf16 K/V, write the rows
        yield {"kernel": "kv_write", "batch": tokens, "ms": ms, "gb_s": moved / ms / 1e6, "kv_cache_dtype": kv_dtype}


def print_row(row: dict) -> None:
    extra = {k: v for k, v in row.items() if k not in ("kernel", "batch", "context", "ms")}
    cells = " ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items())
    print(f"{row['kernel']:<12} B={row['batch']:<5} ctx={row.get('context', '-'):<5} {row['ms'] * 1e3:9.1f} us  {cells}",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also search decode configurations")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch-backend decode baseline")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8", "fp8"],
                        help="run every row over a cache of this storage (auto: bf16)")
    parser.add_argument("--json", help="append one JSON line per row to this file")
    args = parser.parse_args()
    meta = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
            "model": "qwen-7b", "dtype": "bf16"}
    kv = args.kv_cache_dtype
    rows = list(decode_rows((1, 32, 256), (512, 2048, 8192), not args.no_torch, kv))
    if args.sweep:
        rows += [sweep_decode(b, c, kv) for b, c in ((1, 8192), (32, 2048), (256, 2048), (256, 8192))]
    rows += list(prefill_rows(kv)) + list(write_rows(kv))
    print(f"{meta['gpu']}  torch {meta['torch']}  triton {meta['triton']}  (H={H} H_kv={H_KV} D={D} block={BLOCK})")
    for row in rows:
        print_row(row)
    for row in rows:
        append_record({**meta, **row}, args.json)  # nothing without --json


if __name__ == "__main__":
    main()
