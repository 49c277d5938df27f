"""A model's W8A8 linears (qwen-7b's four, or V2-Lite's dense ones) on one H200: the Triton GEMM `int8_gemm`
(its table config) against the warp-specialised Gluon GEMM `int8_gemm_ws` (kernels/int8_gemm_ws.py) at its
table config and, with `--sweep`, a grid of configs; every variant is first checked bit-equal to int8_gemm run
unsplit (the reference's bits).

    python benchmarks/kernels_int8_ws.py [--model qwen-7b | v2-lite] [--tokens 256,2048,8192] [--linears qkv,o]
        [--sweep] [--persistent | --persistent-only] [--coalesced] [--run-id R]
        [--result-file benchmarks/results/gpu_quant_kernels.jsonl]

--sweep times block_m 64/128 x block_n 64/128/256 x block_k 64/128 x stages 3-6 x warps 4/8 (configs that
`check_config` refuses or that fail to compile or launch, e.g. out of shared memory, are skipped);
--persistent and --coalesced add each config's persistent and coalesced-store twins. Times are gpu_quant.py's
`time_ms`: CUDA-graph replays over cold weight copies (more bytes than the L2), the median per call; TOPS is
2 M N K / time. bf16 out, qkv with its bias. One record per (linear, M, variant): int8_gemm, ws (table) and
ws-best (the sweep's fastest bit-equal config).
"""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # deepserve from this checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_quant

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_quant_kernels.jsonl"
# model -> {linear: (N, K, bias)}. V2-Lite under int8: q_proj and kv_a_proj_with_mqa were apart when this
# was measured (since 02f1c8f they merge under int8: one N = 3648 GEMM), kv_b_proj is the prefill path's,
# layer 0 is a dense MLP, the others' shared experts.
MODELS = {
    "qwen-7b": {"qkv": (4608, 3584, True), "o": (3584, 3584, False), "gate_up": (37888, 3584, False),
                "down": (3584, 18944, False)},
    "v2-lite": {"q": (3072, 2048, False), "kv_a": (576, 2048, False), "kv_b": (4096, 512, False),
                "o": (2048, 2048, False), "dense_gate_up": (21888, 2048, False), "dense_down": (2048, 10944, False),
                "shared_gate_up": (5632, 2048, False), "shared_down": (2048, 2816, False)},
}


def sweep_configs(persistent: bool, coalesced: bool, persistent_only: bool = False) -> list:
    """The grid, less the configs `check_config` refuses (accumulator over 128 registers, ring over 227 KB)."""
    from deepserve.kernels.int8_gemm_ws import WsConfig, check_config

    launches = (True,) if persistent_only else (False, True)[:1 + persistent]
    flags = [(p, c) for p in launches for c in (False, True)[:1 + coalesced]]
    grid = [WsConfig(bm, bn, bk, st, w, persistent=p, coalesced_store=c) for bm in (64, 128) for bn in (64, 128, 256)
            for bk in (64, 128) for st in (3, 4, 5, 6) for w in (4, 8) for p, c in flags]
    kept = []
    for cfg in grid:
        try:
            check_config(cfg)
            kept.append(cfg)
        except ValueError:
            pass
    return kept


def tops(m: int, n: int, k: int, ms: float) -> float:
    return 2 * m * n * k / (ms * 1e-3) / 1e12


def time_variants(x_q, x_s, weights, bias, sweep: list, sms: int) -> tuple:
    """(int8_gemm ms, its bits equal, {config or None (the table's): (int8_gemm_ws ms, bits equal)}) for one
    linear at one M; bits against int8_gemm unsplit (the reference's bits)."""
    import torch

    from deepserve.kernels.int8_gemm import int8_gemm, int8_gemm_config
    from deepserve.kernels.int8_gemm_ws import int8_gemm_ws
    from gpu_quant import time_ms

    (m, k), n, w0, bf16 = x_q.shape, weights[0]["q"].shape[0], weights[0], torch.bfloat16
    want = int8_gemm(x_q, x_s, w0["q"], w0["s"], bias, bf16, int8_gemm_config(m, n, k, sms)._replace(split_k=1))
    base_same = torch.equal(int8_gemm(x_q, x_s, w0["q"], w0["s"], bias, bf16), want)
    base = time_ms([lambda wt=wt: int8_gemm(x_q, x_s, wt["q"], wt["s"], bias, bf16) for wt in weights])
    times = {}
    for cfg in [None] + sweep:
        try:
            same = torch.equal(int8_gemm_ws(x_q, x_s, w0["q"], w0["s"], bias, bf16, cfg), want)
            times[cfg] = (time_ms([lambda wt=wt, cfg=cfg: int8_gemm_ws(x_q, x_s, wt["q"], wt["s"], bias, bf16, cfg)
                                   for wt in weights]), same)
        except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: skip the config
            print(f"{cfg}: {exc!r}"[:300], file=sys.stderr, flush=True)
    return base, base_same, times


def report(args, env: dict, name: str, m: int, base: float, base_same: bool, times: dict, sms: int) -> None:
    """Print the sweep's fastest configs and the table rows; append one record per variant."""
    from deepserve.bench.offline import append_record
    from deepserve.kernels.int8_gemm import int8_gemm_config
    from deepserve.kernels.int8_gemm_ws import ws_config

    n, k, has_bias = MODELS[args.model][name]
    ranked = sorted(((c, t) for c, t in times.items() if c is not None), key=lambda i: i[1][0])
    for cfg, (ms, same) in ranked[:12]:
        print(f"  sweep {name} M={m} {tuple(cfg)} {1000 * ms:.1f} us {tops(m, n, k, ms):.0f} TOPS"
              f"{'' if same else ' DIFF'}", flush=True)
    best = next((c for c, (_, same) in ranked if same), None)
    rows = [("int8_gemm", int8_gemm_config(m, n, k, sms), base, base_same)]
    rows += [("ws", ws_config(m), *times[None])] if None in times else []
    rows += [("ws-best", best, *times[best])] if best is not None else []
    for variant, cfg, ms, same in rows:
        append_record({**env, "engine": "deepserve", "model": args.model, "dtype": "bfloat16", "quant": "int8",
                       "workload": "kernel", "kernel": "int8_gemm_ws", "variant": variant, "linear": name, "batch": m,
                       "n": n, "k": k, "bias": has_bias, "us": round(1000 * ms, 2), "tops": round(tops(m, n, k, ms), 1),
                       "int8_gemm_us": round(1000 * base, 2), "speedup": round(base / ms, 4), "config": list(cfg),
                       "bits_equal": same,
                       "notes": "benchmarks/kernels_int8_ws.py: Gluon warp-specialised int8_gemm_ws against int8_gemm "
                                "(table config), bits against int8_gemm unsplit; gpu_quant.time_ms (CUDA-graph "
                                "replays over cold weight copies, median)"}, args.result_file)
        print(f"{name:<9}{m:>6}{1000 * base:>14.1f}{tops(m, n, k, base):>7.0f}{1000 * ms:>9.1f}"
              f"{tops(m, n, k, ms):>7.0f}{base / ms:>7.3f}  {variant} {tuple(cfg)}{'' if same else ' DIFF'}",
              flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="256,2048,8192")
    p.add_argument("--model", default="qwen-7b", choices=sorted(MODELS))
    p.add_argument("--linears", default=None, help="comma-separated names of --model's linears (default: all)")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--persistent", action="store_true")
    p.add_argument("--persistent-only", action="store_true", help="sweep the persistent launch only")
    p.add_argument("--coalesced", action="store_true")
    p.add_argument("--run-id", default=uuid.uuid4().hex[:12])
    p.add_argument("--result-file", default=str(RESULTS))
    args = p.parse_args()

    import torch

    from deepserve.bench.offline import environment_fields
    from deepserve.kernels.int8_gemm import num_sms
    from deepserve.kernels.int8_gemm_ws import ws_available
    from gpu_quant import weight_copies

    if not ws_available(torch.device("cuda")):
        sys.exit("int8_gemm_ws needs Gluon and an sm_90 GPU")
    env = environment_fields(torch.cuda.get_device_name(), args.run_id)
    sms = num_sms(torch.device("cuda"))
    sweep = sweep_configs(args.persistent, args.coalesced, args.persistent_only) if args.sweep else []
    print(f"{len(sweep)} sweep configs", flush=True)
    print(f"{'linear':<9}{'M':>6}{'int8_gemm us':>14}{'TOPS':>7}{'ws us':>9}{'TOPS':>7}{'ratio':>7}  variant config")
    for name in (args.linears or ",".join(MODELS[args.model])).split(","):
        n, k, has_bias = MODELS[args.model][name]
        weights = weight_copies(k, n)
        bias = torch.randn(n, device="cuda").bfloat16() if has_bias else None
        for m in (int(t) for t in args.tokens.split(",")):
            x_q = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda")
            x_s = torch.rand(m, device="cuda") / 100 + 1e-4
            report(args, env, name, m, *time_variants(x_q, x_s, weights, bias, sweep, sms), sms)
        del weights


if __name__ == "__main__":
    main()
