"""DeepSeek-V3/R1 native block FP8: the checkpoint format, the serving modes, the linear method.

Checkpoint (config.json `quantization_config: {"quant_method": "fp8", "fmt": "e4m3",
"activation_scheme": "dynamic", "weight_block_size": [128, 128]}`): every linear weight of the
attention and MLP blocks (dense MLP, shared and routed experts, MTP layer decoder) is
`<name>.weight` float8_e4m3fn [N, K] plus `<name>.weight_scale_inv` float32 [ceil(N/128),
ceil(K/128)], w = weight * scale_inv per 128x128 block (`block_fp8_ref.py` has the math).
Embeddings, norms, the LM head, the router (`mlp.gate`), `e_score_correction_bias` and the MTP
layer's `eh_proj` are bf16 / f32.

`--quantization` for such a checkpoint picks the serving mode at load time:

  (omitted)         auto: `block-fp8` where the device has FP8 tensor cores (CUDA compute
                    capability 8.9+: Ada, Hopper), else `none` (CPU, A100 and older GPUs).
  block-fp8         linear layers keep the fp8 weights and block scales (`BlockFp8LinearMethod`):
                    activations are quantised per token per 128 columns at run time
                    (`kernels/block_fp8_quant.py`), then the block-scaled FP8 GEMM
                    (`kernels/block_fp8_gemm.py`, float32 accumulation, output in the model dtype).
                    Refused on a GPU without FP8; on CPU it runs the pure-PyTorch emulation (slow,
                    for tests). MLA's kv_b_proj (its matrix is absorbed into q/o) is dequantised.
  none              everything dequantised at load, block by block and tensor by tensor on the
                    target device (`kernels/block_fp8_dequant.py` on FP8 GPUs), to the model dtype
                    (bf16 on GPU, float32 on CPU): the exact values the fp8 weights stand for.
  int8              dequantised at load as for `none`, then the INT8 W8A8 method (per-output-channel
                    int8 weights, per-token int8 activations) quantises the linear layers; likewise
                    int8-weight-only(-asym) and any other registered float method.

Routed experts (the stacked w13 [E, 2I, H] / w2 [E, H, I], filled expert by expert): dequantised to
the model dtype in every mode, computed by the MoE backend of the device (the fused Triton kernel
on CUDA); in the int8 modes on CPU they are then stored as per-row int8 and dequantised expert by
expert when used (`block_fp8_experts.py`: W8A16 math, a quarter of float32's memory); under int8 /
int8-weight-only on CUDA they are quantised per row after loading and run by the fused kernel's
W8A16 specialisation (`int8_experts.py`). Not covered: fp8 expert weights on GPU, which needs a
block-FP8 fused MoE kernel.
A float checkpoint loaded with `--quantization block-fp8` is quantised to 128x128 blocks online.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from deepserve.layers.linear_method import LinearMethod
from deepserve.loader.errors import LoadError
from deepserve.quant.block_fp8_ref import (DEFAULT_BLOCK, FP8_DTYPE, block_fp8_linear_ref,
                                           block_fp8_quantize_weight_ref, scale_shape)

BLOCK_FP8 = "block-fp8"
NO_QUANTIZATION = "none"
CHECKPOINT_QUANT_METHOD = "fp8"  # quantization_config.quant_method of DeepSeek's FP8 checkpoints
SCALE_SUFFIX = "_scale_inv"  # <name>.weight -> <name>.weight_scale_inv


def checkpoint_block_size(hf_config: Mapping[str, Any]) -> tuple[int, int] | None:
    """(bn, bk) of a block-FP8 checkpoint's config.json, None for any other checkpoint; LoadError
    for an fp8 quantization_config this loader cannot serve."""
    qc = hf_config.get("quantization_config")
    if not isinstance(qc, Mapping) or qc.get("quant_method") != CHECKPOINT_QUANT_METHOD:
        return None
    block = qc.get("weight_block_size")
    problem = None
    if qc.get("fmt", "e4m3") != "e4m3":
        problem = f"fmt {qc.get('fmt')!r} (only e4m3 is supported)"
    elif qc.get("activation_scheme", "dynamic") != "dynamic":
        problem = f"activation_scheme {qc.get('activation_scheme')!r} (only dynamic is supported)"
    elif not (isinstance(block, (list, tuple)) and len(block) == 2
              and all(isinstance(b, int) and b > 0 and not b & (b - 1) for b in block)):
        problem = f"weight_block_size {block!r} (expected two powers of two, e.g. [128, 128])"
    if problem:
        raise LoadError(f"config.json: quantization_config fp8 with {problem}")
    return int(block[0]), int(block[1])


def device_supports_fp8(device: str | torch.device) -> bool:
    from deepserve.platforms import get_platform

    device = torch.device(device)
    return get_platform(device.type).supports_fp8(device.index or 0)


def serving_mode(requested: str | None, device: str | torch.device) -> str:
    """The mode a block-FP8 checkpoint is served in (module docstring) for `--quantization requested`."""
    device = torch.device(device)
    if requested is None:
        return BLOCK_FP8 if device_supports_fp8(device) else NO_QUANTIZATION
    if requested == BLOCK_FP8 and device.type != "cpu" and not device_supports_fp8(device):
        raise LoadError(f"--quantization {BLOCK_FP8} needs FP8 tensor cores (CUDA compute capability "
                        f"8.9+); on {device} use --quantization none (bf16) or int8")
    return requested


# ---- the linear method ------------------------------------------------------------------------------


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class BlockFp8LinearMethod(LinearMethod):
    """fp8 weight [N, K] + weight_scale_inv [Nb, Kb] f32; y = block-FP8 GEMM of the per-token-group
    quantised input. CUDA: the Triton kernels. Elsewhere: `block_fp8_linear_ref` (emulation)."""

    def __init__(self, block: tuple[int, int] = DEFAULT_BLOCK):
        self.block = tuple(block)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Keep loaded fp8 weights (checking their scales; a layer loaded from a checkpoint carries
        its `weight_block`); quantise a float weight online."""
        self.block = tuple(getattr(layer, "weight_block", self.block))
        w = layer.weight
        if w.dtype != FP8_DTYPE:
            q, scale = block_fp8_quantize_weight_ref(w.detach(), self.block)
            layer.weight, layer.weight_scale_inv = _frozen(q), _frozen(scale.to(w.device))
        scale = getattr(layer, "weight_scale_inv", None)
        if scale is None or tuple(scale.shape) != scale_shape(w.shape, self.block):
            got = None if scale is None else tuple(scale.shape)
            raise ValueError(f"fp8 weight {tuple(w.shape)} needs weight_scale_inv "
                             f"{scale_shape(w.shape, self.block)}, got {got}")
        if layer.weight.is_cuda and not device_supports_fp8(layer.weight.device):
            raise ValueError(f"{BLOCK_FP8} needs FP8 tensor cores (compute capability 8.9+)")

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [..., K] float -> [..., N] in x's dtype."""
        rows = x.reshape(-1, x.shape[-1])  # [tokens, K]
        if rows.is_cuda:
            y = _cuda_linear(rows, layer.weight, layer.weight_scale_inv, self.block)
            if bias is not None:
                y = y + bias
        else:
            y = block_fp8_linear_ref(rows, layer.weight, layer.weight_scale_inv, self.block, bias)
        return y.view(*x.shape[:-1], y.shape[-1])


def _cuda_linear(rows: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                 block: tuple[int, int]) -> torch.Tensor:
    """rows [M, K] -> [M, N] in rows' dtype, by the Triton kernels (imported on first use)."""
    from deepserve.kernels.block_fp8_gemm import block_fp8_gemm
    from deepserve.kernels.block_fp8_quant import block_fp8_quant

    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    a_q, a_scale = block_fp8_quant(rows, block[1])
    return block_fp8_gemm(a_q, a_scale, w, w_scale, block, out_dtype=rows.dtype)
