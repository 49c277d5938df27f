"""Pick kernels/gemv.py's TABLE and INT8_TABLE, and kernels/gemv_dp4a.py's TABLE, from `kernels_gemv.py --sweep`
records at M = 1.

    python benchmarks/gemv_table.py --run-ids INT8_RUN,BF16_RUN,DP4A_RUN [--records PATH] [--write]

Every sweep record ranks the candidate configs timed on one layer shape. The table's buckets (largest N,
largest K) stay as they are; for each bucket and weight dtype this picks the candidate whose config, as
`gemv_config` would fit it to each shape of the bucket (`fit_config`), has the least time summed over the
bucket's shapes, each weighted by its calls per decode step (`kernels_gemv.PER_STEP`). A candidate is
skipped when one of the bucket's shapes lacks a timing of its fitted config, or when its fitted config
leaves fewer than MIN_PROGRAMS programs (2 per SM of an H200; tests/kernels/test_gemv.py checks the
table for it). The LM head stays out of INT8_TABLE and the dp4a TABLE: W8A16 keeps it in bf16. The router has
its own kernel. The dp4a sweep's records ("kernel": "dp4a", `--weights dp4a`) feed only the dp4a TABLE, whose
entries are Dp4aConfig fields as swept (an x-stationary config's program runs `blocks` row blocks). Prints
the tables; --write puts them into deepserve/kernels/gemv.py and deepserve/kernels/gemv_dp4a.py.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemv_bench import REPO  # noqa: E402
from kernels_gemv import PER_STEP, RESULTS  # noqa: E402

from deepserve.kernels.gemv import GemvConfig  # noqa: E402
from deepserve.kernels.gemv_dp4a import Dp4aConfig  # noqa: E402
from deepserve.kernels.sizes import cdiv  # noqa: E402

MIN_PROGRAMS = 264
GEMV_SOURCE = REPO / "deepserve" / "kernels" / "gemv.py"
DP4A_SOURCE = REPO / "deepserve" / "kernels" / "gemv_dp4a.py"


class Entry(NamedTuple):
    max_n: int
    max_k: int
    config: tuple  # GemvConfig fields (`trimmed`), BLOCK_K in the table's 2-byte columns
    members: list  # "model/layer" of the bucket's shapes
    step_us: float  # the weighted time of the members


def trimmed(config) -> tuple:
    """A config's fields without the trailing defaults that are None (a 4-field record: no register cap)."""
    fields = tuple(config)
    while fields and fields[-1] is None:
        fields = fields[:-1]
    return fields


def sweeps(records: list[dict], run_ids: set[str], int8: bool, dp4a: bool = False) -> list[dict]:
    """The M = 1 sweep records of these runs for one weight dtype (router, and for int8 the LM head, left out), of
    the float32 GEMV or (dp4a, int8 only) of the dp4a kernel."""
    return [r for r in records if r.get("workload") == "kernel-gemv-sweep" and r.get("run_id") in run_ids
            and r.get("batch") == 1 and r["layer"] != "router" and (r.get("quant") == "int8-weight-only") == int8
            and not (int8 and r["layer"] == "lm_head") and (r.get("kernel") == "dp4a") == dp4a]


def gemv_entry(config: tuple, int8: bool) -> tuple:
    """A swept GemvConfig -> the table's entry (int8 kernel columns -> the table's 2-byte columns)."""
    return trimmed((config[0], config[1] // 2 if int8 else config[1], *config[2:]))


def gemv_programs(fitted: tuple, n: int) -> int:
    """Programs of a fitted GemvConfig (block_n, block_k, split_k, ...) over N rows."""
    return cdiv(n, fitted[0]) * fitted[2]


def dp4a_programs(fitted: tuple, n: int) -> int:
    """Programs of a fitted Dp4aConfig over N rows: an x-stationary program runs `blocks` row blocks."""
    return cdiv(cdiv(n, fitted[0]), max(1, fitted[4]))


def pick(rows: list[dict], table: list[tuple[int, int, tuple]], int8: bool, fit, config_cls=GemvConfig,
         to_entry=gemv_entry, programs=gemv_programs) -> list[Entry]:
    """One Entry per (max N, max K, config) of the current table: a new config where the bucket holds a
    swept shape, the current one where it holds none. fit(config, k) -> the fitted kernel config (a tuple);
    to_entry(swept config, int8) -> the table's entry; programs(fitted, n) -> the programs it launches."""
    times = {(r["model"], r["layer"]): {tuple(config_cls(*c)): t for c, t in r["ranked"]} for r in rows}
    shapes = {(r["model"], r["layer"]): (r["n"], r["k"]) for r in rows}
    candidates = sorted({c for t in times.values() for c in t}, key=lambda c: tuple(-1 if v is None else v for v in c))
    entries, placed = [], set()
    for max_n, max_k, current in table:
        members = [s for s, (n, k) in shapes.items() if n <= max_n and k <= max_k and s not in placed]
        placed.update(members)
        if not members:
            entries.append(Entry(max_n, max_k, trimmed(current), [], 0.0))
            continue
        best = None
        for c in candidates:
            entry = to_entry(c, int8)
            total = 0.0
            for s in members:
                n, k = shapes[s]
                fitted = fit(entry, k)
                if fitted not in times[s] or programs(fitted, n) < MIN_PROGRAMS:
                    break
                total += PER_STEP[s[0]][s[1]] * times[s][fitted]
            else:
                if best is None or total < best[0]:
                    best = (total, entry)
        if best is None:
            raise SystemExit(f"no candidate was timed on every shape of bucket {(max_n, max_k)}")
        entries.append(Entry(max_n, max_k, best[1], [f"{m}/{layer}" for m, layer in members], round(best[0], 1)))
    return entries


def render(name: str, entries: list[Entry], any_: int, cls_name: str = "GemvConfig") -> str:
    """The `NAME: tuple[...] = (...)` block of gemv.py (or, with cls_name "Dp4aConfig", of gemv_dp4a.py)."""
    bound = lambda v: "_ANY" if v == any_ else str(v)  # noqa: E731
    lines = []
    for e in entries:
        line = f"    ({bound(e.max_n)}, {bound(e.max_k)}, {cls_name}{trimmed(e.config)}),"
        comment = f"# {', '.join(e.members) or 'no swept shape: kept'}"
        fits = len(line) + 2 + len(comment) <= 120
        lines.append(f"{line}  {comment}\n" if fits else f"    {comment}\n{line}\n")
    return f"{name}: tuple[tuple[int, int, {cls_name}], ...] = (\n{''.join(lines)})\n"


def replace_table(source: str, name: str, block: str, cls_name: str = "GemvConfig") -> str:
    """source with its NAME block replaced by block; the block must be there once."""
    pattern = rf"^{name}: tuple\[tuple\[int, int, {cls_name}\], \.\.\.\] = \(\n.*?^\)\n"
    new, count = re.subn(pattern, lambda _: block, source, count=1, flags=re.S | re.M)
    if count != 1:
        raise ValueError(f"{name} not found in the source")
    return new


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", default=str(RESULTS))
    p.add_argument("--run-ids", required=True, help="comma-separated sweep run ids (the int8, bf16 and dp4a sweeps)")
    p.add_argument("--write", action="store_true", help="put the tables into gemv.py and gemv_dp4a.py")
    args = p.parse_args()
    records = [json.loads(line) for line in Path(args.records).read_text().splitlines() if line.strip()]
    run_ids = set(args.run_ids.split(","))
    gemv_source = float_tables(records, run_ids, GEMV_SOURCE.read_text())
    dp4a_source = dp4a_table(records, run_ids, DP4A_SOURCE.read_text())
    if args.write:
        GEMV_SOURCE.write_text(gemv_source)
        DP4A_SOURCE.write_text(dp4a_source)
        print(f"written to {GEMV_SOURCE} and {DP4A_SOURCE}")


def float_tables(records: list[dict], run_ids: set[str], source: str) -> str:
    """gemv.py's source with TABLE and INT8_TABLE picked from the float32 GEMV's sweeps (printed)."""
    import torch

    from deepserve.kernels import gemv as G

    for name, table, dtype in (("TABLE", G.TABLE, torch.bfloat16), ("INT8_TABLE", G.INT8_TABLE, torch.int8)):
        rows = sweeps(records, run_ids, dtype == torch.int8)
        if not rows:
            print(f"{name}: no sweep records in runs {sorted(run_ids)}; left as it is")
            continue
        fit = lambda c, k, d=dtype: tuple(G.fit_config(G.GemvConfig(*c), 1, k, d))  # noqa: E731
        entries = pick(rows, list(table), dtype == torch.int8, fit)
        print_entries(name, entries)
        source = replace_table(source, name, render(name, entries, G._ANY))
    return source


def dp4a_table(records: list[dict], run_ids: set[str], source: str) -> str:
    """gemv_dp4a.py's source with TABLE picked from the dp4a kernel's sweeps (printed)."""
    from deepserve.kernels import gemv_dp4a as D

    rows = sweeps(records, run_ids, True, dp4a=True)
    if not rows:
        print(f"dp4a TABLE: no sweep records in runs {sorted(run_ids)}; left as it is")
        return source
    fit = lambda c, k: tuple(D.fit_config(D.Dp4aConfig(*c), 1, k))  # noqa: E731
    entries = pick(rows, list(D.TABLE), True, fit, Dp4aConfig, lambda c, _: trimmed(c), dp4a_programs)
    print_entries("dp4a TABLE", entries)
    return replace_table(source, "TABLE", render("TABLE", entries, D._ANY, "Dp4aConfig"), "Dp4aConfig")


def print_entries(name: str, entries: list[Entry]) -> None:
    for e in entries:
        print(f"{name} ({e.max_n}, {e.max_k}): {e.config} {e.step_us} us per step over {', '.join(e.members)}")


if __name__ == "__main__":
    main()
