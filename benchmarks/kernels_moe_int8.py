"""GPU A/B of the fused MoE's W8A16 specialisation (int8 expert stacks + per-row scales) against bf16.

For each batch size T, `fused_moe` on bf16 stacks and on their per-row int8 quantisation (the stacks
`--quantization int8|int8-weight-only` serves on CUDA), bf16 activations, top-k of softmax(random
logits). Each is timed as a CUDA-graph replay over COPIES copies of the stacks with their own
routing (`gpu_quant.time_ms`), so the weights stream from HBM as in a decode step, not from the L2.
GB/s = bytes of the experts the routing touches (+ their scales) / time. `rel err`: max |int8 - bf16|
over max |bf16|, the quantisation's effect (~1.5% at V2-Lite shapes). Both use the config table's
entry for T (int8 reuses the bf16 entries).

    python benchmarks/kernels_moe_int8.py [--shape v2-lite] [--tokens 1,8,64,256] [--json PATH]
    python benchmarks/kernels_moe_int8.py --tune [--tokens 1,64]   # int8: best candidate per T vs the table
    python benchmarks/kernels_moe_int8.py --w8a8 --tokens 256,1024,4096,16384   # + W8A8 (prefill sizes)

--w8a8 adds a third column: the same int8 stacks with the activations quantised per row as well
(`fused_moe(..., int8_activations=True)`, its two `int8_quant` launches included in the time), its
speedup over W8A16 and its rel err against bf16. The sizes where it beats W8A16 decide
`deepserve.quant.int8_experts.W8A8_MIN_TOKENS` (256, from run s6h2's --w8a8 figures).

Records (--json, default benchmarks/results/kernels_moe_int8.jsonl) carry one run_id per run
(../shared/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_quant as a script or imported
from gpu_quant import time_ms  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # deepserve from this checkout
RESULTS = REPO / "benchmarks" / "results" / "kernels_moe_int8.jsonl"
SHAPES = {"v2-lite": (64, 2048, 1408, 6), "v3": (256, 7168, 2048, 8)}  # E, H, I, top-k
COPIES = {"v2-lite": 4, "v3": 1}  # a V3 int8 layer alone is 2.8 GB, far beyond the L2
TOKENS = [1, 8, 64, 256]
DEVICE = "cuda"


def make_case(shape: str, tokens: int, copies: int):
    """copies x (bf16 stacks, int8 stacks + scales), x [T, H] bf16 and per-copy routing."""
    import torch

    from deepserve.quant.int8_experts import quantize_experts_int8

    num_experts, hidden, inter, top_k = SHAPES[shape]
    stacks = []
    for _ in range(copies):
        w13 = (torch.randn(num_experts, 2 * inter, hidden, device=DEVICE) / hidden ** 0.5).bfloat16()
        w2 = (torch.randn(num_experts, hidden, inter, device=DEVICE) / inter ** 0.5).bfloat16()
        stacks.append(((w13, w2), (*quantize_experts_int8(w13), *quantize_experts_int8(w2))))
    x = torch.randn(tokens, hidden, device=DEVICE).bfloat16()
    routes = []
    for _ in range(copies):
        top = torch.randn(tokens, num_experts, device=DEVICE).softmax(dim=-1).topk(top_k, dim=-1)
        routes.append((top.values, top.indices))
    return x, stacks, routes


def touched_bytes(ids, w13, w2, scales: bool) -> int:
    """Bytes of the experts `ids` picks (each read once), with their scale rows for int8."""
    hit = ids.unique().numel()
    per_expert = (w13[0].numel() + w2[0].numel()) * w13.element_size()
    if scales:
        per_expert += (w13.shape[1] + w2.shape[1]) * 4
    return hit * per_expert


def calls(x, stacks, routes, int8: bool, cfg=None, w8a8: bool = False) -> list:
    """One fused_moe call per copy: bf16 stacks, or int8 (W8A16; w8a8: W8A8)."""
    from deepserve.kernels.fused_moe import fused_moe

    out = []
    for ((w13, w2), (q13, s13, q2, s2)), (tw, ti) in zip(stacks, routes):
        if int8:
            out.append(lambda q13=q13, s13=s13, q2=q2, s2=s2, tw=tw, ti=ti:
                       fused_moe(x, q13, q2, tw, ti, cfg, w13_scale=s13, w2_scale=s2, int8_activations=w8a8))
        else:
            out.append(lambda w13=w13, w2=w2, tw=tw, ti=ti: fused_moe(x, w13, w2, tw, ti, cfg))
    return out


def time_w8a8(x, stacks, routes, bf16_out) -> tuple[float, float]:
    """(ms, rel err against bf16) of the W8A8 path on the same int8 stacks."""
    out = calls(x, stacks[:1], routes[:1], True, w8a8=True)[0]()
    err = float((out.float() - bf16_out.float()).abs().max() / bf16_out.float().abs().max())
    return time_ms(calls(x, stacks, routes, True, w8a8=True)), err


def bench(shape: str, tokens_list: list[int], result_file: str, run_id: str | None, w8a8: bool = False) -> None:
    import torch

    from deepserve.bench.offline import append_record, environment_fields
    from deepserve.kernels.fused_moe_configs import get_config

    env = environment_fields(torch.cuda.get_device_name(), run_id)
    print(f"\n{shape} (run {env['run_id']}): {'T':>5s} {'bf16 us':>9s} {'int8 us':>9s} {'speedup':>8s} "
          f"{'bf16 GB/s':>10s} {'int8 GB/s':>10s} {'rel err':>8s}"
          + (f" {'w8a8 us':>9s} {'vs w8a16':>8s} {'w8a8 err':>8s}" if w8a8 else "") + "  config")
    for tokens in tokens_list:
        x, stacks, routes = make_case(shape, tokens, COPIES[shape])
        (w13, w2), (q13, s13, q2, s2) = stacks[0]
        tw, ti = routes[0]
        bf16_out = calls(x, stacks[:1], routes[:1], False)[0]()
        int8_out = calls(x, stacks[:1], routes[:1], True)[0]()
        err = float((int8_out.float() - bf16_out.float()).abs().max() / bf16_out.float().abs().max())
        t_bf16, t_int8 = time_ms(calls(x, stacks, routes, False)), time_ms(calls(x, stacks, routes, True))
        gbs_bf16 = touched_bytes(ti, w13, w2, False) / t_bf16 / 1e6
        gbs_int8 = touched_bytes(ti, q13, q2, True) / t_int8 / 1e6
        cfg = get_config(w13.shape[0], w2.shape[2], torch.bfloat16, tokens, ti.shape[1])
        extra, fields = "", {}
        if w8a8:
            t_w8a8, err_w8a8 = time_w8a8(x, stacks, routes, bf16_out)
            extra = f" {1e3 * t_w8a8:9.1f} {t_int8 / t_w8a8:7.2f}x {err_w8a8:8.1e}"
            fields = {"w8a8_ms": t_w8a8, "w8a8_speedup_vs_w8a16": t_int8 / t_w8a8, "w8a8_rel_err": err_w8a8}
        print(f"{'':{len(shape) + 1}s} {tokens:5d} {1e3 * t_bf16:9.1f} {1e3 * t_int8:9.1f} {t_bf16 / t_int8:7.2f}x "
              f"{gbs_bf16:10.0f} {gbs_int8:10.0f} {err:8.1e}{extra}  {tuple(cfg)}", flush=True)
        append_record({**env, "engine": "deepserve", "engine_version": None, "model": shape,
                       "workload": "kernel-fused-moe-int8", "batch": tokens, "bf16_ms": t_bf16,
                       "int8_ms": t_int8, "speedup": t_bf16 / t_int8, "bf16_gbs": gbs_bf16,
                       "int8_gbs": gbs_int8, "rel_err": err, **fields, "config": cfg._asdict()}, result_file)
        del stacks
        torch.cuda.empty_cache()


def candidates(tokens: int, num_experts: int, top_k: int) -> list:
    """BLOCK_M up to ~4x the mean assignments per expert; BLOCK_K up to 256 (int8 rows are half as many bytes)."""
    from deepserve.kernels.fused_moe_configs import MoeConfig

    per_expert = tokens * top_k / num_experts
    block_ms = [m for m in (16, 32, 64, 128) if m == 16 or m <= 4 * per_expert]
    out = []
    for bm, bn, bk in itertools.product(block_ms, (32, 64, 128), (64, 128, 256)):
        for warps in ((4,) if bm * bn <= 4096 else (4, 8)):
            out.append(MoeConfig(bm, bn, bk, 1 if bm == 16 else 8, warps, 4 if bm == 16 else 3))
    return out


def tune(shape: str, tokens_list: list[int]) -> None:
    import torch
    from triton.runtime.errors import OutOfResources

    from deepserve.kernels.fused_moe_configs import get_config

    num_experts, _, inter, top_k = SHAPES[shape]
    for tokens in tokens_list:
        x, stacks, routes = make_case(shape, tokens, COPIES[shape])
        table = get_config(num_experts, inter, torch.bfloat16, tokens, top_k)
        timed = []
        for cfg in candidates(tokens, num_experts, top_k):
            try:
                timed.append((time_ms(calls(x, stacks, routes, True, cfg)), cfg))
            except OutOfResources:  # shared memory of this GPU
                continue
        best_ms, best = min(timed)
        table_ms = time_ms(calls(x, stacks, routes, True, table))
        print(f"{shape} int8 T={tokens:5d}: best {1e3 * best_ms:.1f} us {tuple(best)}; table "
              f"{1e3 * table_ms:.1f} us {tuple(table)}", flush=True)
        del stacks
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), action="append", help="default: v2-lite")
    parser.add_argument("--tokens", default=None, help=f"comma-separated batch sizes (default {TOKENS})")
    parser.add_argument("--tune", action="store_true", help="int8: time config candidates per T")
    parser.add_argument("--w8a8", action="store_true",
                        help="also time W8A8 (int8 activations) on the int8 stacks (decides W8A8_MIN_TOKENS)")
    parser.add_argument("--json", default=str(RESULTS), help="append one JSON line per case ('' for none)")
    parser.add_argument("--run-id", default=None)
    args = parser.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else TOKENS
    import torch

    with torch.inference_mode():
        for shape in args.shape or ["v2-lite"]:
            tune(shape, tokens) if args.tune else bench(shape, tokens, args.json, args.run_id, args.w8a8)


if __name__ == "__main__":
    main()
