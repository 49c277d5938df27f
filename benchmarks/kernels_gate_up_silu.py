"""The dense MLP's middle under --quantization int8 on one GPU: the gate_up GEMM with SiLU-and-mul in its
epilogue (weight in the gated layout) plus the quantisation with the row max given (`kernels/int8_gemm_silu.py`,
the "gated" path), against
the path it replaces (int8_gemm of gate_up, then silu_and_mul_int8_quant: "unfused"), each checked bit-equal
to the unfused one first; `--sweep` also times a few block configs of the gated GEMM per M, `--ws` configs of the
warp-specialised Gluon kernel (`kernels/int8_gemm_silu_ws.int8_gemm_silu_ws`, sm_90).

    python benchmarks/kernels_gate_up_silu.py [--tokens 1,16,256,2048,8192] [--shapes qwen-7b,v2-lite-shared]
        [--sweep] [--ws] [--run-id R] [--result-file benchmarks/results/gpu_quant_kernels.jsonl]

Times are gpu_quant.py's `time_ms`: CUDA-graph replays over cold weight copies (more bytes than the L2),
the median per call, so they are what a captured decode step pays. One record per (shape, T, variant).
"""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # deepserve from this checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_quant

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_quant_kernels.jsonl"
SHAPES = {"qwen-7b": (3584, 18944), "llama-8b": (4096, 14336), "v2-lite-shared": (2048, 2816)}  # (K, I)


def sweep_configs(m: int):
    from deepserve.kernels.int8_gemm_silu import SiluGemmConfig

    if m <= 16:
        return [SiluGemmConfig(16, bk, group_m=1, num_warps=4, num_stages=st) for bk in (128, 256) for st in (3, 4)]
    if m <= 256:  # 256-row tiles: the whole decode batch per program, each weight tile read once (not yet timed)
        return [SiluGemmConfig(bm, bk, num_warps=w, num_stages=st)
                for bm, w in ((64, 4), (128, 8)) for bk in (64, 128) for st in (3, 4, 5)] + \
            [SiluGemmConfig(256, bk, num_warps=8, num_stages=st) for bk in (64, 128) for st in (3, 4)]
    return [SiluGemmConfig(bm, bk, num_warps=8, num_stages=st)
            for bm in (128, 256) for bk in (64, 128) for st in (3, 4)]


def ws_configs():
    """Configs of the warp-specialised kernel (kernels/int8_gemm_ws.py): one gated block per tile."""
    from deepserve.kernels.int8_gemm_ws import WsConfig

    return [WsConfig(bm, 128, 128, st, w, persistent=p) for bm in (64, 128) for st in (4, 5, 6) for w in (4, 8)
            for p in (True, False) if not (bm == 64 and w == 8)]


def time_configs(run, weights: list, cfgs: list, want) -> dict:
    """{config: (ms, bits equal to want)} of `run(weights, config)` for each config that launches (one that
    fails, e.g. out of shared memory, is reported and skipped); gpu_quant.time_ms over the weight copies."""
    import torch

    from gpu_quant import time_ms

    times = {}
    for cfg in cfgs:
        try:
            got = run(weights[0], cfg)
            same = torch.equal(got.q, want.q) and torch.equal(got.scale, want.scale)
            times[cfg] = (time_ms([lambda wt=wt, cfg=cfg: run(wt, cfg) for wt in weights]), same)
        except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: skip the config
            print(f"{cfg}: {exc!r}"[:200], file=sys.stderr)
    return times


def best_rows(times: dict, triton_config: type, ws_config: type) -> list:
    """[("gated", None): the table's, ("gated-best", the fastest bit-equal Triton config), ("ws-best", the
    fastest bit-equal warp-specialised one)], the last two where such configs were timed."""
    rows = [("gated", None)]
    for name, kind in (("gated-best", triton_config), ("ws-best", ws_config)):
        same_kind = [c for c in times if isinstance(c, kind) and times[c][1]]
        rows += [(name, min(same_kind, key=lambda c: times[c][0]))] if same_kind else []
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="1,16,256,2048,8192")
    p.add_argument("--shapes", default="qwen-7b,v2-lite-shared")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--ws", action="store_true", help="also time int8_gemm_silu_ws (Gluon, sm_90) configs")
    p.add_argument("--run-id", default=uuid.uuid4().hex[:12])
    p.add_argument("--result-file", default=str(RESULTS))
    args = p.parse_args()

    import torch

    from deepserve.bench.offline import append_record, environment_fields
    from deepserve.kernels.int8_gemm import int8_gemm
    from deepserve.kernels.int8_gemm_silu import (SiluGemmConfig, int8_gemm_silu, int8_quant_amax, silu_gemm_config,
                                                  to_gated_layout)
    from deepserve.kernels.int8_gemm_silu_ws import int8_gemm_silu_ws
    from deepserve.kernels.int8_gemm_ws import WsConfig
    from deepserve.kernels.silu_and_mul_quant import silu_and_mul_int8_quant
    from gpu_quant import time_ms, weight_copies

    env = environment_fields(torch.cuda.get_device_name(), args.run_id)

    def unfused(x_q, x_s, wt):
        return silu_and_mul_int8_quant(int8_gemm(x_q, x_s, wt["q"], wt["s"], None, torch.bfloat16))

    def gated(x_q, x_s, wt, cfg=None):
        silu = int8_gemm_silu_ws if isinstance(cfg, WsConfig) else int8_gemm_silu
        return int8_quant_amax(*silu(x_q, x_s, wt["g"], wt["gs"], wt["q"].shape[0] // 2, torch.bfloat16, cfg))

    print(f"{'shape':<16}{'T':>6}{'unfused us':>12}{'gated us':>10}{'ratio':>7}  gated config")
    for shape in args.shapes.split(","):
        k, inter = SHAPES[shape]
        weights = weight_copies(k, 2 * inter)
        for wt in weights:
            wt.update(g=to_gated_layout(wt["q"]), gs=to_gated_layout(wt["s"]))
        for m in (int(t) for t in args.tokens.split(",")):
            x_q = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda")
            x_s = torch.rand(m, device="cuda") / 100 + 1e-4
            want = unfused(x_q, x_s, weights[0])
            cfgs = [None] + (sweep_configs(m) if args.sweep else []) + (ws_configs() if args.ws else [])
            times = time_configs(lambda wt, cfg: gated(x_q, x_s, wt, cfg), weights, cfgs, want)
            base = time_ms([lambda wt=wt: unfused(x_q, x_s, wt) for wt in weights])
            for cfg, (ms, same) in sorted(((c, t) for c, t in times.items() if c is not None), key=lambda i: i[1][0]):
                print(f"  sweep {shape} T={m} {tuple(cfg)} {1000 * ms:.1f} us{'' if same else ' DIFF'}")
            table_cfg = silu_gemm_config(m)
            for name, cfg in best_rows(times, SiluGemmConfig, WsConfig):
                ms, same = times[cfg]
                append_record({**env, "engine": "deepserve", "model": shape, "dtype": "bfloat16", "quant": "int8",
                               "workload": "kernel", "kernel": "gate_up_silu_int8_quant", "variant": name,
                               "batch": m, "k": k, "inter": inter, "us": round(1000 * ms, 2),
                               "unfused_us": round(1000 * base, 2), "speedup": round(base / ms, 4),
                               "config": list(cfg or table_cfg), "bits_equal": same,
                               "notes": "benchmarks/kernels_gate_up_silu.py: int8_gemm_silu + int8_quant_amax "
                                        "against int8_gemm + silu_and_mul_int8_quant; gpu_quant.time_ms (CUDA-graph "
                                        "replays over cold weight copies, median)"}, args.result_file)
                print(f"{shape:<16}{m:>6}{1000 * base:>12.1f}{1000 * ms:>10.1f}{base / ms:>7.3f}  {name} "
                      f"{tuple(cfg or table_cfg)}{'' if same else ' DIFF'}", flush=True)


if __name__ == "__main__":
    main()
