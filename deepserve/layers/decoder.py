"""The pre-norm transformer block shared by every architecture we serve.

A subclass builds `input_layernorm`, `self_attn` (positions, hidden -> hidden),
`post_attention_layernorm` and `mlp`; the residual add is fused into the norms.

A subclass may also name the linear that alone reads each norm's output (`attention_input_linear`:
the one `self_attn` hands its input to, `mlp_input_linear`: the one of `mlp`; default None). When
that linear takes its input pre-quantised (`LinearBase.takes_quantized_input`: the int8 and fp8 W8A8 methods
on CUDA, no hooks), the norm's `forward_quantized` (RMSNorm: `fused.rms_norm_quant`, to the consumer method's
`quantized_input_dtype`) normalises and quantises in one pass and self_attn / mlp receive a `PerTokenQuant`
(q [T, H] int8 or e4m3, scale [T] f32, dtype) instead of the [T, H] normalised tensor, which then never goes
to memory: one [T, H] write and read and one launch fewer per norm. Same bits as the unfused path (the caveat:
kernels/int8_quant.py). Hooks on the norm or on the consumer linear turn the fusion off; a hook on self_attn or
mlp themselves (the modules, not their linears) would see the PerTokenQuant: none of ours registers one there.
The consumer may be a merged layer (DeepSeek's MLA `qkv_a_proj`): hooks on the layers merged into it (emptied)
never fire and do not turn the fusion off.
"""

from __future__ import annotations

import torch
from torch import nn

from deepserve.layers.linear import LinearBase
from deepserve.layers.linear_method import PerTokenQuant


class PreNormDecoderLayer(nn.Module):
    def attention_input_linear(self) -> LinearBase | None:
        """The linear of `self_attn` that alone reads the normalised hidden state, or None."""
        return None

    def mlp_input_linear(self) -> LinearBase | None:
        """The linear of `mlp` that alone reads the normalised hidden state, or None."""
        return None

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden, residual: [T, H] (residual None for the first layer) -> (this layer's output,
        the residual stream before it); their sum is the new stream."""
        hidden, residual = _pre_norm(self.input_layernorm, hidden, residual, self.attention_input_linear())
        hidden = self.self_attn(positions, hidden)
        hidden, residual = _pre_norm(self.post_attention_layernorm, hidden, residual, self.mlp_input_linear())
        return self.mlp(hidden), residual


def _pre_norm(norm: nn.Module, hidden: torch.Tensor, residual: torch.Tensor | None, consumer: LinearBase | None
              ) -> tuple[torch.Tensor | PerTokenQuant, torch.Tensor]:
    """hidden [T, H], residual [T, H] or None -> (norm(hidden (+ residual)) [T, H], or its PerTokenQuant
    when `consumer` takes quantised input and the norm has no hooks; the residual stream [T, H])."""
    if consumer is not None and not (norm._forward_pre_hooks or norm._forward_hooks) \
            and consumer.takes_quantized_input(hidden):
        quantized, new_residual = norm.forward_quantized(hidden, residual, consumer.method.quantized_input_dtype)
        return quantized, hidden if residual is None else new_residual
    if residual is None:
        return norm(hidden), hidden
    return norm(hidden, residual)
