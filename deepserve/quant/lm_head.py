"""The LM head as int8 W8A16 (`--quantize-lm-head`): per-row symmetric int8 weights, float activations.

At batch-1 decode the head is one GEMV that streams the whole [vocab, hidden] matrix once per token:
qwen-7b's is 1.09 GB in bf16, 15% of a W8A16 step's bytes (the linears' 6.5 GB int8 + the head). Stored
as int8 with a float32 scale per vocabulary row it is half of that, and the decode GEMV (kernels/gemv.py,
int8 weights) reads it at the same rate. Run s9d (H200, kernels_gemv.jsonl): qwen-7b's head 123.7 us as
int8 against 238.5 us in bf16 (V2-Lite's 102400 x 2048: not measured as int8). In the engine (W-b1 qwen-7b
W8A16, H200, same call): 2.578 / 2.580 ms per token with the int8 head against 2.686 / 2.682 without (run
s10a), 2.380 against 2.487 / 2.484 (run s10b).

Any --quantization (none included): the head gets `Int8WeightOnlyMethod`, so it follows `int8_cuda`'s
W8A16 backends (the GEMV at 1-2 rows, the Triton W8A16 GEMM up to 64, dequantise + cuBLAS above, which
costs more than the bf16 head: a batch-serving deployment should leave the head in float; on CPU the method
rounds the int8 matrix to float every step, also slower than the float head). The embedding
keeps its float matrix (a tied head's Parameter stays the embedding's; only the head's attribute is
replaced). The accuracy it costs is measured by `deepserve eval --quantize-lm-head` (the gate's top-1 and
KL against the float model), see benchmarks/results/quant_accuracy.md: on the bundled SmolLM2 (tied head,
49152 x 576) the int8 head alone passes the gate (top-1 0.9784) but W8A16 + the int8 head does not (0.9583 <
0.97; W8A16 alone 0.9725), which is why it is a flag and not part of int8-weight-only.
"""

from __future__ import annotations

import torch
from torch import nn

ROWS_PER_CHUNK = 8192  # vocabulary rows quantised at a time: float32 temporaries of 8192 x hidden, not V x hidden


def lm_heads(model: nn.Module) -> list[nn.Module]:
    """The LM heads (layers/embedding.py `LMHead`) of `model`."""
    from deepserve.layers.embedding import LMHead

    return [m for m in model.modules() if isinstance(m, LMHead)]


def quantize_lm_head(model: nn.Module) -> int:
    """Give every LM head of `model` int8 W8A16 weights (after `process_weights_after_loading`); returns how
    many were quantised. ValueError for a model without one."""
    from deepserve.quant.int8 import Int8WeightOnlyMethod

    heads = lm_heads(model)
    if not heads:
        raise ValueError(f"{type(model).__name__} has no LM head to quantise")
    for head in heads:
        q, scale = quantize_rows(head.weight.detach())
        # int8 weight + weight_scale: the method keeps them (`_install_quantized`'s layout: contiguous on CUDA, the
        # transpose contiguous elsewhere). Only head.weight is replaced: a tied embedding keeps its own.
        head.weight = nn.Parameter(q if q.is_cuda else q.t().contiguous().t(), requires_grad=False)
        head.weight_scale = nn.Parameter(scale, requires_grad=False)
        method = Int8WeightOnlyMethod()
        method.process_weights_after_loading(head)
        head.__dict__.pop("packed_weight", None)  # CPU: the float method's oneDNN copy
        head.method = method
    return len(heads)


def quantize_rows(w: torch.Tensor, rows: int = ROWS_PER_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """w [V, H] float -> (q [V, H] int8, scale [V] f32) = `quantize_per_channel_ref(w)` (symmetric), computed
    `rows` rows at a time, so loading a large vocabulary does not hold a float32 copy of the whole matrix."""
    from deepserve.quant.int8 import quantize_per_channel_ref

    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for start in range(0, w.shape[0], rows):
        q[start:start + rows], scale[start:start + rows], _ = quantize_per_channel_ref(w[start:start + rows])
    return q, scale
