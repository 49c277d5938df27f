"""Inputs shared by the activation quantisation tests (int8_quant, fp8_quant)."""

from __future__ import annotations

import torch


def near_tie_rows(rows: int, cols: int, qmax: float, ties, seed: int = 0) -> torch.Tensor:
    """f32 rows [rows, cols] whose quotients v / scale sit within 3 float32 ulps of the values `ties` (a 1-D
    tensor: half-integers for int8, midpoints of the e4m3 grid for fp8), with the row max (qmax * scale)
    in column 0: where a quotient one ulp off rounds the other way. Built in float64, rounded once."""
    g = torch.Generator().manual_seed(seed)
    amax = torch.rand(rows, generator=g, dtype=torch.float64) * 20 + 1e-3
    scale = torch.tensor(amax.numpy().astype("float32") / float(qmax), dtype=torch.float32).double()  # RN division
    picks = ties[torch.randint(len(ties), (rows, cols), generator=g)].double()
    sign = torch.where(torch.rand(rows, cols, generator=g) < 0.5, -1.0, 1.0).double()
    x = (sign * picks * scale[:, None]).float()
    for _ in range(3):  # walk 0-3 ulps either way
        step = torch.randint(-1, 2, (rows, cols), generator=g)
        x = torch.where(step > 0, torch.nextafter(x, torch.full_like(x, 1e30)),
                        torch.where(step < 0, torch.nextafter(x, torch.full_like(x, -1e30)), x))
    x[:, 0] = amax.float()
    return x
