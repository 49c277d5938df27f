"""Pick kernels/gemv.py's TABLE and INT8_TABLE from `kernels_gemv.py --sweep` records at M = 1.

    python benchmarks/gemv_table.py --run-ids INT8_RUN,BF16_RUN [--records PATH] [--write]

Every sweep record ranks the candidate configs timed on one layer shape. The table's buckets (largest N,
largest K) stay as they are; for each bucket and weight dtype this picks the candidate whose config, as
`gemv_config` would fit it to each shape of the bucket (`fit_config`), has the least time summed over the
bucket's shapes, each weighted by its calls per decode step (`kernels_gemv.PER_STEP`). A candidate is
skipped when one of the bucket's shapes lacks a timing of its fitted config, or when its fitted config
leaves fewer than MIN_PROGRAMS programs (2 per SM of an H200; tests/kernels/test_gemv.py checks the
table for it). The LM head stays out of INT8_TABLE: W8A16 keeps it in bf16. The router has its own
kernel. Prints the tables; --write puts them into deepserve/kernels/gemv.py.
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

MIN_PROGRAMS = 264
GEMV_SOURCE = REPO / "deepserve" / "kernels" / "gemv.py"


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


def sweeps(records: list[dict], run_ids: set[str], int8: bool) -> list[dict]:
    """The M = 1 sweep records of these runs for one weight dtype (router, and for int8 the LM head, left out; the
    dp4a kernel's records are not this table's)."""
    return [r for r in records if r.get("workload") == "kernel-gemv-sweep" and r.get("run_id") in run_ids
            and r.get("batch") == 1 and r["layer"] != "router" and (r.get("quant") == "int8-weight-only") == int8
            and not (int8 and r["layer"] == "lm_head") and r.get("kernel") != "dp4a"]


def pick(rows: list[dict], table: list[tuple[int, int, tuple]], int8: bool, fit) -> list[Entry]:
    """One Entry per (max N, max K, config) of the current table: a new config where the bucket holds a
    swept shape, the current one where it holds none. fit(config, k) -> the fitted kernel config (a tuple)."""
    times = {(r["model"], r["layer"]): {tuple(GemvConfig(*c)): t for c, t in r["ranked"]} for r in rows}
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
            entry = trimmed((c[0], c[1] // 2 if int8 else c[1], *c[2:]))  # kernel columns -> the table's 2-byte columns
            total = 0.0
            for s in members:
                n, k = shapes[s]
                fitted = fit(entry, k)
                if fitted not in times[s] or -(-n // fitted[0]) * fitted[2] < MIN_PROGRAMS:
                    break
                total += PER_STEP[s[0]][s[1]] * times[s][fitted]
            else:
                if best is None or total < best[0]:
                    best = (total, entry)
        if best is None:
            raise SystemExit(f"no candidate was timed on every shape of bucket {(max_n, max_k)}")
        entries.append(Entry(max_n, max_k, best[1], [f"{m}/{layer}" for m, layer in members], round(best[0], 1)))
    return entries


def render(name: str, entries: list[Entry], any_: int) -> str:
    """The `NAME: tuple[...] = (...)` block of gemv.py."""
    bound = lambda v: "_ANY" if v == any_ else str(v)  # noqa: E731
    lines = []
    for e in entries:
        line = f"    ({bound(e.max_n)}, {bound(e.max_k)}, GemvConfig{trimmed(e.config)}),"
        comment = f"# {', '.join(e.members) or 'no swept shape: kept'}"
        fits = len(line) + 2 + len(comment) <= 120
        lines.append(f"{line}  {comment}\n" if fits else f"    {comment}\n{line}\n")
    return f"{name}: tuple[tuple[int, int, GemvConfig], ...] = (\n{''.join(lines)})\n"


def replace_table(source: str, name: str, block: str) -> str:
    """source with its NAME block replaced by block; the block must be there once."""
    pattern = rf"^{name}: tuple\[tuple\[int, int, GemvConfig\], \.\.\.\] = \(\n.*?^\)\n"
    new, count = re.subn(pattern, lambda _: block, source, count=1, flags=re.S | re.M)
    if count != 1:
        raise ValueError(f"{name} not found in the source")
    return new


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", default=str(RESULTS))
    p.add_argument("--run-ids", required=True, help="comma-separated sweep run ids (the int8 and the bf16 sweep)")
    p.add_argument("--write", action="store_true", help="put the tables into deepserve/kernels/gemv.py")
    args = p.parse_args()
    import torch

    from deepserve.kernels import gemv as G

    records = [json.loads(line) for line in Path(args.records).read_text().splitlines() if line.strip()]
    run_ids = set(args.run_ids.split(","))
    source = GEMV_SOURCE.read_text()
    for name, table, dtype in (("TABLE", G.TABLE, torch.bfloat16), ("INT8_TABLE", G.INT8_TABLE, torch.int8)):
        rows = sweeps(records, run_ids, dtype == torch.int8)
        if not rows:
            print(f"{name}: no sweep records in runs {sorted(run_ids)}; left as it is")
            continue
        fit = lambda c, k, d=dtype: tuple(G.fit_config(G.GemvConfig(*c), 1, k, d))  # noqa: E731
        entries = pick(rows, list(table), dtype == torch.int8, fit)
        for e in entries:
            print(f"{name} ({e.max_n}, {e.max_k}): {e.config} {e.step_us} us per step over {', '.join(e.members)}")
        source = replace_table(source, name, render(name, entries, G._ANY))
    if args.write:
        GEMV_SOURCE.write_text(source)
        print(f"written to {GEMV_SOURCE}")


if __name__ == "__main__":
    main()
