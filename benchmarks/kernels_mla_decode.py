"""GPU micro-benchmark of MLA decode attention at DeepSeek-V2-Lite shapes: the split count's effect.

`mla_decode_attention` (H 16, kv_lora_rank 512, rope 64, bf16, blocks of 16 shuffled over the cache,
q_latent strided as the layer's einsum leaves it) at batch 1 / 8 / 64 / 256 and context 128 / 512 / 2048,
every sequence at that length. Each case runs with the split count of two rules:

  * old: `split_k.choose_num_splits` (~4 waves of programs, >= 128 keys a split), the MLA kernel's
    choice before issue 5;
  * new: `mla_num_splits` (the old rule once batch x head tiles fills the SMs; below that up to one wave
    of splits as short as one BLOCK_N tile);

each from two host lengths: max_seq_len = the context (an eager step, or W-b1's graphs, whose
max_model_len is about the context) and max_seq_len = --graph-len (a CUDA graph captured at a longer
max_model_len: most splits of short sequences are empty). Times are CUDA-graph replays (`time_us`),
split kernel + merge; achieved bandwidth is over the latent cache bytes read (B * ctx * 576 * 2).
`--sweep` adds a batch-1 search over (BLOCK_N, warps, splits). `--json PATH` appends one line per row.

    .venv/bin/python benchmarks/kernels_mla_decode.py [--sweep] [--json benchmarks/results/kernels_mla.jsonl]
"""

from __future__ import annotations

import argparse
import itertools
from typing import NamedTuple

import torch
import triton
import triton.testing

from deepserve.bench.offline import append_record
from deepserve.kernels.mla_decode_attention import mla_decode_attention, mla_num_splits
from deepserve.kernels.split_k import choose_num_splits

H, RANK, ROPE, BLOCK, BLOCK_H, BLOCK_N = 16, 512, 64, 16, 16, 32
BF16 = torch.bfloat16
SCALE = 192 ** -0.5


class Case(NamedTuple):
    q_latent: torch.Tensor  # [B, H, R] bf16, strided like the layer's einsum output
    q_rope: torch.Tensor  # [B, H, Dr] bf16
    kv_cache: torch.Tensor  # [N, BLOCK, R + Dr] bf16
    block_tables: torch.Tensor  # [B, W] int32
    seq_lens: torch.Tensor  # [B] int32


def make_case(batch: int, ctx: int) -> Case:
    """Every sequence `ctx` long, its blocks a random permutation of the cache (no locality)."""
    per_seq = triton.cdiv(ctx, BLOCK)
    cache = torch.randn(batch * per_seq + 1, BLOCK, RANK + ROPE, device="cuda", dtype=BF16)
    tables = (torch.randperm(batch * per_seq, device="cuda") + 1).view(batch, per_seq).int()
    q_latent = torch.randn(H, batch, RANK, device="cuda", dtype=BF16).transpose(0, 1)  # [B, H, R]
    q_rope = torch.randn(batch, H, ROPE, device="cuda", dtype=BF16)
    return Case(q_latent, q_rope, cache, tables, torch.full((batch,), ctx, dtype=torch.int32, device="cuda"))


GRAPH_CALLS = 20  # calls captured per CUDA graph; a replay's time / GRAPH_CALLS is one call


def time_us(case: Case, num_splits: int, **kwargs) -> float:
    """One call's device time (split kernel + merge) as decode runs it: replayed from a CUDA graph
    of GRAPH_CALLS calls (eager do_bench timed the wrapper's host work instead: ~55 us for every
    case on an H200). The latent cache stays in L2 between calls, as one layer's does not."""
    fn = lambda: mla_decode_attention(*case, SCALE, num_splits=num_splits, **kwargs)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_CALLS):
            fn()
    return 1e3 * triton.testing.do_bench(graph.replay, warmup=5, rep=40, return_mode="median") / GRAPH_CALLS


def split_rows(batches, contexts, graph_len: int, sms: int):
    """One row per (batch, context, host length): old and new split counts and their times."""
    tiles = triton.cdiv(H, BLOCK_H)
    for batch, ctx in itertools.product(batches, contexts):
        case = make_case(batch, ctx)
        kv_bytes = batch * ctx * (RANK + ROPE) * 2
        timed: dict[int, float] = {}  # splits -> us, shared by the rows of this case
        for label, longest in (("ctx", ctx), ("graph", max(graph_len, ctx))):
            old = choose_num_splits(batch, tiles, longest, sms)
            new = mla_num_splits(batch, tiles, longest, sms, BLOCK_N)
            for splits in (old, new):
                if splits not in timed:
                    timed[splits] = time_us(case, splits)
            yield {"kernel": "mla_decode", "batch": batch, "context": ctx, "max_seq_len": label, "longest": longest,
                   "old_splits": old, "old_us": timed[old], "new_splits": new, "new_us": timed[new],
                   "speedup": timed[old] / timed[new], "new_gb_s": kv_bytes / timed[new] / 1e3}
        del case


def sweep_batch_1(ctx: int, sms: int):
    """Best (BLOCK_N, warps, splits) at batch 1, by median time, next to the new rule's choice."""
    case = make_case(1, ctx)
    results = []
    for bn, nw in itertools.product((16, 32, 64), (4, 8)):
        by_tile = mla_num_splits(1, 1, ctx, sms, bn)
        for splits in sorted({1, max(1, by_tile // 2), by_tile, min(2 * by_tile, 128)}):
            results.append((time_us(case, splits, block_n=bn, num_warps=nw), bn, nw, splits))
    us, bn, nw, splits = min(results)
    return {"kernel": "mla_decode-best", "batch": 1, "context": ctx, "splits": splits, "us": us,
            "config": f"BLOCK_N={bn} warps={nw}", "rule_us": time_us(case, mla_num_splits(1, 1, ctx, sms, BLOCK_N))}


def print_row(row: dict) -> None:
    cells = " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                     if k not in ("kernel", "batch", "context"))
    print(f"{row['kernel']:<16} B={row['batch']:<4} ctx={row['context']:<5} {cells}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graph-len", type=int, default=8192, help="max_model_len of the 'graph' rows")
    parser.add_argument("--sweep", action="store_true", help="also search batch-1 configurations")
    parser.add_argument("--json", help="append one JSON line per row to this file")
    args = parser.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    meta = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
            "model": "v2-lite", "dtype": "bf16"}
    print(f"{meta['gpu']} ({sms} SMs)  torch {meta['torch']}  triton {meta['triton']}  "
          f"(H={H} R={RANK} Dr={ROPE} block={BLOCK} BLOCK_N={BLOCK_N}; us = split kernel + merge)")
    rows = []
    for row in split_rows((1, 8, 64, 256), (128, 512, 2048), args.graph_len, sms):
        print_row(row)
        rows.append(row)
    if args.sweep:
        for ctx in (128, 512, 2048):
            rows.append(sweep_batch_1(ctx, sms))
            print_row(rows[-1])
    for row in rows:
        append_record({**meta, **row}, args.json)  # nothing without --json


if __name__ == "__main__":
    main()
