"""The calibrated path of `deepserve quantize`: smoothing, input rotation and GPTQ rounding.

    recipe = Recipe("int8-hadamard", smoothing_alpha=0.5, rounding="gptq")
    tensors = calibrated_tensors(net, checkpoint_tensors, token_ids, recipe)   # HF name -> tensor

Steps, on the whole float32 model (`net`, built and loaded but not processed: dense weights):
  1. calibrate: run the calibration text, record each linear's input max |x_j| and X^T X
     (quant/smooth.py; memory: one [in, in] matrix per linear, 0.4 GB for SmolLM2-135M);
  2. smooth (W8A8): fold SmoothQuant factors into norms / producer rows / consumer columns;
  3. rotate (int8-hadamard): each linear's weight W -> W H, its statistics H^T X^T X H;
  4. round every quantisable linear's weight per output channel: GPTQ with its X^T X
     (quant/gptq.py) or round-to-nearest;
  5. export: every tensor of the input checkpoint, in its name, taken back out of the model
     (`map_name` + the fused layer's row ranges: q/k/v of qkv_proj, gate/up of gate_up_proj);
     quantised weights as int8 + `_scale`, the rest as the model holds it (norms and v/up rows
     changed by smoothing), in the checkpoint's dtype when that is lossless, else float32.
Only Llama-style decoder stacks (Llama, Qwen2, ... : `smooth.decoder_layers`) take this path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from deepserve.layers.linear import LinearBase, MergedColumnParallelLinear, QKVParallelLinear
from deepserve.quant import hadamard_block_of
from deepserve.quant.gptq import gptq_quantize
from deepserve.quant.int8 import quantize_per_channel_ref
from deepserve.quant.smooth import CalibrationStats, calibrate, decoder_layers, smooth_, smoothing_factors

ROUNDINGS = ("gptq", "rtn")


@dataclass(frozen=True)
class Recipe:
    """What `deepserve quantize` does beyond rounding each weight on its own."""

    method: str  # registered method name the checkpoint is written for
    smoothing_alpha: float | None = None  # SmoothQuant migration strength; None: no smoothing
    rounding: str = "gptq"  # gptq | rtn
    calibration: str | None = None  # the calibration text's file name (recorded in the config)
    calibration_sha256: str | None = None  # of its bytes

    @property
    def needs_calibration(self) -> bool:
        return self.smoothing_alpha is not None or self.rounding == "gptq"

    def record(self, num_tokens: int) -> dict:
        """The `recipe` entry of quantization_config (informational: loading does not read it)."""
        return {"smoothing_alpha": self.smoothing_alpha, "rounding": self.rounding,
                "calibration": self.calibration, "calibration_sha256": self.calibration_sha256,
                "calibration_tokens": num_tokens,
                "input_rotation_block": hadamard_block_of(self.method)}


def _quantizable(module: nn.Module) -> bool:
    return isinstance(module, LinearBase) and module.quantizable and not getattr(module, "keep_dense_weight", False)


@torch.no_grad()
def round_linears(net: nn.Module, stats: CalibrationStats | None, recipe: Recipe,
                  on_layer: Callable[[str], None] = lambda name: None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name: (q [out, in] int8, scale [out] f32)} for every quantisable linear of `net`."""
    from deepserve.quant.hadamard import block_size_for, rotate_blocks

    block = hadamard_block_of(recipe.method)
    out = {}
    for name, module in net.named_modules():
        if not _quantizable(module):
            continue
        w = module.weight.detach().float()  # [out, in]
        hessian = stats.hessian[name].double() if recipe.rounding == "gptq" else None
        if block is not None:
            b = block_size_for(w.shape[1], block)
            w = rotate_blocks(w.double(), b).float()
            hessian = None if hessian is None else rotate_blocks(rotate_blocks(hessian, b).t(), b)  # H^T X^T X H
        if recipe.rounding == "gptq":
            out[name] = gptq_quantize(w, hessian)
        else:
            q, scale, _ = quantize_per_channel_ref(w)
            out[name] = (q, scale)
        on_layer(name)
    return out


def prepare(net: nn.Module, token_ids: list[int], recipe: Recipe) -> CalibrationStats:
    """Calibrate `net` on the token ids and apply the recipe's smoothing in place (steps 1-2)."""
    decoder_layers(net)  # ValueError for models this path does not handle
    stats = calibrate(net, token_ids, hessians=recipe.rounding == "gptq")
    if recipe.smoothing_alpha is not None:
        factors = smoothing_factors(net, stats, recipe.smoothing_alpha)
        smooth_(net, factors)
        stats = stats.smoothed(factors)
    return stats


def _rows(module: nn.Module, shard) -> slice:
    """The rows of a fused parameter that one checkpoint tensor fills (tensor parallelism off)."""
    if shard is None:
        return slice(None)
    if isinstance(module, QKVParallelLinear):
        offset, size, _ = module._shard_range(shard)
        return slice(offset, offset + size)
    if isinstance(module, MergedColumnParallelLinear):
        offset = sum(module.output_sizes[:shard])
        return slice(offset, offset + module.output_sizes[shard])
    raise ValueError(f"cannot take shard {shard!r} out of {type(module).__name__}")


def _as_checkpoint_dtype(value: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """`value` in the original tensor's dtype when that loses nothing, else float32."""
    cast = value.to(original.dtype)
    return cast.contiguous() if torch.equal(cast.float(), value.float()) else value.float().contiguous()


def export_tensors(net: nn.Module, checkpoint: Iterable[tuple[str, torch.Tensor]],
                   rounded: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """HF name -> tensor for every tensor of the input checkpoint (step 5)."""
    params = dict(net.named_parameters())
    tensors: dict[str, torch.Tensor] = {}
    for hf_name, original in checkpoint:
        target = net.map_name(hf_name)
        if target is None:  # not a parameter (tied head, rotary tables): kept as it was
            tensors[hf_name] = original.contiguous()
            continue
        param_name, shard = target
        module_name, _, leaf = param_name.rpartition(".")
        rows = _rows(net.get_submodule(module_name), shard)
        if leaf == "weight" and module_name in rounded:
            q, scale = rounded[module_name]
            tensors[hf_name], tensors[hf_name + "_scale"] = q[rows].contiguous(), scale[rows].contiguous()
        else:
            tensors[hf_name] = _as_checkpoint_dtype(params[param_name].detach()[rows], original)
    return tensors


@torch.no_grad()
def quantize_in_memory(net: nn.Module, token_ids: list[int], recipe: Recipe) -> nn.Module:
    """Apply `recipe` to a loaded, unprocessed float model and install the method: the model then
    computes what the checkpoint `deepserve quantize` writes computes once loaded (the same
    dequantised weights, rotated back as DequantizingStream does, quantised again by the method)."""
    from deepserve.layers.linear_method import process_weights_after_loading
    from deepserve.quant.hadamard import block_size_for, rotate_blocks
    from deepserve.quant.int8 import dequantize_per_channel_ref

    stats = prepare(net, token_ids, recipe)
    block = hadamard_block_of(recipe.method)
    for name, (q, scale) in round_linears(net, stats, recipe).items():
        w = dequantize_per_channel_ref(q, scale)  # [out, in]
        if block is not None:
            w = rotate_blocks(w.double(), block_size_for(w.shape[1], block)).float()
        net.get_submodule(name).weight.copy_(w)
    process_weights_after_loading(net, recipe.method)
    return net.eval()
