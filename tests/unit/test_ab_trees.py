"""benchmarks/ab_trees.py: the run order, the benchmark arguments, and the import check that makes the A/B
real (a process started in the base tree's folder must import that tree's deepserve)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
ab = importlib.import_module("ab_trees")


def test_schedule_alternates_new_and_base(tmp_path):
    runs = ab.schedule(tmp_path, 2)
    assert [tree for tree, _ in runs] == [ab.ROOT, tmp_path, ab.ROOT, tmp_path]
    assert "new tree" in runs[0][1] and "base tree" in runs[1][1] and runs[3][1].endswith("run 2")


def test_bench_args_resolve_shapes_and_append_the_record_fields(tmp_path):
    got = ab.bench_args(["latency", "--model", "qwen-7b", "--load-format", "dummy"], tmp_path / "r.jsonl", "x1", "L")
    assert got[2] == str(ab.ROOT / "benchmarks" / "configs" / "qwen-7b")  # absolute: the base looks beside itself
    assert got[-6:] == ["--result-file", str((tmp_path / "r.jsonl").resolve()), "--run-id", "x1", "--notes", "L"]
    kept = ab.bench_args(["latency", "--model", "/some/folder"], tmp_path / "r.jsonl", "x1", "L")
    assert kept[2] == "/some/folder"
    assert ab.bench_args(["latency", "--model"], tmp_path / "r.jsonl", "x1", "L")[:2] == ["latency", "--model"]


def test_import_check_accepts_a_tree_and_refuses_a_folder_without_one(tmp_path):
    tree = tmp_path / "base"
    (tree / "deepserve").mkdir(parents=True)
    (tree / "deepserve" / "__init__.py").write_text("")
    ab.check_import(tree)  # a process started there imports the tree's package
    assert ab.imported_from(tree) == (tree / "deepserve" / "__init__.py").resolve()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="not an A/B"):
        ab.check_import(empty)  # falls back to the installed deepserve: the mistake this script prevents
