"""Quantisation methods: a registry of per-layer `LinearMethod` factories, imported lazily.

    get_quant_method("int8")              -> Int8W8A8Method()      weights int8/channel, activations int8/token
    get_quant_method("int8-weight-only")  -> Int8WeightOnlyMethod() weights int8/channel, activations float
    get_quant_method("int8-weight-only-asym") -> Int8WeightOnlyMethod(symmetric=False)  (zero points)
    get_quant_method("fp8")               -> Fp8Method()           e4m3 weights/channel, activations/token
    get_quant_method("fp8-per-tensor")    -> Fp8Method(per_channel=False)

Only `LinearBase` layers are quantised; the embedding, the LM head, MLA's kv_b_proj (its dense
matrix is absorbed into q/o) and the stacked MoE experts stay in float in this slice.
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
    "fp8": ("deepserve.quant.fp8", "Fp8Method", {}),
    "fp8-per-tensor": ("deepserve.quant.fp8", "Fp8Method", {"per_channel": False}),
}
QUANTIZATION_METHODS: tuple[str, ...] = tuple(_METHODS)
QUANT_METHOD_TAG = "deepserve-int8"  # config.json quantization_config.quant_method of our checkpoints


def check_quantization(name: str | None) -> str | None:
    """`name` if registered (or None); ValueError listing the registered names otherwise."""
    if name is not None and name not in _METHODS:
        raise ValueError(f"unknown quantization {name!r}; use one of {', '.join(QUANTIZATION_METHODS)}")
    return name


def get_quant_method(name: str):
    """A fresh method object (one per layer: it may keep per-layer state)."""
    module, cls, kwargs = _METHODS[check_quantization(name)]
    return getattr(import_module(module), cls)(**kwargs)


def quantization_config(name: str) -> dict[str, Any]:
    """The `quantization_config` entry written into config.json for a checkpoint quantised by `name`."""
    check_quantization(name)
    return {"quant_method": QUANT_METHOD_TAG, "scheme": "w8a8" if name == "int8" else "w8a16",
            "symmetric": not name.endswith("-asym")}


def quantization_from_hf_config(hf_config: Mapping[str, Any]) -> str | None:
    """The method name of a checkpoint written by `deepserve quantize`, or None (float, or another
    tool's quantization_config such as DeepSeek-V3's block FP8)."""
    qc = hf_config.get("quantization_config")
    if not isinstance(qc, Mapping) or qc.get("quant_method") != QUANT_METHOD_TAG:
        return None
    if qc.get("scheme") == "w8a8":
        return "int8"
    return "int8-weight-only" if qc.get("symmetric", True) else "int8-weight-only-asym"
