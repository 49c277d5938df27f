"""Routed-expert stacks as int8 per (expert, output row), computed by the fused W8A16 MoE kernel.

    quantize_experts_int8(w [E, N, K] float) -> (q [E, N, K] int8, scale [E, N] f32)
    quantize_routed_experts_in_place(experts: RoutedExperts, quantization) -> bool

Under `--quantization int8` or `int8-weight-only` (`INT8_EXPERT_QUANTIZATIONS`), where the experts'
MoE backend takes int8 stacks (`MoEBackend.int8_weights`: the triton backend, i.e. CUDA),
`RoutedExperts.process_weights_after_loading` replaces w13 [E, 2I, H] and w2 [E, H, I] by int8 and
adds w13_scale [E, 2I] / w2_scale [E, H] f32: symmetric per row, `quantize_rows_int8_ref`'s values
(every weight within scale / 2 of the float one). Activations stay float (W8A16: the kernel converts
each int8 tile to the activation dtype), except under `int8` (W8A8_EXPERT_QUANTIZATIONS) for batches
of at least W8A8_MIN_TOKENS tokens, where the kernel quantises them per row too (W8A8,
`fused_moe(..., int8_activations=True)`).
The float stacks are released, so the model's allocated bytes, which start-up memory planning
measures after loading (engine/memory.py), count int8 experts.

Not here: `int8-weight-only-asym` and `int8-hadamard` keep float experts (their schemes, zero points
or rotated inputs, are not per-row symmetric); the torch backend (CPU) keeps float experts, except
for block-FP8 checkpoints, whose int8 modes off CUDA use `block_fp8_experts.Int8RoutedExperts`.
Shared experts stay a separate MLP in quantised models (DeepseekMoE.can_fuse_shared_experts), so
the linear method quantises them; the MTP draft layer is loaded in float and not processed.
"""

from __future__ import annotations

import torch
from torch import nn

from deepserve.quant.block_fp8_ref import quantize_rows_int8_ref

INT8_EXPERT_QUANTIZATIONS = frozenset({"int8", "int8-weight-only"})
W8A8_EXPERT_QUANTIZATIONS = frozenset({"int8"})  # the modes whose int8 experts may quantise activations
# Smallest batch (tokens) whose routed experts run W8A8 under W8A8_EXPERT_QUANTIZATIONS; None: never.
# Measured on an H200 (run s6h2, `benchmarks/kernels_moe_int8.py --w8a8`, V2-Lite's experts): W8A8 beats
# W8A16 at every size timed, 1.21x at 256 tokens, 1.47x at 1024, 1.81x at 4096, 1.98x at 16384 (W8A16 is
# slower than bf16 from 1024 tokens: 0.75x, 0.62x, 0.70x; W8A8 is 1.65x, 1.11x, 1.12x, 1.38x bf16), with
# about twice W8A16's relative error (2.2e-2 to 4.1e-2 vs 1.4e-2 to 1.6e-2). 256 is the smallest size
# measured; decode batches below it keep W8A16.
W8A8_MIN_TOKENS: int | None = 256


def w8a8_min_tokens(quantization: str | None) -> int | None:
    """The batch size from which int8 experts served under `quantization` quantise their activations
    (W8A8), or None: never (int8-weight-only and the other modes, or W8A8_MIN_TOKENS unset)."""
    return W8A8_MIN_TOKENS if quantization in W8A8_EXPERT_QUANTIZATIONS else None


def quantize_experts_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [E, N, K] float -> (q [E, N, K] int8, scale [E, N] f32), on w's device, equal to
    `quantize_rows_int8_ref(w)`; one expert at a time, so the float32 temporaries are one expert's
    (a whole V2-Lite w13 stack in float32 would be 1.5 GB)."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[:2], dtype=torch.float32, device=w.device)
    for expert in range(w.shape[0]):
        q[expert], scale[expert] = quantize_rows_int8_ref(w[expert])
    return q, scale


def quantize_routed_experts_in_place(experts: nn.Module, quantization: str | None) -> bool:
    """A `RoutedExperts`' float w13 / w2 -> int8 + w13_scale / w2_scale Parameters where
    `quantization` is in INT8_EXPERT_QUANTIZATIONS and its backend takes int8 stacks; whether it did.
    Stacks that are int8 already are left as they are. Where it does, it also sets the experts'
    `w8a8_min_tokens` (`w8a8_min_tokens(quantization)`)."""
    if quantization not in INT8_EXPERT_QUANTIZATIONS or not experts.moe_backend().int8_weights:
        return False
    experts.w8a8_min_tokens = w8a8_min_tokens(quantization)
    if experts.w13.dtype == torch.int8:
        return True
    with torch.no_grad():
        for name in ("w13", "w2"):
            q, scale = quantize_experts_int8(getattr(experts, name).detach())
            setattr(experts, name, nn.Parameter(q, requires_grad=False))  # the float stack is released
            setattr(experts, name + "_scale", nn.Parameter(scale, requires_grad=False))
    return True
