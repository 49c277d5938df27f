"""GPU micro-benchmark of the fused MoE kernels against the PyTorch reference, per batch size.

`deepserve.kernels.fused_moe` vs `fused_experts_ref` at the DeepSeek-V2-Lite and V3 expert shapes.

Times are medians of `triton.testing.do_bench` (ms). Bandwidth counts the expert weights the batch
must read once: the experts its routing hits x (2I*H + H*I) x 2 bytes (bf16) / time; decode is
bound by it (H100 SXM: ~3.35 TB/s peak HBM). Routing: top-k of softmax(random logits).

    .venv/bin/python benchmarks/kernels_moe.py [--quick] [--shape v3]
        [--json benchmarks/results/kernels_moe.jsonl]
    .venv/bin/python benchmarks/kernels_moe.py --tune [--shape v2-lite]   # prints CONFIGS entries
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import triton
import triton.testing
from triton.runtime.errors import OutOfResources

from deepserve.kernels.fused_moe import fused_moe, fused_moe_ref
from deepserve.kernels.fused_moe_configs import MoeConfig, get_config

BF16 = torch.bfloat16
SHAPES = {"v2-lite": (64, 2048, 1408, 6), "v3": (256, 7168, 2048, 8)}  # E, H, I, top-k
TOKENS = [1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096]
QUICK_TOKENS = [1, 32, 256, 1024]


def make_inputs(shape: str, tokens: int, weights: tuple | None = None):
    """(x [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_weights [T, k] f32, topk_ids [T, k]) on cuda."""
    num_experts, hidden, inter, top_k = SHAPES[shape]
    if weights is None:
        weights = (torch.randn(num_experts, 2 * inter, hidden, dtype=BF16, device="cuda") / hidden ** 0.5,
                   torch.randn(num_experts, hidden, inter, dtype=BF16, device="cuda") / inter ** 0.5)
    x = torch.randn(tokens, hidden, dtype=BF16, device="cuda")
    topk = torch.randn(tokens, num_experts, device="cuda").softmax(dim=-1).topk(top_k, dim=-1)
    return x, *weights, topk.values, topk.indices


def weight_bytes(w13: torch.Tensor, w2: torch.Tensor, ids: torch.Tensor) -> int:
    """Bytes of the expert weights this routing touches (each hit expert read once)."""
    hit = ids.unique().numel()
    return hit * (w13[0].numel() + w2[0].numel()) * w13.element_size()


def max_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def bench(shape: str, tokens_list: list[int], out_json: str | None) -> None:
    print(f"\n{shape}: {'T':>6s} {'fused ms':>9s} {'ref ms':>9s} {'speedup':>8s} {'fused GB/s':>11s} "
          f"{'ref GB/s':>9s} {'rel err':>8s}  config")
    weights = None
    for tokens in tokens_list:
        x, w13, w2, tw, ti = make_inputs(shape, tokens, weights)
        weights = (w13, w2)
        cfg = get_config(w13.shape[0], w2.shape[2], BF16, tokens, ti.shape[1])
        err = max_rel_err(fused_moe(x, w13, w2, tw, ti), fused_moe_ref(x, w13, w2, tw, ti))
        t_fused = triton.testing.do_bench(lambda: fused_moe(x, w13, w2, tw, ti))
        t_ref = triton.testing.do_bench(lambda: fused_moe_ref(x, w13, w2, tw, ti))
        nbytes = weight_bytes(w13, w2, ti)
        row = dict(shape=shape, tokens=tokens, fused_ms=t_fused, ref_ms=t_ref,
                   fused_gbps=nbytes / t_fused / 1e6, ref_gbps=nbytes / t_ref / 1e6, rel_err=err,
                   config=cfg._asdict(), device=torch.cuda.get_device_name())
        print(f"{'':{len(shape) + 1}s} {tokens:6d} {t_fused:9.4f} {t_ref:9.4f} {t_ref / t_fused:7.2f}x "
              f"{row['fused_gbps']:11.0f} {row['ref_gbps']:9.0f} {err:8.1e}  {tuple(cfg)}", flush=True)
        if out_json:
            with open(out_json, "a") as f:
                f.write(json.dumps(row) + "\n")


def candidates(tokens: int, num_experts: int, top_k: int) -> list[MoeConfig]:
    """A small sweep: BLOCK_M no larger than ~4x the mean assignments per expert."""
    per_expert = tokens * top_k / num_experts
    block_ms = [m for m in (16, 32, 64, 128) if m == 16 or m <= 4 * per_expert]
    out = []
    for bm, bn, bk in itertools.product(block_ms, (64, 128), (64, 128)):
        for warps in ((4,) if bm * bn <= 4096 else (4, 8)):
            out.append(MoeConfig(bm, bn, bk, 1 if bm == 16 else 8, warps, 4 if bm == 16 else 3))
    return out


def time_config(x, w13, w2, tw, ti, cfg: MoeConfig) -> float:
    try:
        return triton.testing.do_bench(lambda: fused_moe(x, w13, w2, tw, ti, cfg))
    except OutOfResources:  # shared memory of this GPU
        return float("inf")


def tune(shape: str, tokens_list: list[int]) -> None:
    num_experts, _, inter, top_k = SHAPES[shape]
    best: dict[int, MoeConfig] = {}
    weights = None
    for tokens in tokens_list:
        x, w13, w2, tw, ti = make_inputs(shape, tokens, weights)
        weights = (w13, w2)
        configs = candidates(tokens, num_experts, top_k)
        t_best, cfg = min((time_config(x, w13, w2, tw, ti, c), c) for c in configs)
        err = max_rel_err(fused_moe(x, w13, w2, tw, ti, cfg), fused_moe_ref(x, w13, w2, tw, ti))
        default_ms = triton.testing.do_bench(lambda: fused_moe(x, w13, w2, tw, ti))
        print(f"{shape} T={tokens:5d}: best {t_best:.4f} ms {tuple(cfg)} (table now {default_ms:.4f} ms, "
              f"rel err {err:.1e})", flush=True)
        best[tokens] = cfg
    entries = ", ".join(f"{t}: MoeConfig{tuple(c)}" for t, c in best.items())
    print(f"\n    ({num_experts}, {inter}, \"bfloat16\"): {{{entries}}},  # {torch.cuda.get_device_name()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer batch sizes")
    parser.add_argument("--shape", choices=list(SHAPES), action="append", help="default: all")
    parser.add_argument("--tune", action="store_true", help="sweep configs, print the best per batch size")
    parser.add_argument("--json", default=None, help="append one JSON line per case to this file")
    args = parser.parse_args()
    tokens = QUICK_TOKENS if args.quick else TOKENS
    with torch.inference_mode():
        for shape in args.shape or list(SHAPES):
            if args.tune:
                tune(shape, tokens)
            else:
                bench(shape, tokens, args.json)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
