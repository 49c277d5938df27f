"""INT8 / FP8 linear methods and 8-bit KV caches on one GPU, in one call: (a) GEMM microbenchmarks at
the qwen-7b linear shapes against bf16 cuBLAS, and the per-M backend choice they imply; (b) deepserve
W-b1 and W-offline on qwen-7b (dummy weights) for each --quantization x --kv-cache-dtype; (c) with
a non-auto KV dtype, the KV blocks each --kv-cache-dtype gets at start-up (max_model_len 32768,
256 sequences, so the count is the memory's, not what the sequences can use). The engine figures
are appended to benchmarks/results/gpu.jsonl, the kernel timings to
benchmarks/results/gpu_quant_kernels.jsonl, all with one run_id (../shared/BENCHMARKS.md); tables
are printed at the end.

    python benchmarks/gpu_quant.py [--budget-s 360] [--methods none,int8,int8-weight-only,fp8]
                                   [--kv-cache-dtypes auto,fp8,int8] [--skip-b1] [--offline-arg ARG]
                                   [--ms 1,16,64,256,2048,8192] [--skip-kernels] [--skip-engine]
                                   [--tune] [--result-file PATH] [--kernel-file PATH]

8-bit KV caches alone (W-offline + block counts, about 5-6 minutes):
    python benchmarks/gpu_quant.py --skip-kernels --skip-b1 --methods none --kv-cache-dtypes auto,fp8,int8 \
        --budget-s 570

(a) For each linear of a qwen-7b layer (qkv 3584->4608, gate_up 3584->37888, o 3584->3584,
down 18944->3584) and each M: bf16 F.linear (cuBLAS), W8A8 with the Triton GEMM and with
torch._int_mm + epilogue (both including the activation quantisation), W8A16 Triton (symmetric and
with zero points) and dequantise + cuBLAS, FP8 torch._scaled_mm (including its activation
quantisation), and the halves alone (int8-quant / fp8-quant, w8a8-gemm / fp8-gemm). Each time is a
CUDA-graph replay (no Python launch cost, as in a captured decode step) over enough copies of the
weights that they come from HBM, not from the L2, as a real layer's do; median of 15 replays. It prints the W8A8_BACKENDS / W8A16_BACKENDS
tables for deepserve/quant/int8_cuda.py (per M, the backend with the least time summed over the four
linears). `--tune` also times a few Triton block configurations per M and prints CONFIGS tables
for kernels/int8_gemm.py and kernels/w8a16_gemm.py, and each linear's best as SHAPE_CONFIGS lines;
`--tune-shapes v2-lite` tunes V2-Lite's linears outside the fused MoE instead.
(b) `python -m deepserve.bench.offline latency|throughput --model qwen-7b --load-format dummy
--quantization X`; W-b1 runs first for every method (the cheaper figures), then W-offline.
Records of a non-auto KV cache say `kv_cache_dtype=...` in their notes (and num_kv_blocks, as all).
Steps run in child processes with deadlines from what is left of --budget-s; a step that would not
fit is skipped and says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import uuid
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_dense, run as a script or imported
from gpu_dense import REPO, RESULTS, Budget, _num, bandwidth, records, run_step  # noqa: E402

sys.path.insert(0, str(REPO))  # deepserve from this checkout
KERNEL_RESULTS = RESULTS.parent / "gpu_quant_kernels.jsonl"
SHAPES = {"qkv": (3584, 4608), "gate_up": (3584, 37888), "o": (3584, 3584), "down": (18944, 3584)}
# --tune-shapes: the linears (K, N) whose GEMMs --tune times. v2-lite's int8 linears outside the fused MoE:
# q_proj and kv_a_proj_with_mqa merged (one GEMM under int8 since 02f1c8f; "q" and "kv_a" are the shapes before
# it), o_proj, kv_b_proj (prefill's MLA expansion) and the 2 shared experts, which stay a separate MLP under int8
# (docs/design.md, MoE backend)
TUNE_SHAPES = {"qwen-7b": SHAPES,
               "v2-lite": {"q_kv_a": (2048, 3648), "q": (2048, 3072), "kv_a": (2048, 576), "o": (2048, 2048),
                           "kv_b": (512, 4096),
                           "shared_gate_up": (2048, 5632), "shared_down": (2816, 2048)}}
VARIANTS = ("bf16", "w8a8-triton", "w8a8-int_mm", "w8a16-triton", "w8a16-asym-triton", "w8a16-dequant", "fp8",
            "fp8-triton", "int8-quant", "w8a8-gemm", "fp8-quant", "fp8-gemm")
# fp8-triton: fp8_quant + kernels/fp8_gemm (the int8 GEMM kernel on e4m3); the last four: the two halves
# of W8A8 (Triton) and FP8 (_scaled_mm)
CHOICES = {"W8A8_BACKENDS": {"triton": "w8a8-triton", "int_mm": "w8a8-int_mm"},
           "W8A16_BACKENDS": {"triton": "w8a16-triton", "dequant": "w8a16-dequant"}}
B1_FAST = ["--num-iters", "3", "--num-iters-warmup", "1", "--max-graph-batch-size", "16"]


# ------------------------------------------------------------------------------- (a) kernels


def time_ms(fns, reps: int = 15) -> float:
    """ms of one call: `fns` (one callable per copy of the weights, together more bytes than the L2)
    captured back to back in one CUDA graph, the median of `reps` CUDA-event timed replays divided by
    len(fns). Graph replay is what a decode step pays (no Python launch cost); the copies make each
    call read its weights from HBM, as a layer of a real model does."""
    import torch

    fns = list(fns)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm outside the capture
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events) / len(fns)


def weight_copies(k: int, n: int, cold_bytes: int = 160 << 20) -> list[dict]:
    """Enough copies of one layer's weights (all formats) that cycling through them streams at least
    `cold_bytes` of int8 weights, i.e. more than the L2 (50 MB on an H100 / H200)."""
    first = make_weights(k, n)
    copies = max(1, -(-cold_bytes // (k * n)))
    return [first] + [{name: t.clone() for name, t in first.items()} for _ in range(copies - 1)]


def make_weights(k: int, n: int) -> dict:
    import torch

    from deepserve.quant.fp8 import quantize_weight_fp8_ref
    from deepserve.quant.int8 import quantize_per_channel_ref

    w = (torch.randn(n, k, device="cuda") / k ** 0.5).bfloat16()
    q, s, _ = quantize_per_channel_ref(w)
    qa, sa, zp = quantize_per_channel_ref(w, symmetric=False)
    f8, f8s = quantize_weight_fp8_ref(w)
    return {"w": w, "q": q.contiguous(), "s": s, "qa": qa.contiguous(), "sa": sa, "zp": zp.float(),
            "f8": f8.contiguous(), "f8s": f8s}


def variant_fns(wt: dict, x) -> dict:
    import torch
    import torch.nn.functional as F

    from deepserve.kernels.fp8_gemm import fp8_gemm
    from deepserve.kernels.fp8_quant import fp8_quant
    from deepserve.kernels.int8_gemm import int8_gemm
    from deepserve.kernels.int8_quant import int8_quant
    from deepserve.quant.fp8 import fp8_scaled_mm
    from deepserve.quant.int8_cuda import w8a8_linear, w8a16_linear

    xq, xs, _ = int8_quant(x)
    fq, fs = fp8_quant(x)
    return {"bf16": lambda: F.linear(x, wt["w"]),
            "w8a8-triton": lambda: w8a8_linear(x, wt["q"], wt["s"], None, "triton"),
            "w8a8-int_mm": lambda: w8a8_linear(x, wt["q"], wt["s"], None, "int_mm"),
            "w8a16-triton": lambda: w8a16_linear(x, wt["q"], wt["s"], None, None, "triton"),
            "w8a16-asym-triton": lambda: w8a16_linear(x, wt["qa"], wt["sa"], wt["zp"], None, "triton"),
            "w8a16-dequant": lambda: w8a16_linear(x, wt["q"], wt["s"], None, None, "dequant"),
            "fp8": lambda: fp8_scaled_mm(x, wt["f8"], wt["f8s"], None, fast_accum=True),  # what "fp8" runs
            "fp8-exact-accum": lambda: fp8_scaled_mm(x, wt["f8"], wt["f8s"], None, fast_accum=False),
            "fp8-triton": lambda: fp8_gemm(*fp8_quant(x), wt["f8"], wt["f8s"], None, torch.bfloat16),
            "int8-quant": lambda: int8_quant(x),
            "w8a8-gemm": lambda: int8_gemm(xq, xs, wt["q"], wt["s"], None, torch.bfloat16),
            "fp8-quant": lambda: fp8_quant(x),
            "fp8-gemm": lambda: torch._scaled_mm(fq, wt["f8"].t(), scale_a=fs[:, None], scale_b=wt["f8s"][None, :],
                                                 out_dtype=torch.bfloat16)}


def kernels(ms: list[int], result_file: str, run_id: str) -> None:
    import torch

    from deepserve.bench.offline import append_record, environment_fields

    env = environment_fields(torch.cuda.get_device_name(), run_id)
    for layer, (k, n) in SHAPES.items():
        copies = weight_copies(k, n)
        for m in ms:
            x = torch.randn(m, k, device="cuda").bfloat16()
            per_copy = [variant_fns(wt, x) for wt in copies]
            for variant in VARIANTS:
                record = {**env, "engine": "deepserve", "engine_version": None, "model": "qwen-7b",
                          "dtype": "bfloat16", "quant": variant, "tp": 1, "pp": 1, "ep": 1,
                          "workload": "kernel-linear", "batch": m, "layer": layer, "k": k, "n": n,
                          "notes": f"one linear (w8a8-triton / w8a8-int_mm / fp8 incl. the activation "
                                   f"quantisation; int8-quant / fp8-quant that alone; w8a8-gemm / fp8-gemm "
                                   f"the GEMM alone); CUDA-graph replay over {len(copies)} weight copies "
                                   f"(cold L2), median of 15; weight_gbs = weight bytes / time"}
                fns = [fns_[variant] for fns_ in per_copy]
                append_record({**record, **timed_figures(fns, m, n, k, variant)}, result_file)
        del copies


def timed_figures(fns, m: int, n: int, k: int, variant: str) -> dict:
    """ms, TFLOP/s and weight GB/s of one variant; an error is recorded, not raised (the other
    variants still get measured)."""
    try:
        ms_ = time_ms(fns)
    except Exception as exc:  # noqa: BLE001 - a compile, launch or capture failure of one variant
        print(f"{variant} M={m} N={n} K={k}: {exc!r}"[:400], file=sys.stderr, flush=True)
        return {"ms": None, "error": repr(exc)[:300]}
    weight_bytes = 0 if variant.endswith("-quant") else n * k * (2 if variant == "bf16" else 1)
    return {"ms": round(ms_, 5), "tflops": round(2 * m * n * k / ms_ / 1e9, 2),
            "weight_gbs": round(weight_bytes / ms_ / 1e6, 1)}


def kernel_times(path: Path, run_id: str) -> dict[tuple[str, int, str], float]:
    """(layer, M, variant) -> ms, from the records of this run."""
    return {(r["layer"], r["batch"], r["quant"]): r["ms"] for r in records(path, run_id)
            if r["workload"] == "kernel-linear" and r.get("ms") is not None}


def print_kernel_table(times: dict, ms: list[int]) -> None:
    if not times:
        return
    print(f"\n{'layer':<8}{'M':>6}" + "".join(f"{v:>19}" for v in VARIANTS) + "   (ms; x = speed-up over bf16)")
    for layer in SHAPES:
        for m in ms:
            base = times.get((layer, m, "bf16"))
            cells = "".join(_cell(times.get((layer, m, v)), base) for v in VARIANTS)
            print(f"{layer:<8}{m:>6}{cells}")


def _cell(ms_: float | None, base: float | None) -> str:
    if ms_ is None:
        return f"{'failed/absent':>18} "
    return f"{ms_:>11.4f} {base / ms_:>5.2f}x " if base else f"{ms_:>11.4f}        "


def print_choices(times: dict, ms: list[int]) -> None:
    """Per M, the backend with the least time over the four linears; as tables to paste."""
    if not times:
        return
    print("\nper-M choice (summed over qkv, gate_up, o, down), for deepserve/quant/int8_cuda.py:")
    for table, options in CHOICES.items():
        entries = []
        for i, m in enumerate(ms):
            totals = {b: sum(times[layer, m, v] for layer in SHAPES) for b, v in options.items()
                      if all((layer, m, v) in times for layer in SHAPES)}
            if not totals:
                print(f"  {table} M={m}: no complete measurement")
                continue
            best = min(totals, key=totals.get)
            bound = "1 << 62" if i == len(ms) - 1 else str(m)
            entries.append(f'{bound}: "{best}"')
            print(f"  {table} M={m}: " + ", ".join(f"{b} {t:.4f} ms" for b, t in totals.items()))
        print(f"{table}: dict[int, str] = {{{', '.join(entries)}}}  # measured")


# ------------------------------------------------------------------------------- --tune

TUNED = ("int8_gemm", "w8a16_gemm")


def candidates(m: int, kernel: str = "int8_gemm"):
    """Block configs to time at M = m; the int8 GEMM also tries each with TMA operands, at 64 < M <= 256
    256-row TMA tiles, and above M = 64 the unsplit TMA configs launched persistent."""
    from deepserve.kernels.int8_gemm import GemmConfig

    if m <= 16:
        plain = [GemmConfig(16, bn, bk, split_k=s, group_m=1, num_warps=4, num_stages=4)
                 for bn in (32, 64, 128) for bk in (128, 256) for s in (1, 4)]
    elif m <= 64:
        plain = [GemmConfig(bm, bn, bk, split_k=s, group_m=8, num_warps=4, num_stages=4)
                 for bm in (32, 64) for bn in (64, 128) for bk in (64, 128) for s in (1, 2)]
    elif m <= 256:  # one warp group per 64 rows (wgmma); split-K while the tiles are under one wave
        plain = [GemmConfig(bm, bn, 128, split_k=s, group_m=8, num_warps=bm // 16, num_stages=st)
                 for bm in (64, 128) for bn in (64, 128) for s in (1, 2, 4) for st in (3, 4)]
    else:
        plain = [GemmConfig(128, bn, bk, split_k=1, group_m=8, num_warps=w, num_stages=st)
                 for bn in (128, 256) for bk in (64, 128) for w, st in ((8, 3), (8, 4), (4, 4))] + \
            [GemmConfig(256, 128, bk, split_k=1, group_m=8, num_warps=8, num_stages=st)
             for bk in (64, 128) for st in (3, 4)]
    if kernel != "int8_gemm":  # w8a16_gemm: the x-left kernel runs M <= X_LEFT_MAX_M, the w-left kernel above
        from deepserve.kernels.w8a16_gemm import X_LEFT_MAX_M

        return plain if m <= X_LEFT_MAX_M else w8a16_candidates(m)
    wide = [GemmConfig(256, bn, 128, split_k=s, group_m=8, num_warps=8, num_stages=st, tma=True)
            for bn in (64, 128) for s in (1, 2) for st in (3, 4)] if 64 < m <= 256 else []
    tma = [c._replace(tma=True) for c in plain if c.block_k >= 64] + wide
    persistent = [c._replace(persistent=True) for c in tma if c.split_k == 1 and m > 64]
    return tma + persistent + plain


def w8a16_candidates(m: int):
    """Configs of kernels/w8a16_gemm.py's w-left kernel (y^T = w @ x^T): block_n tiles the weight rows (wgmma's
    M: 64 per warp group), block_m the tokens (wgmma's N)."""
    from deepserve.kernels.int8_gemm import GemmConfig

    if m <= 64:
        shapes = [(bm, bn, 128, 4, 4) for bm in (32, 64) for bn in (64, 128)]
    elif m <= 256:
        shapes = [(128, 64, 128, 4, 3), (128, 64, 64, 4, 4), (64, 64, 128, 4, 4), (128, 128, 64, 8, 4),
                  (128, 128, 128, 8, 3), (256, 128, 64, 8, 3), (256, 64, 64, 4, 3)]
    else:
        shapes = [(256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (256, 128, 128, 8, 3), (128, 256, 64, 8, 3),
                  (256, 64, 64, 4, 3)]
    splits = (1, 4) if m <= 256 else (1,)
    return [GemmConfig(bm, bn, bk, split_k=s, group_m=8, num_warps=w, num_stages=st)
            for bm, bn, bk, w, st in shapes for s in splits]


def tune(ms: list[int], result_file: str, run_id: str, kernels_: tuple[str, ...] = TUNED,
         model: str = "qwen-7b") -> None:
    """Time the Triton GEMMs with a few configs per M (summed over `model`'s linears, TUNE_SHAPES); one
    record per (kernel, M) with the best config and each linear's best."""
    shapes = TUNE_SHAPES[model]
    import torch

    from deepserve.bench.offline import append_record, environment_fields
    from deepserve.kernels.int8_gemm import config_for, int8_gemm, num_sms
    from deepserve.kernels.w8a16_gemm import w8a16_gemm

    sms = num_sms(torch.device("cuda"))
    weights = {layer: weight_copies(k, n) for layer, (k, n) in shapes.items()}
    for m in ms:
        inputs = {k: (torch.randn(m, k, device="cuda").bfloat16(),
                      torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda"), torch.rand(m, device="cuda"))
                  for k in {k for k, _ in shapes.values()}}
        for kernel in kernels_:
            scores, per_layer = {}, defaultdict(dict)  # cfg -> summed ms; layer -> resolved cfg -> ms
            for cfg in candidates(m, kernel):
                total = 0.0
                for layer, (k, n) in shapes.items():
                    c = config_for({m: cfg}, m, n, k, sms)  # resolve split_k for this shape
                    x, xq, xs = inputs[k]
                    fns = [(lambda wt=wt: int8_gemm(xq, xs, wt["q"], wt["s"], None, torch.bfloat16, c))
                           if kernel == "int8_gemm" else (lambda wt=wt: w8a16_gemm(x, wt["q"], wt["s"], None, None, c))
                           for wt in weights[layer]]
                    try:
                        per_layer[layer][c] = time_ms(fns, reps=7)  # keyed by the config as resolved
                        total += per_layer[layer][c]
                    except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: skip the config
                        print(f"{kernel} {cfg}: {exc!r}"[:300], file=sys.stderr, flush=True)
                        total = float("inf")
                        break
                scores[cfg] = total
            top = min(scores, key=scores.get)
            for kind in ((False, False), (True, False), (True, True)):
                ranked = sorted((v, c) for c, v in scores.items()
                                if (c.tma, c.persistent) == kind and v < float("inf"))[:3]
                print(f"{kernel} M={m} tma={kind[0]} persistent={kind[1]}: "
                      + ", ".join(f"{tuple(c)} {v:.4f} ms" for v, c in ranked), flush=True)
            print_per_layer(kernel, m, per_layer, scores[top])
            worst = max((v for v in scores.values() if v < float("inf")), default=None)
            append_record({**environment_fields(torch.cuda.get_device_name(), run_id), "engine": "deepserve",
                           "model": model, "dtype": "bfloat16", "quant": kernel, "workload": "kernel-tune",
                           "batch": m, "config": list(top), "ms": round(scores[top], 5),
                           "worst_ms": None if worst is None else round(worst, 5), "candidates": len(scores),
                           "per_layer_best": {layer: [list(c), round(v, 5)] for layer, times in per_layer.items()
                                              for v, c in [min((v, c) for c, v in times.items())]},
                           "notes": "ms summed over qkv, gate_up, o, down; CUDA-graph replays over cold weight copies, median of 7"}, result_file)


def print_per_layer(kernel: str, m: int, per_layer: dict, best_total: float) -> None:
    """Each linear's three best configs, and what choosing per linear would save over the one config per M."""
    best_sum = 0.0
    for layer, times in per_layer.items():
        ranked = sorted((v, c) for c, v in times.items())[:3]
        best_sum += ranked[0][0]
        print(f"{kernel} M={m} {layer}: " + ", ".join(f"{tuple(c)} {v:.4f} ms" for v, c in ranked), flush=True)
    print(f"{kernel} M={m}: per-linear best summed {best_sum:.4f} ms vs one config {best_total:.4f} ms", flush=True)


def print_tuned(path: Path, run_id: str, ms: list[int]) -> None:
    """CONFIGS tables to paste into kernels/int8_gemm.py and kernels/w8a16_gemm.py."""
    rows = [r for r in records(path, run_id) if r["workload"] == "kernel-tune"]
    for kernel in ("int8_gemm", "w8a16_gemm"):
        best = {r["batch"]: r for r in rows if r["quant"] == kernel}
        if not best:
            continue
        lines = [f"    {'1 << 62' if m == ms[-1] else m}: GemmConfig{tuple(best[m]['config'])},  "
                 f"# {best[m]['ms']} ms (worst of {best[m]['candidates']}: {best[m]['worst_ms']})"
                 for m in ms if m in best]
        print(f"\n# kernels/{kernel}.py, measured\nCONFIGS: dict[int, GemmConfig] = {{\n" + "\n".join(lines) + "\n}")
        shaped = [f"    {TUNE_SHAPES[best[m]['model']][layer][::-1]}: {{{m}: GemmConfig{tuple(cfg)}}},  "
                  f"# {best[m]['model']} {layer}: {ms_} ms"
                  for m in ms if m in best for layer, (cfg, ms_) in best[m].get("per_layer_best", {}).items()]
        if shaped:  # (N, K) keys, one line per linear and M: merge them by hand
            print("SHAPE_CONFIGS (each linear's best; (N, K) -> {max M: config}):\n" + "\n".join(shaped))


def print_engine_table(path: Path, run_id: str) -> None:
    rows = [r for r in records(path, run_id) if r["workload"] in ("W-b1", "W-offline", "ceiling-copy", "kv-plan")]
    print(f"\nrun {run_id} on {rows[0]['gpu'] if rows else '?'} -> {path}")
    print(f"{'model':<10}{'workload':<11}{'quant':<38}{'kv cache':<9}{'out tok/s':>11}{'tot tok/s':>11}"
          f"{'ms/tok':>9}{'roofline':>9}{'ttft ms':>9}{'kv blocks':>10}")
    for r in rows:
        if r["workload"] == "ceiling-copy":
            print(f"copy bandwidth {r['bandwidth_gbs']} GB/s")
            continue
        if r["workload"] == "kv-plan":
            print(f"{str(r['model']):<10}{'kv-plan':<11}{'':<38}{r['kv_cache_dtype']:<9}{r['num_kv_blocks']:>59}"
                  f"  ({r['bytes_per_block']} B/block, max concurrency {r['max_concurrency']}x at "
                  f"{r['max_model_len']} tokens)")
            continue
        print(f"{str(r['model']):<10}{r['workload']:<11}{r['quant']:<38}{kv_of(r):<9}{_num(r.get('output_tok_s')):>11}"
              f"{_num(r.get('total_tok_s')):>11}{_num(r.get('ms_per_token')):>9}"
              f"{_num(r.get('roofline_fraction')):>9}{_num(r.get('ttft_ms_p50')):>9}{r.get('num_kv_blocks', ''):>10}")


def kv_of(record: dict) -> str:
    """The --kv-cache-dtype of an engine record: its `kv_cache_dtype` field (since run s11a), else its notes
    (older records name a non-auto one there)."""
    if record.get("kv_cache_dtype"):
        return record["kv_cache_dtype"]
    notes = record.get("notes") or ""
    return notes.split("kv_cache_dtype=", 1)[1].split()[0] if "kv_cache_dtype=" in notes else "auto"


# ------------------------------------------------------------------------------- (c) KV blocks


def kv_plans(shape: str, kv_dtypes: list[str], result_file: str, run_id: str) -> None:
    """Load `shape` once (dummy weights) and plan its KV cache for each --kv-cache-dtype, with CUDA
    graphs as the engine would, at max_model_len 32768 and 256 sequences (the budget, not the
    sequences, caps the count). One "kv-plan" record per dtype."""
    from deepserve.bench.offline import append_record, environment_fields, resolve_model_arg
    from deepserve.engine.args import EngineArgs
    from deepserve.engine.engine_core import plan_kv_cache, use_cuda_graphs
    from deepserve.loader.model_loader import load_model
    from deepserve.platforms import get_platform

    config = EngineArgs(model=resolve_model_arg(shape), load_format="dummy", max_model_len=32768,
                        max_num_seqs=256, max_num_batched_tokens=8192).create_engine_config()
    platform = get_platform(config.device)
    model = load_model(config, progress=False)
    env = environment_fields(platform.device_name(), run_id)
    for kv in kv_dtypes:
        cfg = dataclasses.replace(config, cache=dataclasses.replace(config.cache, kv_cache_dtype=kv))
        plan = plan_kv_cache(cfg, model, platform, use_cuda_graphs(cfg, platform, model))
        append_record({**env, "engine": "deepserve", "model": shape, "dtype": "bfloat16", "quant": "none",
                       "tp": 1, "pp": 1, "ep": 1, "workload": "kv-plan", "batch": None, "kv_cache_dtype": kv,
                       "num_kv_blocks": plan.num_blocks, "bytes_per_block": plan.bytes_per_block,
                       "kv_tokens": plan.num_tokens, "max_concurrency": round(plan.max_concurrency, 2),
                       "max_model_len": plan.max_model_len,
                       "notes": f"KV blocks planned at start-up, --kv-cache-dtype {kv}, max_model_len 32768, "
                                f"256 seqs, gpu_memory_utilization 0.9, graphs margin included"}, result_file)
        print(plan.summary(), flush=True)


# ------------------------------------------------------------------------------- the driver


def offline_cmd(kind: str, method: str, args: argparse.Namespace, extra: list[str], kv: str = "auto") -> list[str]:
    quant = [] if method == "none" else ["--quantization", method]
    kv_args = [] if kv == "auto" else ["--kv-cache-dtype", kv]
    notes = " ".join(["benchmarks/gpu_quant.py", *extra, *([f"kv_cache_dtype={kv}"] if kv_args else [])])
    return [sys.executable, "-m", "deepserve.bench.offline", kind, "--model", args.shape, "--load-format", "dummy",
            "--result-file", args.result_file, "--run-id", args.run_id, *quant, *kv_args, *extra, "--notes", notes]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="qwen-7b", help="a name under benchmarks/configs, for (b)")
    p.add_argument("--methods", default="none,int8,int8-weight-only,fp8", help="--quantization values for (b)")
    p.add_argument("--kv-cache-dtypes", default="auto",
                   help="--kv-cache-dtype values for (b) (each with each method) and, when one is not auto, (c)")
    p.add_argument("--skip-b1", action="store_true", help="W-offline only in (b) (and no ceilings)")
    p.add_argument("--offline-arg", action="append", default=[],
                   help="extra argument for the W-offline runs (repeat), e.g. --offline-arg=--num-prompts=1024")
    p.add_argument("--ms", default="1,16,64,256,2048,8192", help="token counts M for (a)")
    p.add_argument("--budget-s", type=float, default=360.0, help="the whole run, seconds")
    p.add_argument("--result-file", default=str(RESULTS), help="engine figures (b)")
    p.add_argument("--kernel-file", default=str(KERNEL_RESULTS), help="kernel timings (a) and --tune")
    p.add_argument("--run-id", default=uuid.uuid4().hex[:12])
    p.add_argument("--skip-kernels", action="store_true")
    p.add_argument("--skip-engine", action="store_true")
    p.add_argument("--skip-offline", action="store_true", help="W-b1 only in (b)")
    p.add_argument("--tune", action="store_true", help="also time Triton block configs per M (slow: compiles)")
    p.add_argument("--tune-kernels", default=",".join(TUNED), help=f"which of {TUNED} --tune times")
    p.add_argument("--tune-shapes", default="qwen-7b", choices=sorted(TUNE_SHAPES),
                   help="whose linears --tune times (TUNE_SHAPES)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    ms = [int(m) for m in args.ms.split(",")]
    if args.child:
        return child(args, ms)
    budget, me = Budget(args.budget_s), [sys.executable, str(Path(__file__).resolve())]
    common = ["--result-file", args.result_file, "--kernel-file", args.kernel_file, "--run-id", args.run_id,
              "--ms", args.ms, "--tune-kernels", args.tune_kernels, "--tune-shapes", args.tune_shapes]
    if not args.skip_kernels:
        run_step("kernel microbenchmarks", me + common + ["--child", "kernels"], budget, cap_s=150)
    if args.tune:
        run_step("Triton config sweep", me + common + ["--child", "tune"], budget, cap_s=300, min_s=60)
    if not args.skip_engine:
        engine_steps(args, budget, me + common)
    times = kernel_times(Path(args.kernel_file), args.run_id)
    print_kernel_table(times, ms)
    print_choices(times, ms)
    print_tuned(Path(args.kernel_file), args.run_id, ms)
    print_engine_table(Path(args.result_file), args.run_id)


def engine_steps(args: argparse.Namespace, budget: Budget, me: list[str]) -> None:
    """(c) the KV block counts, then (b): W-b1 for every method x KV dtype, then W-offline."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    kvs = [k.strip() for k in args.kv_cache_dtypes.split(",") if k.strip()]
    if kvs != ["auto"]:
        run_step(f"KV blocks {args.shape} {','.join(kvs)}", me + ["--kv-cache-dtypes", args.kv_cache_dtypes,
                 "--shape", args.shape, "--child", "kv-plan"], budget, cap_s=150, min_s=60)
    runs = [(method, kv) for method in methods for kv in kvs]
    if not args.skip_b1:
        run_step("ceilings", me + ["--child", "ceilings"], budget, cap_s=60)
        bw = bandwidth(Path(args.result_file), args.run_id)
        roof = ["--roofline-bandwidth-gbs", str(bw)] if bw else []
        for method, kv in runs:
            run_step(f"W-b1 {args.shape} {method} kv {kv}", offline_cmd("latency", method, args, B1_FAST + roof, kv),
                     budget, cap_s=150, min_s=45)
    for method, kv in [] if args.skip_offline else runs:
        run_step(f"W-offline {args.shape} {method} kv {kv}",
                 offline_cmd("throughput", method, args, list(args.offline_arg), kv), budget, cap_s=200, min_s=60)


def child(args: argparse.Namespace, ms: list[int]) -> None:
    kind = args.child[0]
    if kind == "kernels":
        kernels(ms, args.kernel_file, args.run_id)
    elif kind == "tune":
        tuned = tuple(k.strip() for k in args.tune_kernels.split(",") if k.strip())
        if unknown := set(tuned) - set(TUNED):
            raise SystemExit(f"--tune-kernels: unknown {sorted(unknown)}; choose from {TUNED}")
        tune(ms, args.kernel_file, args.run_id, tuned, args.tune_shapes)
    elif kind == "ceilings":
        from gpu_dense import ceilings

        ceilings(args.result_file, args.run_id)
    elif kind == "kv-plan":
        kv_plans(args.shape, [k.strip() for k in args.kv_cache_dtypes.split(",") if k.strip()], args.result_file,
                 args.run_id)
    else:
        raise SystemExit(f"unknown child step {kind!r}")


if __name__ == "__main__":
    main()
