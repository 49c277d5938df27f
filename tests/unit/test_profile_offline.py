"""benchmarks/profile_offline.py's kernel tables over fake profiler events: the union of kernel intervals
(exposed_table) and the idle gaps between them (gap_table), PDL-style overlaps included."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
po = importlib.import_module("profile_offline")


class FakeProf:
    """What the tables read of torch.profiler: events() with device_type.name, name, time_range (us)."""

    def __init__(self, kernels: list[tuple[str, int, int]], host: int = 0):
        def event(name, start, end, device):
            span = SimpleNamespace(start=start, end=end, elapsed_us=lambda: end - start)
            return SimpleNamespace(name=name, time_range=span, device_type=SimpleNamespace(name=device))

        self._events = [event(n, s, e, "CUDA") for n, s, e in kernels] + \
            [event("aten::empty", 0, 1000, "CPU")] * host  # host ops: never counted

    def events(self):
        return self._events


# a [0, 10), b [15, 30) with c [20, 25) inside it (PDL overlap), d [40, 45), a again [47, 50)
KERNELS = [("b", 15, 30), ("a", 0, 10), ("c", 20, 25), ("d", 40, 45), ("a", 47, 50)]


def test_gap_table_sums_idle_per_waited_kernel_and_lists_the_largest_gaps():
    text = po.gap_table(FakeProf(KERNELS, host=2), rows=5)
    lines = text.splitlines()
    assert lines[0] == "device idle 0.017 ms in 3 gaps; per kernel the device waited for:"  # 5 + 10 + 2 us
    assert [ln.split()[-1] for ln in lines[1:4]] == ["d", "b", "a"]  # sorted by idle before them: 10, 5, 2
    assert lines[1].split()[0] == "0.0100"
    gaps = lines[lines.index("largest gaps:") + 1:]
    assert gaps[0].split()[:2] == ["10.0", "us"] and "after b" in gaps[0] and gaps[0].endswith("before d")
    # c ends inside b: the gap before d is measured from b's end, and b is the kernel it follows
    assert len(gaps) == 3 and "after d" in gaps[2] and gaps[2].endswith("before a")


def test_exposed_table_is_the_union_of_intervals():
    text = po.exposed_table(FakeProf(KERNELS), rows=5)
    assert text.splitlines()[0].startswith("exposed device time 0.033 ms")  # 10 + 15 + 5 + 3; c adds nothing
    by_name = {ln.split()[-1]: float(ln.split()[0]) for ln in text.splitlines()[1:]}
    assert by_name == {"a": 0.013, "b": 0.015, "d": 0.005, "c": 0.0}


def test_tables_without_kernels_say_so():
    assert po.gap_table(FakeProf([], host=1)) == "no device kernels recorded"
    assert po.exposed_table(FakeProf([])) == "no device kernels recorded"


def test_kernel_summary_idle_is_span_minus_the_union():
    """busy sums durations (c's overlap with b counted twice); idle is what the union leaves of the span."""
    assert po.kernel_summary(FakeProf(KERNELS, host=1)) == \
        "5 kernels, busy 0.038 ms, span 0.050 ms, idle 0.017 ms"  # 10 + 15 + 5 + 5 + 3; 50 - 33


def test_timeline_total_leaves_launch_out():
    """launch lies inside forward: the step total sums schedule, forward, sample and update only."""
    timeline = po.Timeline()
    for _ in range(2):
        timeline.add("prefill", 8, 2, {"schedule": 1.0, "launch": 30.0, "forward": 40.0, "sample": 0.0, "update": 2.0})
    row = timeline.report().splitlines()[1].split()
    assert row[:4] == ["prefill", "2", "16", "2.0"]
    assert [float(v) for v in row[4:]] == [1.0, 30.0, 40.0, 0.0, 2.0, 0.09]  # (1 + 40 + 0 + 2) * 2 ms; 0.15 with launch
    assert timeline.report().splitlines()[-1] == "sum of phases: 0.09 s"
