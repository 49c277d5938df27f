"""Record which Triton kernels a host wrapper launches, with what grid and keyword arguments
(constexprs, num_warps), for tests that check a path is taken, not only that the values are right."""

from __future__ import annotations

from types import ModuleType


class LaunchRecorder:
    """Stands in for a Triton kernel: `kernel[grid](*args, **kwargs)` is recorded as (grid, kwargs) in
    `launches`, then runs the real kernel."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, kwargs))
            return self.kernel[grid](*args, **kwargs)

        return launch


def record_launches(monkeypatch, module: ModuleType, *names: str) -> dict[str, LaunchRecorder]:
    """Replace the kernels `names` of `module` (looked up there at launch time) by recorders."""
    recorders = {name: LaunchRecorder(getattr(module, name)) for name in names}
    for name, recorder in recorders.items():
        monkeypatch.setattr(module, name, recorder)
    return recorders


def assert_one_launch(recorders: dict[str, LaunchRecorder], name: str, grid=None, **kwargs) -> None:
    """`name` launched exactly once (on `grid` when given, with these keyword values; None: the keyword
    was not passed) and no other recorded kernel launched."""
    others = {n: r.launches for n, r in recorders.items() if n != name and r.launches}
    assert not others, f"{sorted(others)} launched besides {name}"
    launches = recorders[name].launches
    assert len(launches) == 1, f"{name} launched {len(launches)} times"
    got_grid, got_kwargs = launches[0]
    if grid is not None:
        assert got_grid == grid, (got_grid, grid)
    assert {k: got_kwargs.get(k) for k in kwargs} == kwargs
