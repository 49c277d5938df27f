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
