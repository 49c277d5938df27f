"""GPU micro-benchmark of the decode GEMV (deepserve/kernels/gemv.py) against cuBLAS (F.linear).

For each qwen-7b and V2-Lite linear shape and M in (1, 2, 4), both are timed as CUDA-graph replays
over enough copies of the weight that one replay streams more than 160 MB (at least 4 copies), so the
weights come from HBM and not from the 50 MB L2, as in a decode step; median of 15 replays, divided
by the copies. GB/s = weight bytes / time. Records go to benchmarks/results/kernels_gemv.jsonl with
one run_id (../shared/BENCHMARKS.md), next to the card's copy bandwidth measured in the same run.

    python benchmarks/kernels_gemv.py [--ms 1,2,4] [--shapes qwen-7b,v2-lite] [--json PATH]
    python benchmarks/kernels_gemv.py --sweep [--sweep-ms 1] [--shapes ...]

--sweep times block candidates (GemvConfig: block_n, block_k, split_k, num_warps) per shape and
prints the best per shape against the table's choice, to refresh kernels/gemv.py's TABLE. A failing
candidate (compile, launch, capture) is reported and skipped. Compiles are shared by the shapes
(N, K and strides are runtime arguments): ~22 per M swept, ~250 timings. The table ends with the
summed time of these linears per decode step (x layers), gemv against cuBLAS.

Not run on a GPU yet: smoke-run on CPU only (interpreter, tiny shapes, timing stubbed).
"""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_dense, gpu_quant as scripts or imported
from gpu_dense import REPO, bandwidth, ceilings  # noqa: E402
from gpu_quant import time_ms  # noqa: E402

sys.path.insert(0, str(REPO))  # deepserve from this checkout
RESULTS = REPO / "benchmarks" / "results" / "kernels_gemv.jsonl"
DEVICE = "cuda"
COLD_BYTES = 160 << 20
MIN_COPIES = 4  # several calls per graph: the graph launch's own latency is spread over them
# model -> layer -> (K, N, bias). V2-Lite's shared experts run inside the fused MoE (not GEMVs); its
# router (N=64) has its own kernel (kernels/router_gemv.py) and is timed here for comparison only.
SHAPES = {
    "qwen-7b": {"qkv": (3584, 4608, True), "o": (3584, 3584, False), "gate_up": (3584, 37888, False),
                "down": (18944, 3584, False), "lm_head": (3584, 152064, False)},
    "v2-lite": {"q_kv_a": (2048, 3648, False), "o": (2048, 2048, False), "dense_gate_up": (2048, 21888, False),
                "dense_down": (10944, 2048, False), "lm_head": (2048, 102400, False), "router": (2048, 64, False)},
}
# calls per decode step (layers; the LM head once; V2-Lite's first layer is its only dense MLP)
PER_STEP = {"qwen-7b": {"qkv": 28, "o": 28, "gate_up": 28, "down": 28, "lm_head": 1},
            "v2-lite": {"q_kv_a": 27, "o": 27, "dense_gate_up": 1, "dense_down": 1, "lm_head": 1, "router": 0}}


def copies_of(k: int, n: int, bias: bool) -> list[tuple]:
    """[(w [N, K] bf16, bias [N] | None)] with more than COLD_BYTES of weights in all."""
    import torch

    count = max(MIN_COPIES, -(-COLD_BYTES // (2 * k * n)))
    w = (torch.randn(n, k, device=DEVICE) / k ** 0.5).bfloat16()
    b = torch.randn(n, device=DEVICE).bfloat16() if bias else None
    return [(w, b)] + [(w.clone(), None if b is None else b.clone()) for _ in range(count - 1)]


def timed_us(make_fn, copies) -> float | None:
    """us per call of make_fn(w, b) over the copies; None (and a message) when it fails."""
    try:
        return 1e3 * time_ms([make_fn(w, b) for w, b in copies])
    except Exception as exc:  # noqa: BLE001 - a compile, launch or capture failure of one candidate
        print(f"    failed: {exc!r}"[:300], file=sys.stderr, flush=True)
        return None


def cases(models: list[str], ms: list[int], with_bias: bool = True):
    """(model, layer, k, n, m, x [m, k] bf16, weight copies) per shape and M, one shape's copies at a time."""
    import torch

    for model in models:
        for layer, (k, n, bias) in SHAPES[model].items():
            copies = copies_of(k, n, bias and with_bias)
            for m in ms:
                yield model, layer, k, n, m, torch.randn(m, k, device=DEVICE).bfloat16(), copies
            del copies
            torch.cuda.empty_cache()


def record(env: dict, workload: str, model: str, layer: str, k: int, n: int, m: int, copies: list) -> dict:
    """The BENCHMARKS.md fields shared by this script's records."""
    return {**env, "engine": "deepserve", "engine_version": None, "model": model, "dtype": "bfloat16",
            "quant": "none", "tp": 1, "pp": 1, "ep": 1, "workload": workload, "batch": m, "layer": layer,
            "k": k, "n": n, "copies": len(copies)}


def rel_err(got, ref) -> float:
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


def bench(models: list[str], ms: list[int], result_file: str, run_id: str, copy_gbs: float | None) -> None:
    import torch
    import torch.nn.functional as F

    from deepserve.bench.offline import append_record, environment_fields
    from deepserve.kernels.gemv import gemv, gemv_config

    env = environment_fields(torch.cuda.get_device_name(), run_id)
    step_us: dict[tuple[str, int], list[float]] = {}  # (model, M) -> [gemv, cuBLAS] us per decode step
    print(f"\n{'model':<8} {'layer':<14} {'K':>6} {'N':>7} {'M':>2} {'gemv us':>8} {'cuBLAS us':>9} "
          f"{'gemv GB/s':>9} {'cuBLAS GB/s':>11} {'speedup':>7} {'of copy':>7}  config / rel err")
    for model, layer, k, n, m, x, copies in cases(models, ms):
        cfg = gemv_config(m, n, k, x.dtype)
        try:
            err = rel_err(gemv(x, *copies[0]), F.linear(x, *copies[0]))
        except Exception as exc:  # noqa: BLE001 - reported; cuBLAS is still timed
            print(f"    gemv failed: {exc!r}"[:300], file=sys.stderr, flush=True)
            err = None
        ours = timed_us(lambda w, b: (lambda: gemv(x, w, b)), copies)
        cublas = timed_us(lambda w, b: (lambda: F.linear(x, w, b)), copies)
        gbs = {name: None if t is None else round(2 * n * k / t / 1e3, 1) for name, t in
               (("gemv", ours), ("cublas", cublas))}
        speedup = None if ours is None or cublas is None else round(cublas / ours, 3)
        if speedup is not None:
            calls = PER_STEP.get(model, {}).get(layer, 1)
            totals = step_us.setdefault((model, m), [0.0, 0.0])
            totals[0], totals[1] = totals[0] + calls * ours, totals[1] + calls * cublas
        share = None if gbs["gemv"] is None or not copy_gbs else round(gbs["gemv"] / copy_gbs, 3)
        print(f"{model:<8} {layer:<14} {k:6d} {n:7d} {m:2d} {_f(ours, 8, 2)} {_f(cublas, 9, 2)} "
              f"{_f(gbs['gemv'], 9, 0)} {_f(gbs['cublas'], 11, 0)} {_f(speedup, 7, 2)} {_f(share, 7, 2)}  "
              f"{tuple(cfg)} / {_f(err, 0, 6)}", flush=True)
        append_record({**record(env, "kernel-gemv", model, layer, k, n, m, copies),
                       "bias": copies[0][1] is not None, "gemv_us": _r(ours), "cublas_us": _r(cublas),
                       "gemv_gbs": gbs["gemv"], "cublas_gbs": gbs["cublas"], "speedup": speedup,
                       "gemv_of_copy_bw": share, "config": list(cfg), "max_rel_err": err,
                       "notes": f"CUDA-graph replay over {len(copies)} weight copies (> 160 MB, cold L2), "
                                f"median of 15; GB/s = weight bytes / time; of_copy_bw: over the "
                                f"device-to-device copy bandwidth (read + write) of this run"}, result_file)
    for (model, m), (ours, cublas) in step_us.items():
        print(f"{model} M={m}: these linears per decode step (x layers) {ours / 1e3:.3f} ms with gemv, "
              f"{cublas / 1e3:.3f} ms with cuBLAS ({cublas / ours:.3f}x)")


def candidates(m: int) -> list:
    """GemvConfig candidates: BLOCK_K = 256 * num_warps (x and weight tiles in one layout) at several
    widths, a few BLOCK_K = 128 * num_warps (one x exchange per chunk), and splits of the wide tiles."""
    from deepserve.kernels.gemv import GemvConfig

    natural = [(bn, 256 * w, 1, w) for w in (2, 4, 8, 16) for bn in (1, 2, 4, 8, 16, 32)
               if 2 <= bn * w <= 64 and bn * 256 * w <= 32768]
    halved = [(bn, 512, 1, 4) for bn in (8, 16)] + [(bn, 1024, 1, 8) for bn in (4, 8)]
    split = [(4, 2048, 2, 8), (4, 2048, 4, 8), (8, 1024, 2, 4), (8, 1024, 4, 4)]
    block_m = 1 << (m - 1).bit_length()
    return [GemvConfig(*c) for c in natural + halved + split if block_m * c[0] <= 64]


def usable(cfg, k: int, n: int) -> bool:
    """Skip tiles wider than K or splits of shapes that have many programs anyway."""
    return cfg.block_k <= max(256, 1 << (k - 1).bit_length()) and (cfg.split_k == 1 or n <= 4096)


def sweep(models: list[str], ms: list[int], result_file: str, run_id: str) -> None:
    import torch

    from deepserve.bench.offline import append_record, environment_fields
    from deepserve.kernels.gemv import gemv, gemv_config

    env = environment_fields(torch.cuda.get_device_name(), run_id)
    for model, layer, k, n, m, x, copies in cases(models, ms, with_bias=False):
        table = gemv_config(m, n, k, x.dtype)
        times = {}
        for cfg in [table] + [c for c in candidates(m) if usable(c, k, n) and c != table]:
            t = timed_us(lambda w, b, cfg=cfg: (lambda: gemv(x, w, b, cfg)), copies)
            if t is not None:
                times[cfg] = t
        if not times:
            continue
        ranked = sorted(times, key=times.get)
        best, table_us = ranked[0], times.get(table)
        gbs = round(2 * n * k / times[best] / 1e3, 1)
        top = ", ".join(f"{tuple(c)} {times[c]:.2f}" for c in ranked[:3])
        print(f"{model:<8} {layer:<14} K={k:<6d} N={n:<7d} M={m}: best {tuple(best)} {times[best]:.2f} us "
              f"{gbs:.0f} GB/s; table {tuple(table)} {_f(table_us, 0, 2)} us | top 3: {top}", flush=True)
        append_record({**record(env, "kernel-gemv-sweep", model, layer, k, n, m, copies),
                       "best_config": list(best), "best_us": _r(times[best]), "best_gbs": gbs,
                       "table_config": list(table), "table_us": _r(table_us),
                       "ranked": [[list(c), _r(times[c])] for c in ranked],
                       "notes": "config = (block_n, block_k, split_k, num_warps); CUDA-graph replays over "
                                "cold weight copies, median of 15"}, result_file)


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def _f(v: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}s}" if v is None else f"{v:{width}.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated models of SHAPES")
    parser.add_argument("--ms", default="1,2,4", help="rows of x (decode tokens) for the table")
    parser.add_argument("--sweep", action="store_true", help="time block candidates per shape instead")
    parser.add_argument("--sweep-ms", default="1", help="rows of x for --sweep")
    parser.add_argument("--json", default=str(RESULTS), help="records are appended here ('' for none)")
    parser.add_argument("--run-id", default=uuid.uuid4().hex[:12])
    args = parser.parse_args()
    import torch

    models = args.shapes.split(",")
    with torch.inference_mode():
        if args.sweep:
            sweep(models, [int(m) for m in args.sweep_ms.split(",")], args.json, args.run_id)
            return
        copy_gbs = None
        if args.json:
            ceilings(args.json, args.run_id)
            copy_gbs = bandwidth(Path(args.json), args.run_id)
            print(f"device-to-device copy: {copy_gbs} GB/s (read + write)")
        bench(models, [int(m) for m in args.ms.split(",")], args.json, args.run_id, copy_gbs)
    print(f"\nrun {args.run_id} -> {args.json or '(not recorded)'}")


if __name__ == "__main__":
    main()
