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
costs more than the bf16 head: a batch-serving deployment should leave the head in float). The embedding
keeps its float matrix (a tied head's Parameter stays the embedding's; only the head's attribute is
replaced). The accuracy it costs is measured by `deepserve eval --quantize-lm-head` (the gate's top-1 and
KL against the float model), see benchmarks/results/quant_accuracy.md: on the bundled SmolLM2 (tied head,
49152 x 576) the int8 head alone passes the gate (top-1 0.9784) but W8A16 + the int8 head does not (0.9583 <
0.97; W8A16 alone 0.9725), which is why it is a flag and not part of int8-weight-only.
"""

from __future__ import annotations

from torch import nn


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
        method = Int8WeightOnlyMethod()
        method.process_weights_after_loading(head)  # replaces head.weight only: a tied embedding keeps its own
        head.__dict__.pop("packed_weight", None)  # CPU: the float method's oneDNN copy
        head.method = method
    return len(heads)
