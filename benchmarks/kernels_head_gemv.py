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

import argparse
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_dense, gpu_quant as scripts or imported
from gpu_dense import REPO, bandwidth, ceilings  # noqa: E402
from gpu_quant import time_ms  # noqa: E402

sys.path.insert(0, str(REPO))  # deepserve from this checkout
RESULTS = REPO / "benchmarks" / "results" / "kernels_head_gemv.jsonl"
DEVICE = "cuda"
COLD_BYTES = 160 << 20
MIN_COPIES = 4
DN, DV, RANK, ROPE = 128, 128, 512, 64
HEADS = {"v2-lite": 16, "v3": 128}
LAYERS = {"v2-lite": 27, "v3": 61}  # MLA layers per decode step
PRODUCTS = ("w_uk", "w_uv")


def weight_copies(heads: int) -> list:
    """[kv_b_proj.weight [h * (Dn + Dv), R] bf16] copies, each product's half of them > COLD_BYTES in all."""
    import torch

    count = max(MIN_COPIES, -(-COLD_BYTES // (2 * heads * DN * RANK)))
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


def timed_us(make_fn, copies) -> float | None:
    """us per call of make_fn(w) over the copies; None (and a message) when it fails."""
    try:
        return 1e3 * time_ms([make_fn(w) for w in copies])
    except Exception as exc:  # noqa: BLE001 - a compile, launch or capture failure of one candidate
        print(f"    failed: {exc!r}"[:300], file=sys.stderr, flush=True)
        return None


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


def record(env: dict, workload: str, model: str, product: str, t: int, ws: list) -> dict:
    """The BENCHMARKS.md fields shared by this script's records."""
    w = ws[0]
    return {**env, "engine": "deepserve", "engine_version": None, "model": model, "dtype": "bfloat16",
            "quant": "none", "tp": 1, "pp": 1, "ep": 1, "workload": workload, "batch": t, "layer": product,
            "heads": w.shape[0], "k": w.shape[1], "n": w.shape[2], "copies": len(ws)}


def rel_err(got, ref) -> float:
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


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
        try:
            err = rel_err(kernel_fn(product, x, w)(), torch_fn(product, x, w)())
        except Exception as exc:  # noqa: BLE001 - reported; the torch path is still timed
            print(f"    head_gemv failed: {exc!r}"[:300], file=sys.stderr, flush=True)
            err = None
        ours = timed_us(lambda w: kernel_fn(product, x, w), ws)
        ref = timed_us(lambda w: torch_fn(product, x, w), ws)
        gbs = {name: None if us is None else round(nbytes / us / 1e3, 1)
               for name, us in (("kernel", ours), ("torch", ref))}
        speedup = None if ours is None or ref is None else round(ref / ours, 3)
        if speedup is not None:
            totals = step_us.setdefault((model, t), [0.0, 0.0])
            totals[0], totals[1] = totals[0] + LAYERS[model] * ours, totals[1] + LAYERS[model] * ref
        share = None if gbs["kernel"] is None or not copy_gbs else round(gbs["kernel"] / copy_gbs, 3)
        print(f"{model:<8} {product:<5} {t:2d} {_f(ours, 9, 2)} {_f(ref, 8, 2)} {_f(gbs['kernel'], 11, 0)} "
              f"{_f(gbs['torch'], 10, 0)} {_f(speedup, 7, 2)} {_f(share, 7, 2)}  {tuple(cfg)} / {_f(err, 0, 6)}",
              flush=True)
        append_record({**record(env, "kernel-head-gemv", model, product, t, ws), "kernel_us": _r(ours),
                       "torch_us": _r(ref), "kernel_gbs": gbs["kernel"], "torch_gbs": gbs["torch"], "speedup": speedup,
                       "kernel_of_copy_bw": share, "config": list(cfg), "max_rel_err": err,
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
        times = {}
        for cfg in [table] + [c for c in candidates(product) if c != table]:
            us = timed_us(lambda w, cfg=cfg: kernel_fn(product, x, w, cfg), ws)
            if us is not None:
                times[cfg] = us
        if not times:
            continue
        ranked = sorted(times, key=times.get)
        best, table_us = ranked[0], times.get(table)
        top = ", ".join(f"{tuple(c)} {times[c]:.2f}" for c in ranked[:3])
        print(f"{model:<8} {product:<5} T={t}: best {tuple(best)} {times[best]:.2f} us; table {tuple(table)} "
              f"{_f(table_us, 0, 2)} us | top 3: {top}", flush=True)
        append_record({**record(env, "kernel-head-gemv-sweep", model, product, t, ws), "best_config": list(best),
                       "best_us": _r(times[best]), "table_config": list(table), "table_us": _r(table_us),
                       "ranked": [[list(c), _r(times[c])] for c in ranked],
                       "notes": "config = (block_n, block_k, num_warps); CUDA-graph replays over cold weight "
                                "copies, median of 15"}, result_file)


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def _f(v: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}s}" if v is None else f"{v:{width}.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(HEADS), help="comma-separated models of HEADS")
    parser.add_argument("--ts", default="1,2,4", help="decode rows T for the table")
    parser.add_argument("--sweep", action="store_true", help="time block candidates per product instead")
    parser.add_argument("--sweep-ts", default="1,4", help="decode rows T for --sweep")
    parser.add_argument("--json", default=str(RESULTS), help="records are appended here ('' for none)")
    parser.add_argument("--run-id", default=uuid.uuid4().hex[:12])
    args = parser.parse_args()
    import torch

    models = args.shapes.split(",")
    with torch.inference_mode():
        if args.sweep:
            sweep(models, [int(t) for t in args.sweep_ts.split(",")], args.json, args.run_id)
            return
        copy_gbs = None
        if args.json:
            ceilings(args.json, args.run_id)
            copy_gbs = bandwidth(Path(args.json), args.run_id)
            print(f"device-to-device copy: {copy_gbs} GB/s (read + write)")
        bench(models, [int(t) for t in args.ts.split(",")], args.json, args.run_id, copy_gbs)
    print(f"\nrun {args.run_id} -> {args.json or '(not recorded)'}")


if __name__ == "__main__":
    main()
