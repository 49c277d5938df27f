"""layers/mla.py `_mergeable`: which pairs of input projections MLA may merge into one GEMM (float weights as
loaded, with no scales beside them). Which quantizations merge: tests/models/test_deepseek_parity.py."""

from __future__ import annotations

import pytest
import torch

from deepserve.layers.linear import ReplicatedLinear
from deepserve.layers.mla import _mergeable


def _pair(hidden: int = 16) -> tuple[ReplicatedLinear, ReplicatedLinear]:
    return ReplicatedLinear(hidden, 24, bias=False), ReplicatedLinear(hidden, 8, bias=False)


def test_float_pair_merges():
    assert _mergeable(*_pair())


@pytest.mark.parametrize("edit", [
    lambda lin: setattr(lin, "weight", torch.nn.Parameter(torch.zeros(24, 16, dtype=torch.int8), requires_grad=False)),
    lambda lin: setattr(lin, "weight_scale", torch.nn.Parameter(torch.ones(24), requires_grad=False)),
    lambda lin: setattr(lin, "weight_zero_point", torch.nn.Parameter(torch.zeros(24), requires_grad=False)),
    lambda lin: setattr(lin, "weight_scale_inv", torch.nn.Parameter(torch.ones(1, 1), requires_grad=False)),
    lambda lin: setattr(lin, "bias", torch.nn.Parameter(torch.zeros(24))),
    lambda lin: setattr(lin, "weight", torch.nn.Parameter(torch.zeros(0, 16), requires_grad=False)),
    lambda lin: lin.half(),
], ids=["int8-weight", "weight_scale", "zero_point", "block-scales", "bias", "emptied", "other-dtype"])
def test_pairs_that_stay_apart(edit):
    first, second = _pair()
    edit(first)
    assert not _mergeable(first, second) and not _mergeable(second, first)
