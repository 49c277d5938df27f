"""Same-call A/B of two source trees: `deepserve.bench.offline` run alternately from each tree's folder.

    python benchmarks/ab_trees.py --base DIR [--runs 2] --result-file R --run-id ID -- \
        throughput --model v2-lite --load-format dummy --quantization int8 [--num-iters 3]

DIR holds the base tree's `deepserve/` package (e.g. `git archive BASE deepserve | tar -x -C DIR`); the new
tree is this checkout. Runs alternate new, base, new, base, ... (`--runs` pairs), each a fresh process of
`python -m deepserve.bench.offline ARGS --result-file R --run-id ID --notes "<tree>"` whose working
directory is the tree's folder: `python -m` puts the working directory first on sys.path, so PYTHONPATH
alone would import this checkout for both sides (runs s10a/b/e/f made that mistake). Before the runs the
script asks a process started in each folder which `deepserve` it imports and stops if it is not the tree's.
A `--model` that names a shape under benchmarks/configs is passed as that folder's absolute path (the base
package would look for it beside itself).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_from(tree: Path) -> Path | None:
    """The `deepserve/__init__.py` that `python` started in `tree` imports (None: it imports none)."""
    out = subprocess.run([sys.executable, "-c", "import deepserve; print(deepserve.__file__)"], cwd=tree,
                         capture_output=True, text=True)
    return Path(out.stdout.strip()).resolve() if out.returncode == 0 else None


def check_import(tree: Path) -> None:
    """SystemExit unless a process started in `tree` imports `tree`'s deepserve."""
    got = imported_from(tree)
    if got != (tree / "deepserve" / "__init__.py").resolve():
        raise SystemExit(f"a process started in {tree} imports {got}, not its own deepserve: not an A/B")


def bench_args(args: list[str], result_file: Path, run_id: str, label: str) -> list[str]:
    """The benchmark's arguments for one run: a shape name made absolute, the shared result file and run id,
    and the tree's label in the notes."""
    args = list(args)
    i = args.index("--model") + 1 if "--model" in args else len(args)
    if i < len(args) and (ROOT / "benchmarks" / "configs" / args[i] / "config.json").is_file():
        args[i] = str(ROOT / "benchmarks" / "configs" / args[i])
    return args + ["--result-file", str(result_file.resolve()), "--run-id", run_id, "--notes", label]


def schedule(base: Path, runs: int) -> list[tuple[Path, str]]:
    """(tree, label) for each run: new, base, new, base, ..."""
    new = ROOT
    return [pair for i in range(runs) for pair in (
        (new, f"A/B new tree ({new}), run {i + 1}"), (base, f"A/B base tree ({base}), run {i + 1}"))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", type=Path, required=True, help="folder holding the base tree's deepserve/")
    p.add_argument("--runs", type=int, default=2, help="pairs of runs (new, base)")
    p.add_argument("--result-file", type=Path, required=True)
    p.add_argument("--run-id", required=True)
    p.add_argument("bench", nargs=argparse.REMAINDER, help="-- then the arguments of deepserve.bench.offline")
    ns = p.parse_args(argv)
    bench = ns.bench[1:] if ns.bench[:1] == ["--"] else ns.bench
    if not bench or ns.runs < 1:
        p.error("give --runs >= 1 and, after --, the benchmark's arguments")
    base = ns.base.resolve()
    for tree in (ROOT, base):
        check_import(tree)
    for tree, label in schedule(base, ns.runs):
        cmd = [sys.executable, "-m", "deepserve.bench.offline", *bench_args(bench, ns.result_file, ns.run_id, label)]
        print(f"[{label}]", flush=True)
        subprocess.run(cmd, cwd=tree, check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
