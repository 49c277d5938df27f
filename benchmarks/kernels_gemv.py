"""GPU micro-benchmark of the decode GEMV (deepserve/kernels/gemv.py) against cuBLAS (F.linear).

For each qwen-7b and V2-Lite linear shape and M in (1, 2, 4), both are timed as CUDA-graph replays
over enough copies of the weight that one replay streams more than 160 MB (at least 4 copies), so the
weights come from HBM and not from the 50 MB L2, as in a decode step; median of 15 replays, divided
by the copies. The GEMV is called as the linear methods call it (static_weight=True: the weights are
built before the graph). GB/s = weight bytes / time. Records go to benchmarks/results/kernels_gemv.jsonl with
one run_id (../shared/BENCHMARKS.md), next to the card's copy bandwidth measured in the same run.

    python benchmarks/kernels_gemv.py [--ms 1,2,4] [--shapes qwen-7b,v2-lite] [--json PATH]
    python benchmarks/kernels_gemv.py --sweep [--sweep-ms 1] [--shapes ...] [--weights bf16|int8]

--sweep times block candidates (GemvConfig: block_n, block_k, split_k, num_warps, maxnreg) per shape (the
gate_up shapes gated, as decode runs them) and prints the best per shape against the table's choice, to refresh
kernels/gemv.py's TABLE. A failing
candidate (compile, launch, capture) is reported and skipped. Compiles are shared by the shapes
(N, K and strides are runtime arguments): ~22 per M swept, ~250 timings. The table ends with the
summed time of these linears per decode step (x layers), gemv against cuBLAS. `--weights int8` sweeps the
W8A16 GEMV instead (int8 weights with float32 row scales, bf16 x; GB/s over the int8 bytes): the table
holds bf16 configs and gemv_config doubles BLOCK_K for int8, which was never swept (W8A16 decode: 55% of
its roofline in run s5e1). `--weights dp4a` sweeps the dp4a W8A16 GEMV (kernels/gemv_dp4a.py, what gemv runs for
int8 weights and bf16 x on NVIDIA GPUs): Dp4aConfig candidates (block_n, num_warps, ahead, maxnreg, blocks), the
records' "kernel" field "dp4a"; `benchmarks/gemv_table.py` picks its TABLE from them. Its pick from run s17d
equals the TABLE in kernels/gemv_dp4a.py except for qwen-7b's o, where the sweep's streaming (4, 4) took 4.784 us
and the table's x-stationary (2, 4, True, None, 2) 4.811 (0.6%, within a call's spread); the table was written
by hand and is what runs s17e/s17f/s18d measured, so it stays.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gemv_bench as a script or imported
import gemv_bench  # noqa: E402
from gemv_bench import (DEVICE, REPO, add_step, checked_err, copy_count, fmt, record, rounded,  # noqa: E402
                        speeds, time_configs, timed_us)

RESULTS = REPO / "benchmarks" / "results" / "kernels_gemv.jsonl"
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
CLI = gemv_bench.Cli(__doc__, RESULTS, models=",".join(SHAPES), models_help="comma-separated models of SHAPES",
                     rows="ms", rows_help="rows of x (decode tokens) for the table",
                     sweep_help="time block candidates per shape instead", sweep_rows="1",
                     sweep_rows_help="rows of x for --sweep", weights=("bf16", "int8", "dp4a"))


def copies_of(k: int, n: int, bias: bool) -> list[tuple]:
    """[(w [N, K] bf16, bias [N] | None)] with more than COLD_BYTES of weights in all."""
    import torch

    count = copy_count(2 * k * n)
    w = (torch.randn(n, k, device=DEVICE) / k ** 0.5).bfloat16()
    b = torch.randn(n, device=DEVICE).bfloat16() if bias else None
    return [(w, b)] + [(w.clone(), None if b is None else b.clone()) for _ in range(count - 1)]


def int8_copies_of(k: int, n: int) -> list[tuple]:
    """[(w [N, K] int8, w_scale [N] f32)] (W8A16) with more than COLD_BYTES of weights in all."""
    import torch

    count = copy_count(k * n)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=DEVICE)
    s = torch.rand(n, device=DEVICE) / (127 * k ** 0.5)
    return [(w, s)] + [(w.clone(), s.clone()) for _ in range(count - 1)]


def cases(models: list[str], ms: list[int], with_bias: bool = True, weights: str = "bf16"):
    """(model, layer, k, n, m, x [m, k] bf16, weight copies) per shape and M, one shape's copies at a time;
    weights "int8" / "dp4a": the copies are (int8 w, f32 row scales)."""
    import torch

    for model in models:
        for layer, (k, n, bias) in SHAPES[model].items():
            copies = int8_copies_of(k, n) if weights != "bf16" else copies_of(k, n, bias and with_bias)
            for m in ms:
                yield model, layer, k, n, m, torch.randn(m, k, device=DEVICE).bfloat16(), copies
            del copies
            torch.cuda.empty_cache()


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
        err = checked_err("gemv", lambda: gemv(x, *copies[0]), lambda: F.linear(x, *copies[0]))
        ours = timed_us(lambda wb: (lambda: gemv(x, *wb, static_weight=True)), copies)
        cublas = timed_us(lambda wb: (lambda: F.linear(x, *wb)), copies)
        s = speeds(2 * n * k, ours, cublas, copy_gbs)
        if s.speedup is not None:
            add_step(step_us, (model, m), PER_STEP.get(model, {}).get(layer, 1), ours, cublas)
        print(f"{model:<8} {layer:<14} {k:6d} {n:7d} {m:2d} {fmt(ours, 8, 2)} {fmt(cublas, 9, 2)} "
              f"{fmt(s.ours_gbs, 9, 0)} {fmt(s.ref_gbs, 11, 0)} {fmt(s.speedup, 7, 2)} {fmt(s.of_copy, 7, 2)}  "
              f"{tuple(cfg)} / {fmt(err, 0, 6)}", flush=True)
        append_record({**record(env, "kernel-gemv", model, layer, m, copies, k=k, n=n),
                       "bias": copies[0][1] is not None, "gemv_us": rounded(ours), "cublas_us": rounded(cublas),
                       "gemv_gbs": s.ours_gbs, "cublas_gbs": s.ref_gbs, "speedup": s.speedup,
                       "gemv_of_copy_bw": s.of_copy, "config": list(cfg), "max_rel_err": err,
                       "notes": f"CUDA-graph replay over {len(copies)} weight copies (> 160 MB, cold L2), "
                                f"median of 15; GB/s = weight bytes / time; of_copy_bw: over the "
                                f"device-to-device copy bandwidth (read + write) of this run"}, result_file)
    for (model, m), (ours, cublas) in step_us.items():
        print(f"{model} M={m}: these linears per decode step (x layers) {ours / 1e3:.3f} ms with gemv, "
              f"{cublas / 1e3:.3f} ms with cuBLAS ({cublas / ours:.3f}x)")


def candidates(m: int, weights: str = "bf16") -> list:
    """GemvConfig candidates: BLOCK_K = VEC * 32 * num_warps (x and weight tiles in one layout: 256 columns
    a warp for bf16, 512 for int8) at several widths, for bf16 a few at half that (one x exchange per
    chunk), splits of the wide tiles, and for int8 register limits (maxnreg 96, 80, 64) of the natural tiles of
    two or more warps. Tiles stay within 64 KB of weight bytes."""
    from deepserve.kernels.gemv import GemvConfig

    per_warp, itemsize = (512, 1) if weights == "int8" else (256, 2)
    warps = (1, 2, 4, 8, 16) if weights == "int8" else (2, 4, 8, 16)
    natural = [(bn, per_warp * w, 1, w) for w in warps for bn in (1, 2, 4, 8, 16, 32)
               if 2 <= bn * w <= 64 and bn * per_warp * w * itemsize <= 65536]
    if weights == "int8":  # and the register limits of run s16c (GemvConfig.maxnreg)
        others = [(4, 4096, 2, 8), (8, 2048, 2, 4), (8, 2048, 4, 4)]
        natural += [(*c, cap) for c in natural for cap in (96, 80, 64) if c[3] >= 2]
    else:
        others = ([(bn, 512, 1, 4) for bn in (8, 16)] + [(bn, 1024, 1, 8) for bn in (4, 8)]
                  + [(4, 2048, 2, 8), (4, 2048, 4, 8), (8, 1024, 2, 4), (8, 1024, 4, 4)])
    block_m = 1 << (m - 1).bit_length()
    return [GemvConfig(*c) for c in dict.fromkeys(natural + others) if block_m * c[0] <= 64]


def dp4a_candidates(m: int, k: int) -> list:
    """Dp4aConfig candidates: block_n x num_warps, register limits on the 4-warp ones, and where K fits two chunks
    the x-stationary kernel with 2 to 8 row blocks a program, with and without `ahead`; BLOCK_M * block_n <= 32
    (the kernel's cap)."""
    from deepserve.kernels.gemv_dp4a import Dp4aConfig, fit_config

    block_m = 1 << (m - 1).bit_length()
    base = [Dp4aConfig(bn, w) for w in (2, 4) for bn in (2, 4, 8, 16) if block_m * bn <= 32]
    capped = [c._replace(maxnreg=cap) for c in base if c.num_warps == 4 and c.block_n in (4, 8) for cap in (64, 96)]
    stationary = [Dp4aConfig(bn, w, p, None, b) for w in (2, 4) for bn in (2, 4, 8) for b in (2, 4, 8)
                  for p in (False, True) if block_m * bn <= 32]
    return base + capped + [c for c in stationary if fit_config(c, m, k).blocks]


def dp4a_sweep(model: str, layer: str, k: int, n: int, m: int, x, copies, env: dict, result_file: str) -> None:
    """One shape's sweep of the dp4a GEMV (kernels/gemv_dp4a.py), gate_up gated."""
    from deepserve.bench.offline import append_record
    from deepserve.kernels.gemv_dp4a import dp4a_config, gemv_dp4a

    gated = layer.endswith("gate_up")

    def call(wb, cfg):  # (w int8, row scales)
        return lambda: gemv_dp4a(x, wb[0], wb[1], None, cfg, static_weight=True, gated=gated)

    timed = time_configs(dp4a_config(m, n, k), dp4a_candidates(m, k),
                         lambda cfg: timed_us(lambda wb: call(wb, cfg), copies))
    if timed is None:
        return
    best_us = timed.times[timed.best]
    gbs = round(n * k / best_us / 1e3, 1)
    print(f"{model:<8} {layer:<14} K={k:<6d} N={n:<7d} M={m}: best {tuple(timed.best)} {best_us:.2f} us "
          f"{gbs:.0f} GB/s; table {tuple(timed.table)} {fmt(timed.table_us, 0, 2)} us | top 3: {timed.top()}",
          flush=True)
    fields = {**record(env, "kernel-gemv-sweep", model, layer, m, copies, k=k, n=n), "quant": "int8-weight-only",
              "kernel": "dp4a"}
    append_record({**fields, **timed.fields("block_n, num_warps, ahead, maxnreg, blocks", best_gbs=gbs)}, result_file)


def usable(cfg, k: int, n: int) -> bool:
    """Skip tiles wider than K or splits of shapes that have many programs anyway."""
    return cfg.block_k <= max(256, 1 << (k - 1).bit_length()) and (cfg.split_k == 1 or n <= 4096)


def sweep(models: list[str], ms: list[int], result_file: str, run_id: str, weights: str = "bf16") -> None:
    import torch

    from deepserve.bench.offline import append_record, environment_fields
    from deepserve.kernels.gemv import gemv, gemv_config

    env = environment_fields(torch.cuda.get_device_name(), run_id)
    int8 = weights == "int8"
    for model, layer, k, n, m, x, copies in cases(models, ms, with_bias=False, weights=weights):
        if weights == "dp4a":
            if layer not in ("lm_head", "router"):  # W8A16 keeps the LM head in bf16; the router has its own kernel
                dp4a_sweep(model, layer, k, n, m, x, copies, env, result_file)
            continue
        table = gemv_config(m, n, k, torch.int8 if int8 else x.dtype)

        gated = layer.endswith("gate_up")  # timed as decode runs it (LinearMethod.apply_gated: SiLU-and-mul fused)

        def call(wb, cfg):  # (w, bias) for bf16, (w int8, row scales) for int8
            return ((lambda: gemv(x, wb[0], None, cfg, w_scale=wb[1], static_weight=True, gated=gated)) if int8
                    else (lambda: gemv(x, *wb, cfg, static_weight=True, gated=gated)))

        timed = time_configs(table, [c for c in candidates(m, weights) if usable(c, k, n)],
                             lambda cfg: timed_us(lambda wb: call(wb, cfg), copies))
        if timed is None:
            continue
        best_us = timed.times[timed.best]
        gbs = round((1 if int8 else 2) * n * k / best_us / 1e3, 1)
        print(f"{model:<8} {layer:<14} K={k:<6d} N={n:<7d} M={m}: best {tuple(timed.best)} {best_us:.2f} us "
              f"{gbs:.0f} GB/s; table {tuple(table)} {fmt(timed.table_us, 0, 2)} us | top 3: {timed.top()}",
              flush=True)
        fields = record(env, "kernel-gemv-sweep", model, layer, m, copies, k=k, n=n)
        if int8:
            fields["quant"] = "int8-weight-only"
        config = "block_n, block_k, split_k, num_warps, maxnreg"
        append_record({**fields, **timed.fields(config, best_gbs=gbs)}, result_file)


def main() -> None:
    gemv_bench.main(CLI, bench, sweep)


if __name__ == "__main__":
    main()
