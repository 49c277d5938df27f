"""benchmarks/gemv_table.py: picking kernels/gemv.py's tables from sweep records (CPU, synthetic records)."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest
import torch

from deepserve.kernels import gemv as G

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
gemv_table = importlib.import_module("gemv_table")


def record(model, layer, n, k, ranked, int8=False, run_id="r1"):
    return {"workload": "kernel-gemv-sweep", "run_id": run_id, "batch": 1, "model": model, "layer": layer,
            "n": n, "k": k, "quant": "int8-weight-only" if int8 else "none",
            "ranked": [[list(c), t] for c, t in ranked]}


def fit_bf16(c, k):
    return tuple(G.fit_config(G.GemvConfig(*c), 1, k, torch.bfloat16))


def test_pick_minimises_the_per_step_weighted_time():
    """qwen-7b's down runs 28 times a step, V2-Lite's dense down once: the candidate with the least
    weighted sum wins, though the unweighted sum would pick the other."""
    a, b = (4, 1024, 1, 4), (2, 1024, 1, 4)
    rows = [record("qwen-7b", "down", 3584, 18944, [(a, 20.0), (b, 20.5)]),
            record("v2-lite", "dense_down", 2048, 10944, [(a, 10.0), (b, 5.0)])]
    # a: 28 * 20 + 10 = 570; b: 28 * 20.5 + 5 = 579 (unweighted: 30 against 25.5)
    entries = gemv_table.pick(rows, [(4096, 1 << 62, G.GemvConfig(1, 1024, 1, 4))], False, fit_bf16)
    assert entries[0].config == a and entries[0].step_us == 570.0
    assert entries[0].members == ["qwen-7b/down", "v2-lite/dense_down"]


def test_pick_skips_too_few_programs_and_untimed_fits_and_keeps_empty_buckets():
    """A candidate whose fitted config leaves < 264 programs, or that was not timed on every shape of the
    bucket, is skipped; a bucket with no swept shape keeps its current entry."""
    few, ok, untimed = (16, 1024, 1, 4), (2, 1024, 1, 4), (8, 1024, 1, 4)
    rows = [record("qwen-7b", "o", 3584, 3584, [(few, 1.0), (ok, 5.0), (untimed, 2.0)]),
            record("v2-lite", "o", 2048, 2048, [(few, 1.0), (ok, 4.0)])]
    kept = G.GemvConfig(4, 2048, 1, 8)
    entries = gemv_table.pick(rows, [(4096, 4096, G.GemvConfig(1, 1024, 1, 4)), (1 << 62, 1 << 62, kept)],
                              False, fit_bf16)
    assert entries[0].config == ok  # 16 rows a program: 3584 / 16 = 224 programs < 264
    assert entries[1] == gemv_table.Entry(1 << 62, 1 << 62, tuple(kept)[:4], [], 0.0)
    with pytest.raises(SystemExit):
        gemv_table.pick([record("qwen-7b", "o", 3584, 3584, [(few, 1.0)])],
                        [(4096, 4096, G.GemvConfig(1, 1024, 1, 4))], False, fit_bf16)


def test_int8_candidates_convert_to_the_tables_columns():
    """Sweep records hold kernel configs (int8 columns); INT8_TABLE holds 2-byte columns, so a swept
    (4, 2048, 1, 4) is the entry (4, 1024, 1, 4), which gemv_config fits back to (4, 2048, 1, 4)."""
    fit = lambda c, k: tuple(G.fit_config(G.GemvConfig(*c), 1, k, torch.int8))  # noqa: E731
    rows = [record("qwen-7b", "o", 3584, 3584, [((4, 2048, 1, 4), 5.6), ((1, 2048, 1, 4), 6.6)], int8=True)]
    entries = gemv_table.pick(rows, [(4096, 4096, G.GemvConfig(1, 1024, 1, 4))], True, fit)
    assert entries[0].config == (4, 1024, 1, 4)
    capped = [record("qwen-7b", "qkv", 4608, 3584, [((8, 2048, 1, 4, 96), 6.4), ((8, 2048, 1, 4), 8.1)], int8=True)]
    entry = gemv_table.pick(capped, [(8192, 1 << 62, G.GemvConfig(1, 1024, 1, 4))], True, fit)[0]
    assert entry.config == (8, 1024, 1, 4, 96) and fit(entry.config, 3584)[4] == 96  # the cap survives
    assert fit(entries[0].config, 3584) == G.GemvConfig(4, 2048, 1, 4)


def test_sweeps_filter_runs_dtype_router_and_int8_lm_head():
    rows = [record("qwen-7b", "o", 1, 1, [], run_id="r1"), record("qwen-7b", "o", 1, 1, [], run_id="r2"),
            record("v2-lite", "router", 1, 1, []), record("qwen-7b", "lm_head", 1, 1, [], int8=True),
            record("qwen-7b", "lm_head", 1, 1, []), record("qwen-7b", "qkv", 1, 1, [], int8=True)]
    bf16 = gemv_table.sweeps(rows, {"r1"}, False)
    assert [(r["layer"], r["run_id"]) for r in bf16] == [("o", "r1"), ("lm_head", "r1")]
    assert [r["layer"] for r in gemv_table.sweeps(rows, {"r1"}, True)] == ["qkv"]


def test_rendered_tables_replace_gemv_py_and_parse_back():
    """Rendering the current tables and putting them into gemv.py's source gives the same tables back
    (read with ast), every line within 120 characters; a missing block is an error."""
    source = gemv_table.GEMV_SOURCE.read_text()
    new = source
    for name, table in (("TABLE", G.TABLE), ("INT8_TABLE", G.INT8_TABLE)):
        entries = [gemv_table.Entry(n, k, tuple(c), ["qwen-7b/gate_up", "qwen-7b/lm_head", "v2-lite/dense_gate_up",
                                                     "v2-lite/lm_head"], 1.0) for n, k, c in table]
        new = gemv_table.replace_table(new, name, gemv_table.render(name, entries, G._ANY))
    assert all(len(line) <= 120 for line in new.splitlines())
    tree = ast.parse(new)
    for name, table in (("TABLE", G.TABLE), ("INT8_TABLE", G.INT8_TABLE)):
        node = next(n for n in tree.body if isinstance(n, ast.AnnAssign) and n.target.id == name)
        got = [(ast.unparse(e.elts[0]), ast.unparse(e.elts[1]), [ast.literal_eval(a) for a in e.elts[2].args])
               for e in node.value.elts]
        want = [("_ANY" if n == G._ANY else str(n), "_ANY" if k == G._ANY else str(k), list(gemv_table.trimmed(c)))
                for n, k, c in table]
        assert G.GemvConfig(*got[-1][2]) == table[-1][2]
        assert got == want
    with pytest.raises(ValueError, match="NOPE"):
        gemv_table.replace_table(source, "NOPE", "")


def test_dp4a_sweep_records_stay_out_of_the_int8_table():
    """`kernels_gemv.py --sweep --weights dp4a` records (int8 weights too, "kernel": "dp4a", 5-field configs)
    are not the float32 GEMV's INT8_TABLE candidates."""
    float_rec = record("qwen-7b", "o", 3584, 3584, [((4, 2048, 1, 4), 5.3)], int8=True)
    dp4a_rec = {**record("qwen-7b", "o", 3584, 3584, [((4, 4, False, None, 0), 4.8)], int8=True), "kernel": "dp4a"}
    assert gemv_table.sweeps([float_rec, dp4a_rec], {"r1"}, int8=True) == [float_rec]


def test_dp4a_sweep_candidates():
    """kernels_gemv.py's dp4a candidates: powers of two within the kernel's accumulator cap, the x-stationary ones
    only where K fits two chunks, each accepted by gemv_dp4a's own config check."""
    from deepserve.kernels.gemv_dp4a import fit_config

    kernels_gemv = importlib.import_module("kernels_gemv")
    for m, k in ((1, 3584), (1, 18944), (2, 3584), (4, 2048)):
        cands = kernels_gemv.dp4a_candidates(m, k)
        block_m = 1 << (m - 1).bit_length()
        assert cands and len(set(cands)) == len(cands)
        assert all(block_m * c.block_n <= 32 and c.num_warps & (c.num_warps - 1) == 0 for c in cands)
        assert all(fit_config(c, m, k).blocks == c.blocks for c in cands)  # no x-stationary one beyond two chunks
        assert any(c.blocks for c in cands) == (k <= 2 * 512 * 4)


def test_dp4a_records_feed_only_the_dp4a_table():
    float_rec = record("qwen-7b", "o", 3584, 3584, [((4, 2048, 1, 4), 5.3)], int8=True)
    dp4a_rec = {**record("qwen-7b", "o", 3584, 3584, [((4, 4, False, None, 0), 4.8)], int8=True), "kernel": "dp4a"}
    head = {**record("qwen-7b", "lm_head", 152064, 3584, [], int8=True), "kernel": "dp4a"}
    assert gemv_table.sweeps([float_rec, dp4a_rec, head], {"r1"}, True, dp4a=True) == [dp4a_rec]


def test_dp4a_pick_counts_an_x_stationary_programs_row_blocks():
    """An x-stationary dp4a config runs `blocks` row blocks a program: (8, 4, True, None, 2) at N = 3584 is
    224 programs (< 264), skipped though fastest; the streaming (4, 4) gives 896. Entries are the swept fields."""
    from deepserve.kernels import gemv_dp4a as D

    fit = lambda c, k: tuple(D.fit_config(D.Dp4aConfig(*c), 1, k))  # noqa: E731
    xs, stream = (8, 4, True, None, 2), (4, 4, False, None, 0)
    rows = [{**record("qwen-7b", "o", 3584, 3584, [(xs, 4.0), (stream, 4.8)], int8=True), "kernel": "dp4a"}]
    entries = gemv_table.pick(rows, [(4096, 4096, D.Dp4aConfig(2, 4))], True, fit, D.Dp4aConfig,
                              lambda c, _: gemv_table.trimmed(c), gemv_table.dp4a_programs)
    assert gemv_table.dp4a_programs(xs, 3584) == 224 and gemv_table.dp4a_programs(stream, 3584) == 896
    assert entries[0].config == stream and entries[0].step_us == 28 * 4.8


def test_dp4a_table_renders_into_gemv_dp4a_py_and_parses_back():
    from deepserve.kernels import gemv_dp4a as D

    source = gemv_table.DP4A_SOURCE.read_text()
    entries = [gemv_table.Entry(n, k, tuple(c), ["qwen-7b/o"], 1.0) for n, k, c in D.TABLE]
    new = gemv_table.replace_table(source, "TABLE", gemv_table.render("TABLE", entries, D._ANY, "Dp4aConfig"),
                                   "Dp4aConfig")
    assert all(len(line) <= 120 for line in new.splitlines())
    node = next(n for n in ast.parse(new).body if isinstance(n, ast.AnnAssign) and n.target.id == "TABLE")
    got = [D.Dp4aConfig(*[ast.literal_eval(a) for a in e.elts[2].args]) for e in node.value.elts]
    assert got == [c for _, _, c in D.TABLE]
    with pytest.raises(ValueError):  # gemv.py's GemvConfig pattern does not match gemv_dp4a.py's table
        gemv_table.replace_table(source, "TABLE", "")
