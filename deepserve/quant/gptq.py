"""GPTQ rounding of per-channel symmetric int8 weights (Frantar et al., 2022, "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers"), written from the paper.

Round-to-nearest picks each weight's integer on its own. GPTQ rounds the columns (input channels)
one after another and moves each rounding error onto the columns not yet rounded, weighted by the
layer's input statistics H = X^T X (X: calibration inputs [tokens, in]), so that the error of the
layer's *output* on that data, ||X W^T - X Q^T||, stays small. With U the upper Cholesky factor of
H^-1 (after damping H's diagonal by `damp` times its mean), column i is rounded, its error
e = (w_i - q_i) / U_ii is subtracted as e U_i,j from every later column j; blocks of `block` columns
apply the update to the rest in one matmul.

Grid: scale_c = max|w_c| / 127 of the row *before* any update (the same grid as round-to-nearest).
The element of each row that sets the scale is pinned to +-127, so every row keeps an entry at
+-127; the layer's loader can then quantise the dequantised weight again and get the same
integers (see quant/int8.py on re-quantisation).
"""

from __future__ import annotations

import torch

from deepserve.quant.int8 import div_rn

DEFAULT_DAMP = 0.01
DEFAULT_BLOCK = 128


def _inverse_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) I)^-1, float64 [in, in]."""
    h = hessian.double().clone()
    dead = torch.diagonal(h) <= 0  # channels never active in the calibration data
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * float(torch.diagonal(h).mean()))
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True)


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, damp: float = DEFAULT_DAMP,
                  block: int = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] float, hessian [in, in] (X^T X) -> (q [out, in] int8, scale [out] f32).
    The factorisation runs in float64, the column sweep in float32."""
    if hessian.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"hessian {tuple(hessian.shape)} does not match weight {tuple(w.shape)}")
    u = _inverse_cholesky(hessian, damp).float()  # [in, in]
    work = w.float().clone()  # [out, in], updated in place
    scale = div_rn(work.abs().amax(dim=1).clamp(min=1e-8), 127.0)  # [out]
    peak = work.abs().argmax(dim=1, keepdim=True)  # [out, 1] the column that sets each row's scale
    top = torch.where(work.gather(1, peak) < 0, -127.0, 127.0)  # [out, 1]
    q = torch.empty_like(work)
    for start in range(0, w.shape[1], block):
        end = min(start + block, w.shape[1])
        q[:, start:end], errors = _round_block(work[:, start:end], u[start:end, start:end], scale[:, None],
                                               peak - start, top)
        work[:, end:] -= errors @ u[start:end, end:]  # [out, block] @ [block, rest]
    return q.to(torch.int8), scale


def _round_block(cols: torch.Tensor, u: torch.Tensor, s: torch.Tensor, peak: torch.Tensor,
                 top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round the columns of one block in order, updating the later ones; (q [out, b], errors [out, b]).
    peak [out, 1]: each row's pinned column relative to the block (outside it: no pin here)."""
    cols = cols.clone()
    q = torch.empty_like(cols)
    errors = torch.empty_like(cols)
    for i in range(cols.shape[1]):
        col = cols[:, i:i + 1]  # [out, 1]
        qi = torch.where(peak == i, top, torch.round(col / s).clamp_(-127, 127))
        q[:, i:i + 1] = qi
        err = (col - qi * s) / u[i, i]
        errors[:, i:i + 1] = err
        cols[:, i + 1:].addmm_(err, u[i:i + 1, i + 1:], alpha=-1.0)
    return q, errors
