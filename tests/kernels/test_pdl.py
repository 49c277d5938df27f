"""Programmatic dependent launch (kernels/pdl.py): when it is on, and that a chain of dependent PDL kernels
computes exactly what it computes without PDL (eager and replayed from a CUDA graph)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from deepserve import envs
from tests.kernels.interpret import load_kernel_module

pdl = load_kernel_module("pdl")
KERNELS = Path(__file__).resolve().parents[2] / "deepserve" / "kernels"


@pytest.fixture
def fresh_pdl_cache():
    pdl._pdl_on.cache_clear()
    yield
    pdl._pdl_on.cache_clear()


def test_pdl_env_parsing(monkeypatch):
    monkeypatch.delenv("DEEPSERVE_PDL", raising=False)
    assert envs.pdl_enabled() is True
    monkeypatch.setenv("DEEPSERVE_PDL", "0")
    assert envs.pdl_enabled() is False
    monkeypatch.setenv("DEEPSERVE_PDL", "yes")
    with pytest.raises(ValueError, match="DEEPSERVE_PDL='yes' must be 0 or 1"):
        envs.pdl_enabled()


def test_no_pdl_off_cuda():
    """CPU tensors (the interpreter) never get the launch keywords: PDL stays False, the prologue compiles away."""
    assert pdl.pdl_launch(torch.device("cpu")) == {}


def _chain(x: torch.Tensor, weights: list[torch.Tensor], norm_w: torch.Tensor) -> torch.Tensor:
    """Each step reads what the previous kernel wrote: add + RMSNorm, then a GEMV, then SiLU-and-mul."""
    rms_norm = load_kernel_module("rms_norm").rms_norm
    gemv = load_kernel_module("gemv").gemv
    silu_and_mul = load_kernel_module("silu_and_mul").silu_and_mul
    hidden, residual = x, torch.zeros_like(x)
    for w in weights:
        normed, residual = rms_norm(hidden, residual, norm_w, 1e-6)
        hidden = silu_and_mul(gemv(normed, w))
    return hidden + residual


@pytest.mark.gpu
def test_pdl_chain_matches_without_pdl(monkeypatch, fresh_pdl_cache):
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs compute capability 9.0+")
    torch.manual_seed(0)
    dev = torch.device("cuda")
    hidden = 1024
    x = torch.randn(1, hidden, device=dev, dtype=torch.bfloat16)
    weights = [(torch.randn(2 * hidden, hidden, device=dev) / hidden ** 0.5).bfloat16() for _ in range(24)]
    norm_w = torch.rand(hidden, device=dev, dtype=torch.bfloat16) + 0.5

    monkeypatch.setenv("DEEPSERVE_PDL", "0")
    assert pdl.pdl_launch(dev) == {}
    expected = _chain(x, weights, norm_w)

    monkeypatch.setenv("DEEPSERVE_PDL", "1")
    pdl._pdl_on.cache_clear()
    assert pdl.pdl_launch(dev) == {"PDL": True, "launch_pdl": True}
    assert torch.equal(_chain(x, weights, norm_w), expected)

    static_x = x.clone()
    _chain(static_x, weights, norm_w)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _chain(static_x, weights, norm_w)
    for i in range(20):
        static_x.copy_(x if i % 2 == 0 else -x)
        graph.replay()
        want = expected if i % 2 == 0 else _chain(-x, weights, norm_w)
        torch.cuda.synchronize()
        assert torch.equal(out, want), f"replay {i}"


def test_pdl_off_under_interpreter_or_rocm(monkeypatch, fresh_pdl_cache):
    """The gates before the capability query: interpreter, ROCm, DEEPSERVE_PDL=0 (no GPU needed)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert pdl._pdl_on(0) is False
    pdl._pdl_on.cache_clear()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert pdl._pdl_on(0) is False
    pdl._pdl_on.cache_clear()
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setenv("DEEPSERVE_PDL", "0")
    assert pdl._pdl_on(0) is False


def _kernels_taking_pdl() -> list[tuple[str, ast.FunctionDef]]:
    """(file, jit function) for every function in deepserve/kernels with a `PDL` parameter."""
    found = []
    for path in sorted(KERNELS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any(a.arg == "PDL" for a in node.args.args):
                found.append((path.name, node))
    return found


# kernel -> (constexpr flag, pointer block name): kernels that may load a static weight before the wait
EARLY_WEIGHT_LOADS = {"_gemv_kernel": ("PREFETCH_W", "w_rows"), "_gemv_dp4a_kernel": ("PREFETCH_W", "w_rows"),
                      "_gemv_dp4a_xs_kernel": ("PREFETCH_W", "w_rows")}


def _check_only_static_weight_loads(before_wait: list[ast.stmt], allowed: tuple[str, str]) -> None:
    """Before the wait: index arithmetic, and loads of the weight only, under the constexpr flag. No store,
    atomic or load of anything else (x, scales, bias, output)."""
    flag, weight = allowed
    for stmt in before_wait:
        calls = [c for c in ast.walk(stmt) if isinstance(c, ast.Call)]
        names = {ast.unparse(c.func) for c in calls}
        assert not any(n.startswith(("tl.store", "tl.atomic")) for n in names), ast.unparse(stmt)
        loads = [c for c in calls if ast.unparse(c.func) == "tl.load"]
        if not loads:
            continue
        assert isinstance(stmt, ast.If) and ast.unparse(stmt.test) == flag, ast.unparse(stmt)
        assert all(ast.unparse(c.args[0]).startswith(weight) for c in loads), ast.unparse(stmt)


# kernel -> (constexpr flag, helpers it may call before the wait): the decode attention reads seq_lens, the block
# table and the older keys of its first tile early (paged_decode_attention.py, `prefetch_kv`)
EARLY_KV_LOADS = {"_decode_split_kernel": ("PREFETCH_KV", frozenset({"_split_range", "load_kv_tile"}))}


def _check_only_prefetch_helpers(before_wait: list[ast.stmt], allowed: tuple[str, frozenset[str]]) -> None:
    """Before the wait: index arithmetic (tl.* but loads, stores and atomics), and, only under the constexpr
    flag, calls of the listed reading helpers; no direct tl.load, no other helper."""
    flag, helpers = allowed
    for stmt in before_wait:
        funcs = [c.func for c in ast.walk(stmt) if isinstance(c, ast.Call)]
        calls = [ast.unparse(f) for f in funcs]
        assert not any(n.startswith(("tl.store", "tl.atomic", "tl.load")) for n in calls), ast.unparse(stmt)
        others = {f.id for f in funcs if isinstance(f, ast.Name)}  # helpers (methods such as .to are arithmetic)
        if not others:
            continue
        assert isinstance(stmt, ast.If) and ast.unparse(stmt.test) == flag, ast.unparse(stmt)
        assert others <= helpers, ast.unparse(stmt)


def test_early_kv_load_check_rejects_other_reads():
    ok = ast.parse("b = tl.program_id(0)\nif PREFETCH_KV:\n    s, a, e = _split_range(p, b)\n"
                   "    k = load_kv_tile(c, p)").body
    _check_only_prefetch_helpers(ok, EARLY_KV_LOADS["_decode_split_kernel"])
    for bad in ("q = tl.load(q_ptr)", "k = load_kv_tile(c, p)", "if PREFETCH_KV:\n    q = tl.load(q_ptr)",
                "if PREFETCH_KV:\n    merge_if_last(c)", "if PREFETCH_KV:\n    tl.atomic_add(c, 1)"):
        with pytest.raises(AssertionError):
            _check_only_prefetch_helpers(ast.parse(bad).body, EARLY_KV_LOADS["_decode_split_kernel"])


def test_early_weight_load_check_rejects_other_loads():
    """The check above fails on a load of x before the wait, and on a weight load outside the flag."""
    ok = ast.parse("if PREFETCH_W:\n    w = tl.load(w_rows + k, mask=m)").body
    _check_only_static_weight_loads(ok, EARLY_WEIGHT_LOADS["_gemv_kernel"])
    for bad in ("x = tl.load(x_rows + k)", "w = tl.load(w_rows + k)",
                "if PREFETCH_W:\n    x = tl.load(x_rows + k)", "if PREFETCH_W:\n    tl.store(out, y)"):
        with pytest.raises(AssertionError):
            _check_only_static_weight_loads(ast.parse(bad).body, EARLY_WEIGHT_LOADS["_gemv_kernel"])


def test_every_pdl_kernel_waits_first_and_every_launch_passes_pdl():
    """A kernel with a PDL parameter starts with pdl_prologue / pdl_wait (after its docstring; the kernels
    in EARLY_WEIGHT_LOADS may first load a static weight under their flag), and every launch of it
    (`kernel[grid](...)`) passes **pdl_launch(...): a launch with the attribute and no wait, or a load
    before the wait, would race with the previous kernel."""
    kernels = [(f, k) for f, k in _kernels_taking_pdl() if k.name not in ("pdl_prologue", "pdl_wait")]
    assert len(kernels) >= 17
    names = {k.name for _, k in kernels}
    for file, kernel in kernels:
        body = [s for s in kernel.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
        waits = [i for i, s in enumerate(body) if isinstance(s, ast.Expr) and isinstance(s.value, ast.Call)
                 and ast.unparse(s.value) in ("pdl_prologue(PDL)", "pdl_wait(PDL)")]
        assert waits, (file, kernel.name)
        if kernel.name in EARLY_WEIGHT_LOADS:
            _check_only_static_weight_loads(body[:waits[0]], EARLY_WEIGHT_LOADS[kernel.name])
        elif kernel.name in EARLY_KV_LOADS:
            _check_only_prefetch_helpers(body[:waits[0]], EARLY_KV_LOADS[kernel.name])
        else:
            assert waits[0] == 0, (file, kernel.name)
    launched = set()
    for path in sorted(KERNELS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in names):
                launched.add(node.func.value.id)
                passed = [ast.unparse(k.value) for k in node.keywords if k.arg is None]
                assert any(p.startswith("pdl_launch(") for p in passed), (path.name, node.func.value.id)
    assert launched == names  # every PDL kernel's launch was found (and checked) in this form
