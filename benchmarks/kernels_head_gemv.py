"""GPU micro-benchmark of the absorbed-MLA head GEMV (deepserve/kernels/head_gemv.py) against today's torch path.

Both per-head products of an MLA layer's decode step, at V2-Lite (16 heads) and V3 (128 heads) shapes
(Dn = Dv = 128, R = 512, Dr = 64, bf16), T in (1, 2, 4), with the operands layers/mla.py passes:
  * w_uk: q_nope [T, h, Dn] (a column view of q [T, h, Dn + Dr]) @ W_UK [h, Dn, R] -> q_latent [T, h, R];
    torch path: torch.einsum("thd,hdr->thr", q_nope, W_UK);
  * w_uv: o_lat [T, h, R] @ W_UV^T -> [T, h, Dv] token-major; torch path: torch.bmm(o_lat.transpose(0, 1),
    W_UV.transpose(1, 2), out=out.transpose(0, 1));
W_UK and W_UV are views of one kv_b_proj.weight [h * (Dn + Dv), R] per copy. Both paths are timed as in
benchmarks/kernels_gemv.py: CUDA-graph replays over enough weight copies that one replay streams more than
160 MB of the product's weights (at least 4 copies), so they come from HBM and not from the 50 MB L2;
median of 15 replays, divided by the copies. GB/s = that product's weight bytes / time. Records go to
benchmarks/results/kernels_head_gemv.jsonl with one run_id (../shared/BENCHMARKS.md), next to the card's copy
bandwidth measured in the same run. The table ends with both products per decode step (x layers).

    python benchmarks/kernels_head_gemv.py [--ts 1,2,4] [--shapes v2-lite,v3] [--json PATH]
    python benchmarks/kernels_head_gemv.py --sweep [--sweep-ts 1,4] [--shapes ...]

--sweep times HeadGemvConfig candidates (block_n, block_k, num_warps) per product and T and prints the
best against head_gemv_config's choice. A failing candidate (compile, launch, capture) is reported and skipped.

Not run on a GPU yet: smoke-run on CPU only (interpreter, tiny shapes, timing stubbed).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gemv_bench as a script or imported
import gemv_bench  # noqa: E402
from gemv_bench import (DEVICE, REPO, add_step, checked_err, copy_count, fmt, record, rounded,  # noqa: E402
                        speeds, time_configs, timed_us)

RESULTS = REPO / "benchmarks" / "results" / "kernels_head_gemv.jsonl"
DN, DV, RANK, ROPE = 128, 128, 512, 64
HEADS = {"v2-lite": 16, "v3": 128}
LAYERS = {"v2-lite": 27, "v3": 61}  # MLA layers per decode step
PRODUCTS = ("w_uk", "w_uv")
CLI = gemv_bench.Cli(__doc__, RESULTS, models=",".join(HEADS), models_help="comma-separated models of HEADS",
                     rows="ts", rows_help="decode rows T for the table",
                     sweep_help="time block candidates per product instead", sweep_rows="1,4",
                     sweep_rows_help="decode rows T for --sweep")


def weight_copies(heads: int) -> list:
    """[kv_b_proj.weight [h * (Dn + Dv), R] bf16] copies, each product's half of them > COLD_BYTES in all."""
    import torch

    count = copy_count(2 * heads * DN * RANK)
    w = (torch.randn(heads * (DN + DV), RANK, device=DEVICE) / RANK ** 0.5).bfloat16()
    return [w] + [w.clone() for _ in range(count - 1)]


def split(kv_b, heads: int) -> dict:
    """{"w_uk": W_UK [h, Dn, R], "w_uv": W_UV^T [h, R, Dv]}: the layer's views (MLAAttention._kv_b_weights)."""
    w = kv_b.view(heads, DN + DV, RANK)
    return {"w_uk": w[:, :DN], "w_uv": w[:, DN:].transpose(1, 2)}


def operand(product: str, t: int, heads: int):
    """x as the layer has it: q_nope [T, h, Dn] (strided: q is [T, h, Dn + Dr]) or o_lat [T, h, R]."""
    import torch

    if product == "w_uk":
        return torch.randn(t, heads, DN + ROPE, device=DEVICE).bfloat16()[..., :DN]
    return torch.randn(t, heads, RANK, device=DEVICE).bfloat16()


def torch_fn(product: str, x, w):
    """Today's path in layers/mla.py (Triton route), as a closure."""
    import torch

    if product == "w_uk":
        return lambda: torch.einsum("thd,hdr->thr", x, w)

    def bmm():
        out = x.new_empty(x.shape[0], x.shape[1], w.shape[2])  # [T, h, Dv]
        torch.bmm(x.transpose(0, 1), w, out=out.transpose(0, 1))
        return out
    return bmm


def kernel_fn(product: str, x, w, config=None):
    """The head GEMV as the layer calls it (W_UV into a given token-major out), as a closure."""
    from deepserve.kernels.head_gemv import head_gemv

    if product == "w_uk":
        return lambda: head_gemv(x, w, config=config)
    return lambda: head_gemv(x, w, x.new_empty(x.shape[0], x.shape[1], w.shape[2]), config)


def cases(models: list[str], ts: list[int]):
    """(model, heads, product, t, x, [w per copy]) per shape, product and T, one shape's copies at a time."""
    import torch

    for model in models:
        heads = HEADS[model]
        kv_b = weight_copies(heads)
        for product in PRODUCTS:
            ws = [split(w, heads)[product] for w in kv_b]
            for t in ts:
                yield model, heads, product, t, operand(product, t, heads), ws
        del kv_b, ws
        torch.cuda.empty_cache()


def head_record(env: dict, workload: str, model: str, product: str, t: int, ws: list) -> dict:
    """The BENCHMARKS.md fields shared by this script's records."""
    w = ws[0]
    return record(env, workload, model, product, t, ws, heads=w.shape[0], k=w.shape[1], n=w.shape[2])


def bench(models: list[str], ts: list[int], result_file: str, run_id: str, copy_gbs: float | None) -> None:
    import torch

    from deepserve.bench.offline import append_record, environment_fields
    from deepserve.kernels.head_gemv import head_gemv_config

    env = environment_fields(torch.cuda.get_device_name(), run_id)
    step_us: dict[tuple[str, int], list[float]] = {}  # (model, T) -> [kernel, torch] us per decode step
    print(f"\n{'model':<8} {'product':<5} {'T':>2} {'kernel us':>9} {'torch us':>8} {'kernel GB/s':>11} "
          f"{'torch GB/s':>10} {'speedup':>7} {'of copy':>7}  config / rel err")
    for model, heads, product, t, x, ws in cases(models, ts):
        w, nbytes = ws[0], ws[0].numel() * 2
        cfg = head_gemv_config(w.shape[1], w.shape[2], w.stride(1) == 1, w.dtype)
        err = checked_err("head_gemv", lambda: kernel_fn(product, x, w)(), lambda: torch_fn(product, x, w)())
        ours = timed_us(lambda w: kernel_fn(product, x, w), ws)
        ref = timed_us(lambda w: torch_fn(product, x, w), ws)
        s = speeds(nbytes, ours, ref, copy_gbs)
        if s.speedup is not None:
            add_step(step_us, (model, t), LAYERS[model], ours, ref)
        print(f"{model:<8} {product:<5} {t:2d} {fmt(ours, 9, 2)} {fmt(ref, 8, 2)} {fmt(s.ours_gbs, 11, 0)} "
              f"{fmt(s.ref_gbs, 10, 0)} {fmt(s.speedup, 7, 2)} {fmt(s.of_copy, 7, 2)}  {tuple(cfg)} / {fmt(err, 0, 6)}",
              flush=True)
        append_record({**head_record(env, "kernel-head-gemv", model, product, t, ws), "kernel_us": rounded(ours),
                       "torch_us": rounded(ref), "kernel_gbs": s.ours_gbs, "torch_gbs": s.ref_gbs,
                       "speedup": s.speedup, "kernel_of_copy_bw": s.of_copy, "config": list(cfg), "max_rel_err": err,
                       "notes": f"CUDA-graph replay over {len(ws)} weight copies (> 160 MB, cold L2), median of 15; "
                                f"torch = layers/mla.py's einsum (w_uk) / bmm into token-major rows (w_uv); GB/s = "
                                f"weight bytes / time; of_copy_bw: over this run's device-to-device copy bandwidth"},
                      result_file)
    for (model, t), (ours, ref) in step_us.items():
        print(f"{model} T={t}: both products per decode step (x {LAYERS[model]} layers) {ours:.1f} us with the "
              f"kernel, {ref:.1f} us with torch ({ref / ours:.2f}x)")


def candidates(product: str) -> list:
    """HeadGemvConfig candidates with 2-32 KB bf16 tiles, every thread holding whole 16-byte vectors."""
    from deepserve.kernels.head_gemv import HeadGemvConfig

    if product == "w_uk":  # N-contiguous: rows of 32-256 bytes
        shapes = [(bn, bk) for bn in (16, 32, 64, 128) for bk in (16, 32, 64, 128)]
    else:  # K-contiguous: all of K or half of it
        shapes = [(bn, bk) for bn in (1, 2, 4, 8, 16, 32) for bk in (256, 512)]
    return [HeadGemvConfig(bn, bk, warps) for bn, bk in shapes for warps in (1, 2, 4, 8)
            if 1024 <= bn * bk <= 16384 and bn * bk // 8 >= 32 * warps]


def sweep(models: list[str], ts: list[int], result_file: str, run_id: str) -> None:
    import torch

    from deepserve.bench.offline import append_record, environment_fields
    from deepserve.kernels.head_gemv import head_gemv_config

    env = environment_fields(torch.cuda.get_device_name(), run_id)
    for model, heads, product, t, x, ws in cases(models, ts):
        w = ws[0]
        table = head_gemv_config(w.shape[1], w.shape[2], w.stride(1) == 1, w.dtype)
        timed = time_configs(table, candidates(product),
                             lambda cfg: timed_us(lambda w: kernel_fn(product, x, w, cfg), ws))
        if timed is None:
            continue
        print(f"{model:<8} {product:<5} T={t}: best {tuple(timed.best)} {timed.times[timed.best]:.2f} us; table "
              f"{tuple(table)} {fmt(timed.table_us, 0, 2)} us | top 3: {timed.top()}", flush=True)
        append_record({**head_record(env, "kernel-head-gemv-sweep", model, product, t, ws),
                       **timed.fields("block_n, block_k, num_warps")}, result_file)


def main() -> None:
    gemv_bench.main(CLI, bench, sweep)


if __name__ == "__main__":
    main()
