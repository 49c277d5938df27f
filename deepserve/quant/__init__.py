"""Quantisation methods: a registry of per-layer `LinearMethod` factories, imported lazily.

    get_quant_method("int8")              -> Int8W8A8Method()      weights int8/channel, activations int8/token
    get_quant_method("int8-weight-only")  -> Int8WeightOnlyMethod() weights int8/channel, activations float
    get_quant_method("int8-weight-only-asym") -> Int8WeightOnlyMethod(symmetric=False)  (zero points)
    get_quant_method("int8-hadamard")     -> Int8HadamardW8A8Method() W8A8 on block-Hadamard-rotated
                                             inputs (x H, W H; block 64), see quant/hadamard.py
    get_quant_method("block-fp8")         -> BlockFp8LinearMethod() DeepSeek-V3 fp8 weights + 128x128 block
                                             scales, activations fp8 per token per 128 columns
    "none": no method: float linear layers (a quantised checkpoint is dequantised at load)
    get_quant_method("fp8")               -> Fp8Method()           e4m3 weights/channel, activations/token, the
                                             GEMM's sums in the tensor core's precision, as vLLM's fp8 (decode
                                             rows: float activations; quant/fp8.py)
    get_quant_method("fp8-per-tensor")    -> Fp8Method(per_channel=False)
    get_quant_method("fp8-exact-accum")   -> Fp8Method(fast_accum=False)  as fp8, float32 sums (slower, exact)

`LinearBase` layers are quantised by the method; the embedding, the LM head and MLA's kv_b_proj (its
dense matrix is absorbed into q/o) stay in float. The stacked MoE experts become int8 per (expert, row)
under int8 / int8-weight-only where their MoE backend takes int8 stacks (the fused Triton kernel, i.e.
CUDA: `int8_experts.py`), and stay in float otherwise (but for block-FP8 checkpoints served int8 off
CUDA: `block_fp8_experts.Int8RoutedExperts`).
This module imports no torch: the CLI lists the names without loading the methods.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any, Mapping

# name -> (module, class, constructor kwargs)
_METHODS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "int8": ("deepserve.quant.int8", "Int8W8A8Method", {}),
    "int8-weight-only": ("deepserve.quant.int8", "Int8WeightOnlyMethod", {}),
    "int8-weight-only-asym": ("deepserve.quant.int8", "Int8WeightOnlyMethod", {"symmetric": False}),
    "int8-hadamard": ("deepserve.quant.hadamard", "Int8HadamardW8A8Method", {"block": 64}),
    "block-fp8": ("deepserve.quant.block_fp8", "BlockFp8LinearMethod", {}),
    "fp8": ("deepserve.quant.fp8", "Fp8Method", {}),
    "fp8-per-tensor": ("deepserve.quant.fp8", "Fp8Method", {"per_channel": False}),
    "fp8-exact-accum": ("deepserve.quant.fp8", "Fp8Method", {"fast_accum": False}),
}
NO_QUANTIZATION = "none"
WRITABLE_METHODS = ("int8", "int8-weight-only", "fp8")  # what `deepserve quantize --method` writes (the other
# names are derived from these and the options, or are serving choices over an fp8 / int8 checkpoint)
QUANTIZATION_METHODS: tuple[str, ...] = (*_METHODS, NO_QUANTIZATION)
QUANTIZATION_HELP = (
    "quantization of the linear layers: int8 (W8A8), int8-weight-only (W8A16; -asym: zero-point weights; on CUDA "
    "int8 and int8-weight-only also store the routed MoE experts as int8, W8A16), fp8 / fp8-per-tensor (W8A8 "
    "FP8 with per-channel / per-tensor weight scales, CUDA 8.9+, decode batches of up to 4 W8A16-style with fp8 "
    "weights; their GEMM sums in the tensor core's reduced precision, as vLLM's fp8 does; fp8-exact-accum: fp8 "
    "with float32 sums, slower), block-fp8 (DeepSeek-V3/R1 "
    "FP8 weights with 128x128 block scales, activations FP8 per token per 128 columns; CUDA compute "
    "capability 8.9+), none (float; a quantised checkpoint is dequantised at load). Default: what the "
    "checkpoint says; a block-FP8 checkpoint (V3/R1) is served as block-fp8 on FP8 GPUs and dequantised "
    "(none) elsewhere; with int8 it is dequantised, then quantised per channel")
QUANT_METHOD_TAG = "deepserve-int8"  # config.json quantization_config.quant_method of our checkpoints


def check_quantization(name: str | None) -> str | None:
    """`name` if registered (or None); ValueError listing the registered names otherwise."""
    if name is not None and name not in QUANTIZATION_METHODS:
        raise ValueError(f"unknown quantization {name!r}; use one of {', '.join(QUANTIZATION_METHODS)}")
    return name


def get_quant_method(name: str):
    """A fresh method object (one per layer: it may keep per-layer state)."""
    if check_quantization(name) == NO_QUANTIZATION:
        raise ValueError(f"{NO_QUANTIZATION!r} is no method: float layers take none")
    module, cls, kwargs = _METHODS[name]
    return getattr(import_module(module), cls)(**kwargs)


def hadamard_block_of(name: str) -> int | None:
    """The input-rotation block of method `name` (int8-hadamard), None for the others."""
    entry = _METHODS.get(name)
    return entry[2].get("block") if entry and entry[1] == "Int8HadamardW8A8Method" else None


FP8_SCHEME = "w8a8-fp8"  # quantization_config.scheme of an fp8 checkpoint (e4m3 weights per channel)


def quantization_config(name: str) -> dict[str, Any]:
    """The `quantization_config` entry written into config.json for a checkpoint quantised by `name`."""
    check_quantization(name)
    scheme = FP8_SCHEME if name == "fp8" else "w8a8" if name in ("int8", "int8-hadamard") else "w8a16"
    config = {"quant_method": QUANT_METHOD_TAG, "scheme": scheme, "symmetric": not name.endswith("-asym")}
    block = hadamard_block_of(name)
    if block is not None:
        config["input_rotation"] = {"type": "block-hadamard", "block_size": block}
    return config


def quantization_from_hf_config(hf_config: Mapping[str, Any]) -> str | None:
    """The method name of a checkpoint written by `deepserve quantize`, or None (float, or another
    tool's quantization_config such as DeepSeek-V3's block FP8)."""
    qc = hf_config.get("quantization_config")
    if not isinstance(qc, Mapping) or qc.get("quant_method") != QUANT_METHOD_TAG:
        return None
    if qc.get("scheme") == "w8a8":
        return _w8a8_name(qc.get("input_rotation"))
    if qc.get("scheme") == FP8_SCHEME:
        return "fp8"
    if qc.get("scheme") != "w8a16":
        raise ValueError(f"quantization_config.scheme {qc.get('scheme')!r} is not one deepserve writes "
                         f"(w8a8, w8a16, {FP8_SCHEME})")
    return "int8-weight-only" if qc.get("symmetric", True) else "int8-weight-only-asym"


def _w8a8_name(rotation: Any) -> str:
    if rotation is None:
        return "int8"
    if isinstance(rotation, Mapping) and rotation.get("type") == "block-hadamard" \
            and rotation.get("block_size") == hadamard_block_of("int8-hadamard"):
        return "int8-hadamard"
    raise ValueError(f"quantization_config.input_rotation {rotation!r} is not supported "
                     f"(deepserve reads block-hadamard with block_size {hadamard_block_of('int8-hadamard')})")
