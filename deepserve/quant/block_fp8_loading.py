"""Loading a block-FP8 checkpoint: pair every fp8 weight with its `weight_scale_inv`, check both,
then either keep them (block-fp8 serving) or dequantise the weight on the way in.

    plan = plan_block_fp8_load(model, files, block, requested, device, dtype)   # BlockFp8Plan
    model.load_weights(plan.wrap(weight_stream))    # fp8 + scales for kept layers, float otherwise
    plan.finish(model)                              # int8 experts (int8 modes, CPU)
    plan.mode                                       # the linear method for process_weights_after_loading

Kept layers (mode block-fp8 only): DeepSeek models' `LinearBase` layers (replicated, column, row, merged
gate/up; tp_size 1) whose every checkpoint shard is fp8 and whose merged shards start on block
boundaries, except those that keep a dense matrix (MLA's kv_b_proj). Before loading, their float
weight is replaced by an empty fp8 one plus a `weight_scale_inv` parameter, so the model's own name
table and weight loaders place both (`weight_scale_inv` of a merged layer goes to block rows).
Every other fp8 tensor, routed experts included, arrives dequantised to the model dtype.

Errors are `LoadError`s naming the file and the tensor: a weight without its scale (or the
reverse), a scale of the wrong shape or dtype, an fp8 tensor that is not a matrix.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from deepserve.layers.linear import (ColumnParallelLinear, LinearBase, MergedColumnParallelLinear,
                                     ReplicatedLinear, RowParallelLinear, checked_copy)
from deepserve.loader.errors import LoadError
from deepserve.loader.safetensors_loader import StreamWrapper
from deepserve.quant.block_fp8 import (BLOCK_FP8, NO_QUANTIZATION, SCALE_SUFFIX, device_supports_fp8,
                                       serving_mode)
from deepserve.quant.block_fp8_ref import FP8_DTYPE, block_fp8_dequant_ref, scale_shape

_KEEPABLE = (ReplicatedLinear, ColumnParallelLinear, RowParallelLinear, MergedColumnParallelLinear)
_INT8_MODES = ("int8", "int8-weight-only", "int8-weight-only-asym")


class BlockFp8Stream(StreamWrapper):
    """Wraps a WeightStream (or anything yielding (name, tensor) with `files`/`current_file`).

    Yields non-fp8 tensors unchanged; for each fp8 `<w>` and its `<w>_scale_inv` (in any order, in
    any shard), once both have been read: `(<w>, fp8)` and `(<w>_scale_inv, f32)` if `<w>` is in
    `keep`, else `(<w>, dequantised to dtype on device)`."""

    def __init__(self, inner, block: tuple[int, int], keep: frozenset[str] = frozenset(),
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, use_triton: bool = False):
        super().__init__(inner)
        self.block, self.keep = tuple(block), keep
        self.device, self.dtype, self.use_triton = torch.device(device), dtype, use_triton

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        pending: dict[str, dict[str, tuple[torch.Tensor, Path]]] = {}  # weight name -> parts read
        plain: dict[str, torch.dtype] = {}  # non-fp8 weights seen (for the error messages)
        for name, tensor in self.inner:
            if name.endswith(SCALE_SUFFIX):
                base, part = name[: -len(SCALE_SUFFIX)], "scale"
            elif tensor.dtype == FP8_DTYPE:
                base, part = name, "weight"
            else:
                plain[name] = tensor.dtype
                yield name, tensor
                continue
            parts = pending.setdefault(base, {})
            parts[part] = (tensor, self.current_file)
            if len(parts) == 2:
                del pending[base]
                yield from self._complete(base, parts)
        if pending:
            raise LoadError(_incomplete(pending, plain, self.files))

    def _complete(self, base: str, parts: dict[str, tuple[torch.Tensor, Path]]
                  ) -> Iterator[tuple[str, torch.Tensor]]:
        (w, w_file), (scale, s_file) = parts["weight"], parts["scale"]
        if w.dim() < 2:
            raise LoadError(f"{w_file}: tensor {base} is float8_e4m3fn of shape {list(w.shape)}; "
                            f"block-FP8 weights are [N, K] matrices")
        expected = scale_shape(w.shape, self.block)
        if tuple(scale.shape) != expected or scale.dtype != torch.float32:
            raise LoadError(f"{s_file}: tensor {base}{SCALE_SUFFIX} is {scale.dtype} {list(scale.shape)}; "
                            f"{base} {list(w.shape)} (in {w_file.name}) needs float32 {list(expected)} "
                            f"({self.block[0]}x{self.block[1]} blocks)")
        if base in self.keep:
            yield base, w
            yield base + SCALE_SUFFIX, scale
        else:
            yield base, self._dequant(w, scale)

    def _dequant(self, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        w, scale = w.to(self.device), scale.to(self.device)
        if self.use_triton:
            from deepserve.kernels.block_fp8_dequant import block_fp8_dequant  # lazy: Triton on FP8 GPUs

            return block_fp8_dequant(w, scale, self.block, out_dtype=self.dtype)
        return block_fp8_dequant_ref(w, scale, self.block, out_dtype=self.dtype)


def _incomplete(pending: dict[str, dict[str, tuple[torch.Tensor, Path]]], plain: dict[str, torch.dtype],
                files) -> str:
    base, parts = next(iter(pending.items()))
    more = f" (and {len(pending) - 1} more)" if len(pending) > 1 else ""
    if "weight" in parts:
        return (f"{parts['weight'][1]}: float8_e4m3fn tensor {base} has no {base}{SCALE_SUFFIX} in "
                f"{files.describe()}{more}")
    found = f"; {base} is {plain[base]}, not float8_e4m3fn" if base in plain else ""
    return (f"{parts['scale'][1]}: tensor {base}{SCALE_SUFFIX} has no float8_e4m3fn weight {base} in "
            f"{files.describe()}{found}{more}")


# ---- which layers stay in fp8 ------------------------------------------------------------------------


def fp8_tensor_names(files) -> set[str]:
    """Names of the float8_e4m3fn tensors of a checkpoint (reads the safetensors headers only)."""
    names: set[str] = set()
    for path in files.files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                names.update(n for n in handle.keys() if handle.get_slice(n).get_dtype() == "F8_E4M3")
        except (SafetensorError, OSError) as exc:
            raise LoadError(f"{path}: truncated or corrupt safetensors file ({exc})") from None
    return names


def _shards_by_layer(model: nn.Module, hf_names: Iterable[str]) -> dict[str, dict[int | None, str]]:
    """module path -> {shard id: checkpoint name} for the fp8 weights that land in a `weight`
    parameter of the model, by the DeepSeek name table (and the MTP layer's own prefix)."""
    from deepserve.models.deepseek_v2 import map_name  # the block-FP8 checkpoints are DeepSeek's

    params, own = dict(model.named_parameters()), getattr(model, "own_name", None)
    layers: dict[str, dict[int | None, str]] = {}
    for hf_name in sorted(hf_names):
        name = own(hf_name) if own is not None else hf_name
        if name is None:
            continue
        target = map_name(name)
        module_path, _, attr = target.param.rpartition(".")
        if target.expert is None and attr == "weight" and target.param in params:
            layers.setdefault(module_path, {})[target.shard] = hf_name
    return layers


def _keepable(layer: nn.Module, shards: dict[int | None, str], block: tuple[int, int]) -> bool:
    if not isinstance(layer, _KEEPABLE) or getattr(layer, "keep_dense_weight", False) or layer.tp_size != 1:
        return False
    if not isinstance(layer, MergedColumnParallelLinear):
        return set(shards) == {None}
    sizes = layer.output_sizes
    return set(shards) == set(range(len(sizes))) and all(s % block[0] == 0 for s in sizes[:-1])


def _load_scale(layer: LinearBase, block: tuple[int, int], param: nn.Parameter, loaded: torch.Tensor,
                shard_id: int | None = None) -> None:
    """weight_scale_inv loader: whole, or for a merged layer the block rows of shard `shard_id`."""
    if shard_id is None:
        checked_copy(param.data, loaded)
        return
    rows = [-(-size // block[0]) for size in layer.output_sizes]
    checked_copy(param.data.narrow(0, sum(rows[:shard_id]), rows[shard_id]), loaded)


def install_fp8_weight(layer: LinearBase, block: tuple[int, int]) -> None:
    """Replace layer.weight (float [N, K]) by an empty fp8 [N, K] and add weight_scale_inv [Nb, Kb]
    f32, each with its weight loader; the float storage is released."""
    n, k = layer.weight.shape
    device = layer.weight.device
    weight = nn.Parameter(torch.empty(n, k, dtype=FP8_DTYPE, device=device), requires_grad=False)
    weight.weight_loader = layer.weight_loader
    scale = nn.Parameter(torch.empty(scale_shape((n, k), block), dtype=torch.float32, device=device),
                         requires_grad=False)
    scale.weight_loader = functools.partial(_load_scale, layer, block)
    layer.weight, layer.weight_scale_inv, layer.weight_block = weight, scale, tuple(block)


def _uses_deepseek_names(model: nn.Module) -> bool:
    from deepserve.models.deepseek_mtp import DeepseekMTP
    from deepserve.models.deepseek_v2 import DeepseekV2ForCausalLM

    return isinstance(model, (DeepseekV2ForCausalLM, DeepseekMTP))


def keep_fp8_layers(model: nn.Module, fp8_names: Iterable[str], block: tuple[int, int]) -> frozenset[str]:
    """Give the keepable layers fp8 parameters (`install_fp8_weight`); their checkpoint names.
    Only DeepSeek models (whose name table maps `weight_scale_inv`); other architectures load
    dequantised and their linears are quantised to blocks again by the method."""
    if not _uses_deepseek_names(model):
        return frozenset()
    kept: set[str] = set()
    for path, shards in _shards_by_layer(model, fp8_names).items():
        layer = model.get_submodule(path)
        if _keepable(layer, shards, block):
            install_fp8_weight(layer, block)
            kept.update(shards.values())
    return frozenset(kept)


# ---- the plan ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockFp8Plan:
    mode: str | None  # the linear method name for process_weights_after_loading (None: float)
    block: tuple[int, int]
    keep: frozenset[str]
    device: torch.device
    dtype: torch.dtype
    int8_experts: bool  # finish(): routed experts to per-row int8 (int8 modes off CUDA)

    def wrap(self, stream) -> BlockFp8Stream:
        use_triton = self.device.type == "cuda" and device_supports_fp8(self.device)
        return BlockFp8Stream(stream, self.block, self.keep, self.device, self.dtype, use_triton)

    def finish(self, model: nn.Module) -> None:
        if self.int8_experts:
            from deepserve.quant.block_fp8_experts import quantize_routed_experts_int8

            quantize_routed_experts_int8(model)


def plan_block_fp8_load(model: nn.Module, files, block: tuple[int, int], requested: str | None,
                        device: str | torch.device, dtype: torch.dtype) -> BlockFp8Plan:
    """Resolve the serving mode and, for block-fp8, give the kept layers their fp8 parameters."""
    mode = serving_mode(requested, device)
    keep = keep_fp8_layers(model, fp8_tensor_names(files), block) if mode == BLOCK_FP8 else frozenset()
    device = torch.device(device)
    return BlockFp8Plan(None if mode == NO_QUANTIZATION else mode, tuple(block), keep, device, dtype,
                        int8_experts=mode in _INT8_MODES and device.type != "cuda")


def dequantizing(stream, block: tuple[int, int], device: str | torch.device,
                 dtype: torch.dtype) -> BlockFp8Stream:
    """`stream` with every fp8 weight dequantised (for modules loaded on their own: the MTP layer)."""
    device = torch.device(device)
    return BlockFp8Stream(stream, block, frozenset(), device, dtype,
                          device.type == "cuda" and device_supports_fp8(device))
