"""GPU micro-benchmark of the fused MoE kernels against the PyTorch reference, per batch size.

`deepserve.kernels.fused_moe` vs `fused_experts_ref` at the DeepSeek-V2-Lite and V3 expert shapes.

Times are medians of `triton.testing.do_bench` (ms). Bandwidth counts the expert weights the batch
must read once: the experts its routing hits x (2I*H + H*I) x 2 bytes (bf16) / time; decode is
bound by it (H100 SXM: ~3.35 TB/s peak HBM). Routing: top-k of softmax(random logits).

    .venv/bin/python benchmarks/kernels_moe.py [--quick] [--shape v3]
        [--json benchmarks/results/kernels_moe.jsonl]
    .venv/bin/python benchmarks/kernels_moe.py --tune [--shape v2-lite]   # prints CONFIGS entries
    .venv/bin/python benchmarks/kernels_moe.py --layer [--shape v3] [--json ...]
    .venv/bin/python benchmarks/kernels_moe.py --align [--shape v2-lite] [--tokens 1,256]
    .venv/bin/python benchmarks/kernels_moe.py --router [--tune] [--shape v3] [--tokens 1,8] [--json ...]

--layer times a whole routed-expert layer at decode sizes (T = 1, 8, 64): router GEMM + routing +
alignment + fused_moe, the old path (select_experts torch ops, torch-ops alignment, sum + cast)
against the new one (moe_router kernel, Triton alignment, one sum), eager and as a replayed CUDA
graph (what decode runs), plus each piece alone and the CUDA kernels one eager call launches.

--router times the router logits GEMM [T, H] x [E, H]^T -> [T, E] f32 in bf16 at T = 1..32: the
Triton GEMV (`kernels/router_gemv`, which TopKRouter runs for T <= SMALL_T) against
torch.mm(out_dtype=float32), one call's time from a CUDA graph, with the weight hot in L2 (the same
weight every call) and cold (a new copy each call, 64 MB of copies: more than an H200's L2, as
decode sees one layer's gate). err/bound: max |gemv - mm| over twice the float32 accumulation bound
(<= 1 expected). --tune adds a sweep of block sizes per T (cold times) and prints the best.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F
import triton
import triton.testing
from triton.runtime.errors import OutOfResources

from deepserve.kernels import fused_moe as fused_moe_module
from deepserve.kernels.fused_moe import fused_moe, fused_moe_ref
from deepserve.kernels.fused_moe_configs import MoeConfig, get_config
from deepserve.kernels.moe_align import moe_align_block_size_torch, moe_align_block_size_triton
from deepserve.kernels.moe_router import moe_router
from deepserve.kernels.router_gemv import GemvConfig, gemv_config, router_logits
from deepserve.layers.moe import SMALL_T, RouterConfig, select_experts

BF16 = torch.bfloat16
# E, H, I, top-k. "-shared": the shared experts folded in as always-chosen extra experts (ids E-n..E-1)
SHAPES = {"v2-lite": (64, 2048, 1408, 6), "v3": (256, 7168, 2048, 8),
          "v2-lite-shared": (66, 2048, 1408, 8), "v3-shared": (257, 7168, 2048, 9)}
SHARED = {"v2-lite-shared": 2, "v3-shared": 1}
TOKENS = [1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096]
QUICK_TOKENS = [1, 32, 256, 1024]
LAYER_TOKENS = [1, 8, 64]
ROUTERS = {  # the checkpoints' routing: V2-Lite greedy softmax; V3 sigmoid + bias, 8 groups, top-4
    "v2-lite": RouterConfig(num_experts=64, top_k=6),
    "v3": RouterConfig(num_experts=256, top_k=8, scoring_func="sigmoid", topk_method="noaux_tc",
                       n_group=8, topk_group=4, norm_topk_prob=True, routed_scaling_factor=2.5),
}


def make_inputs(shape: str, tokens: int, weights: tuple | None = None):
    """(x [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_weights [T, k] f32, topk_ids [T, k]) on cuda."""
    num_experts, hidden, inter, top_k = SHAPES[shape]
    if weights is None:
        weights = (torch.randn(num_experts, 2 * inter, hidden, dtype=BF16, device="cuda") / hidden ** 0.5,
                   torch.randn(num_experts, hidden, inter, dtype=BF16, device="cuda") / inter ** 0.5)
    x = torch.randn(tokens, hidden, dtype=BF16, device="cuda")
    shared = SHARED.get(shape, 0)
    routed = num_experts - shared
    topk = torch.randn(tokens, routed, device="cuda").softmax(dim=-1).topk(top_k - shared, dim=-1)
    if not shared:
        return x, *weights, topk.values, topk.indices
    fixed = torch.arange(routed, num_experts, device="cuda").expand(tokens, shared)
    ones = torch.ones(tokens, shared, device="cuda")
    return x, *weights, torch.cat([topk.values, ones], 1), torch.cat([topk.indices, fixed], 1)


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
    for bm, bn, bk in itertools.product(block_ms, (32, 64, 128), (64, 128)):
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


# --- whole routed-expert layer at decode sizes: old torch-ops glue vs the new kernels ----------

def fused_moe_old(x, w13, w2, topk_weights, topk_ids):
    """fused_moe as it was before the Triton alignment: torch-ops alignment, sum(f32) + cast."""
    num_tokens, hidden = x.shape
    num_experts, inter, top_k = w13.shape[0], w2.shape[2], topk_ids.shape[1]
    cfg = get_config(num_experts, inter, x.dtype, num_tokens, top_k)
    align = moe_align_block_size_torch(topk_ids, num_experts, cfg.block_m)
    num_valid = num_tokens * top_k
    act = torch.empty(num_valid, inter, dtype=x.dtype, device=x.device)
    fused_moe_module._launch(x, w13, act, topk_weights, align, num_valid, top_k, True, cfg)
    out = torch.empty(num_valid, hidden, dtype=x.dtype, device=x.device)
    fused_moe_module._launch(act, w2, out, topk_weights, align, num_valid, 1, False, cfg)
    return out.view(num_tokens, top_k, hidden).sum(dim=1, dtype=torch.float32).to(x.dtype)


def layer_paths(cfg: RouterConfig, gate_w, bias, w13, w2):
    """{'old': fn(x), 'new': fn(x)}: router GEMM + routing + routed experts, [T, H] -> [T, H]."""
    def old(x):
        routing = select_experts(F.linear(x.float(), gate_w), cfg, bias)
        return fused_moe_old(x, w13, w2, *routing)

    def new(x):
        return fused_moe(x, w13, w2, *moe_router(F.linear(x.float(), gate_w), cfg, bias))

    return {"old": old, "new": new}


def graph_ms(fn, x) -> float:
    """Replay time of `fn(x)` captured in a CUDA graph."""
    fn(x)  # compile outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(x)
    return triton.testing.do_bench(graph.replay)


def count_kernels(fn) -> int:
    """CUDA kernels (and memsets/copies) one eager call launches."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def bench_layer(shape: str, out_json: str | None) -> None:
    num_experts, hidden, inter, top_k = SHAPES[shape]
    cfg = ROUTERS[shape]
    gate_w = torch.randn(num_experts, hidden, device="cuda") / hidden ** 0.5
    bias = torch.randn(num_experts, device="cuda") * 0.1 if cfg.topk_method == "noaux_tc" else None
    w13 = torch.randn(num_experts, 2 * inter, hidden, dtype=BF16, device="cuda") / hidden ** 0.5
    w2 = torch.randn(num_experts, hidden, inter, dtype=BF16, device="cuda") / inter ** 0.5
    paths = layer_paths(cfg, gate_w, bias, w13, w2)
    print(f"\n{shape} layer (us): {'T':>4s} {'path':>4s} {'route':>7s} {'align':>7s} {'eager':>8s} "
          f"{'graph':>8s} {'kernels':>8s}  rel err vs old")
    for tokens in LAYER_TOKENS:
        x = torch.randn(tokens, hidden, dtype=BF16, device="cuda")
        logits = F.linear(x.float(), gate_w)
        ids = moe_router(logits, cfg, bias).ids
        block_m = get_config(num_experts, inter, BF16, tokens, top_k).block_m
        pieces = {"old": (lambda: select_experts(logits, cfg, bias),
                          lambda: moe_align_block_size_torch(ids, num_experts, block_m)),
                  "new": (lambda: moe_router(logits, cfg, bias),
                          lambda: moe_align_block_size_triton(ids, num_experts, block_m))}
        ref = paths["old"](x)
        for name, fn in paths.items():
            route_fn, align_fn = pieces[name]
            row = dict(shape=shape, tokens=tokens, path=name,
                       route_us=1e3 * triton.testing.do_bench(route_fn),
                       align_us=1e3 * triton.testing.do_bench(align_fn),
                       eager_us=1e3 * triton.testing.do_bench(lambda: fn(x)),
                       graph_us=1e3 * graph_ms(fn, x), kernels=count_kernels(lambda: fn(x)),
                       rel_err=max_rel_err(fn(x), ref), device=torch.cuda.get_device_name())
            print(f"{'':{len(shape) + 12}s} {tokens:4d} {name:>4s} {row['route_us']:7.1f} "
                  f"{row['align_us']:7.1f} {row['eager_us']:8.1f} {row['graph_us']:8.1f} "
                  f"{row['kernels']:8d}  {row['rel_err']:.1e}", flush=True)
            if out_json:
                with open(out_json, "a") as f:
                    f.write(json.dumps(dict(row, bench="kernels_moe_layer")) + "\n")


ALIGN_TOKENS = (1, 8, 64, 128, 256, 512, 1024, 8192)


def align_variants(n: int) -> dict[str, dict[str, int]]:
    """moe_align_block_size_triton keyword sets to compare for n assignments: one launch (where
    n fits a 4096-key sort) and two launches at several chunk sizes."""
    out = {"single": dict(single_max=n)} if n <= 4096 else {}
    for chunk in (64, 128, 256, 512, 1024):
        if chunk < n:
            out[f"two/{chunk}"] = dict(single_max=0, chunk=chunk)
    return out


def bench_align(shape: str, tokens_list: list[int]) -> None:
    """Graph-replay time (us) of the alignment per variant and batch size; checks each variant's
    output against the torch-ops path."""
    num_experts, _, inter, top_k = SHAPES[shape]
    print(f"\n{shape} moe_align (us, CUDA-graph replay):")
    for tokens in tokens_list:
        logits = torch.randn(tokens, num_experts, device="cuda")
        ids = logits.topk(top_k, dim=-1).indices
        block_m = get_config(num_experts, inter, BF16, tokens, top_k).block_m
        ref = moe_align_block_size_torch(ids, num_experts, block_m)
        cells = []
        for name, kw in align_variants(tokens * top_k).items():
            out = moe_align_block_size_triton(ids, num_experts, block_m, **kw)
            used = int(ref.num_tokens_post_padded)
            same = (torch.equal(out.sorted_ids[:used], ref.sorted_ids[:used])
                    and torch.equal(out.expert_ids[:used // block_m], ref.expert_ids[:used // block_m])
                    and int(out.num_tokens_post_padded) == used)
            us = 1e3 * graph_ms(lambda t: moe_align_block_size_triton(t, num_experts, block_m, **kw), ids)
            cells.append(f"{name} {us:6.1f}{'' if same else ' MISMATCH'}")
        print(f"  T={tokens:5d} n={tokens * top_k:6d} bm={block_m:3d}: " + " | ".join(cells), flush=True)


# --- router logits at decode sizes: the Triton GEMV vs cuBLAS mm(out_dtype=float32) -----------

ROUTER_TOKENS = (1, 2, 4, 8, 16, 32)
ROUTER_SHAPES = {"v2-lite": (64, 2048), "v3": (256, 7168)}  # the gate: E, H
GRAPH_CALLS = 20  # calls per CUDA graph at least; a replay's time / calls is one call
COLD_BYTES = 64 << 20  # weight copies cycled through in a cold graph: more than the L2


def graph_us_per_call(calls: list) -> float:
    """Device time (us) of one of `calls` (zero-argument functions), all captured in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        calls[0]()  # compile / initialise outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    return 1e3 * triton.testing.do_bench(graph.replay, warmup=5, rep=40, return_mode="median") / len(calls)


def hot_and_cold_us(fn, weights: list[torch.Tensor]) -> tuple[float, float]:
    """fn(w) per call: the same weight GRAPH_CALLS times (L2-hot), then each copy once (cold)."""
    hot = graph_us_per_call([lambda: fn(weights[0])] * GRAPH_CALLS)
    return hot, graph_us_per_call([lambda w=w: fn(w) for w in weights])


def router_candidates(tokens: int, hidden: int) -> list[GemvConfig]:
    """Block sizes to sweep: up to next_power_of_2(T) tokens a program, <= 16384 products a chunk,
    <= 16 chunks."""
    out = []
    for bt, be, bh, warps in itertools.product((1, 2, 4, 8), (1, 2, 4, 8), (512, 1024, 2048, 4096), (4, 8)):
        if (bt <= triton.next_power_of_2(tokens) and bh <= triton.next_power_of_2(hidden)
                and bt * be * bh <= 16384 and triton.cdiv(hidden, bh) <= 16):
            out.append(GemvConfig(bt, be, bh, warps))
    return out


def bench_router(shape: str, tokens_list, out_json: str | None, tune: bool) -> None:
    experts, hidden = ROUTER_SHAPES[shape.removesuffix("-shared")]
    w = (torch.randn(experts, hidden, device="cuda") / hidden ** 0.5).to(BF16)
    weights = [w] + [w.clone() for _ in range(max(GRAPH_CALLS, -(-COLD_BYTES // (w.numel() * 2))) - 1)]
    print(f"\n{shape} router logits E={experts} H={hidden} bf16 (us per call, CUDA graph; gemv for T <= "
          f"{SMALL_T} in TopKRouter):\n  {'T':>3s} {'gemv hot':>9s} {'mm hot':>7s} {'gemv cold':>10s} "
          f"{'mm cold':>8s} {'speedup':>8s} {'GB/s':>6s} {'err/bound':>9s}  config")
    for tokens in tokens_list:
        x = torch.randn(tokens, hidden, device="cuda").to(BF16)
        mm = lambda w_: torch.mm(x, w_.t(), out_dtype=torch.float32)  # noqa: E731
        bound = 2 * (hidden + 1) * 2.0 ** -24 * (x.double().abs() @ w.double().abs().t())
        err = ((router_logits(x, w).double() - mm(w).double()).abs() / bound).max().item()
        gemv_hot, gemv_cold = hot_and_cold_us(lambda w_: router_logits(x, w_), weights)
        mm_hot, mm_cold = hot_and_cold_us(mm, weights)
        row = dict(bench="kernels_moe_router", shape=shape, experts=experts, hidden=hidden, tokens=tokens,
                   gemv_hot_us=gemv_hot, mm_hot_us=mm_hot, gemv_cold_us=gemv_cold, mm_cold_us=mm_cold,
                   gemv_cold_gbps=(w.numel() + x.numel()) * 2 / gemv_cold / 1e3, err_over_bound=err,
                   config=gemv_config(tokens, experts, hidden)._asdict(), device=torch.cuda.get_device_name())
        print(f"  {tokens:3d} {gemv_hot:9.2f} {mm_hot:7.2f} {gemv_cold:10.2f} {mm_cold:8.2f} "
              f"{mm_cold / gemv_cold:7.2f}x {row['gemv_cold_gbps']:6.0f} {err:9.2e}  {tuple(row['config'].values())}",
              flush=True)
        if tune:
            row["tune"] = tune_router(x, weights, row["config"])
        if out_json:
            with open(out_json, "a") as f:
                f.write(json.dumps(row) + "\n")


def tune_router(x: torch.Tensor, weights: list[torch.Tensor], default: dict) -> list[dict]:
    """Cold time of each candidate config; prints the three best and the default's rank."""
    configs = router_candidates(x.shape[0], x.shape[1])
    configs += [GemvConfig(**default)] if GemvConfig(**default) not in configs else []
    times = []
    for cfg in configs:
        try:
            times.append((hot_and_cold_us(lambda w_: router_logits(x, w_, cfg), weights)[1], cfg))
        except OutOfResources:
            continue
    times.sort()
    rank = next(i for i, (_, cfg) in enumerate(times) if cfg._asdict() == default)
    best = "  ".join(f"{us:.2f} {tuple(cfg)}" for us, cfg in times[:3])
    print(f"      tune: {best}  (default ranks {rank + 1} of {len(times)})", flush=True)
    return [dict(cfg._asdict(), cold_us=us) for us, cfg in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer batch sizes")
    parser.add_argument("--shape", choices=list(SHAPES), action="append", help="default: all")
    parser.add_argument("--tune", action="store_true", help="sweep configs, print the best per batch size")
    parser.add_argument("--layer", action="store_true",
                        help="router + align + fused_moe at decode sizes, old torch-ops path vs new kernels")
    parser.add_argument("--align", action="store_true", help="time moe_align: one launch vs two, chunk sizes")
    parser.add_argument("--router", action="store_true", help="router logits: Triton GEMV vs torch.mm, T = 1..32")
    parser.add_argument("--json", default=None, help="append one JSON line per case to this file")
    parser.add_argument("--tokens", default=None, help="comma-separated batch sizes (default: the built-in list)")
    args = parser.parse_args()
    tokens = QUICK_TOKENS if args.quick else TOKENS
    if args.tokens:
        tokens = [int(t) for t in args.tokens.split(",")]
    with torch.inference_mode():
        for shape in args.shape or list(ROUTERS):
            if args.router:
                bench_router(shape, [int(t) for t in args.tokens.split(",")] if args.tokens else ROUTER_TOKENS,
                             args.json, args.tune)
            elif args.align:
                bench_align(shape, [int(t) for t in args.tokens.split(",")] if args.tokens else ALIGN_TOKENS)
            elif args.layer:
                bench_layer(shape, args.json)
            elif args.tune:
                tune(shape, tokens)
            else:
                bench(shape, tokens, args.json)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
