"""Accuracy of the INT8 recipes on the default model (SmolLM2-135M-Instruct), CPU float32 reference.

    python benchmarks/quant_accuracy.py [--configs NAME,...] [--out benchmarks/results/quant_accuracy.jsonl]

Each configuration is built in memory exactly as `deepserve quantize` would write it
(deepserve.quant.calibrated.quantize_in_memory; the plain methods through the engine's loader), then
scored by the accuracy gate's own passes (deepserve.quant.eval) against float32: perplexity on the
shipped held-out text (3150 tokens), teacher-forced top-1 agreement and KL over every text position
plus the default prompts, with the 95% Wilson interval. One JSON line per configuration.

The asymmetric W8A8 rows use a measurement-only method defined here (int8 weights with per-channel
zero points, per-token symmetric int8 activations; the integer GEMM with its zero-point correction
computes the same numbers); deepserve ships no asymmetric W8A8 method. So do the smoothed / rotated FP8
rows (e4m3 weights per channel, e4m3 activations per token, as fp8's CPU emulation computes them, on
smoothed and / or Hadamard-rotated weights): they measure whether a calibrated fp8 recipe would pay.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deepserve.engine.args import EngineArgs  # noqa: E402
from deepserve.layers.linear_method import LinearMethod  # noqa: E402
from deepserve.loader.model_loader import load_model  # noqa: E402
from deepserve.loader.tokenizer import load_tokenizer  # noqa: E402
from deepserve.quant.calibrated import quantize_in_memory  # noqa: E402
from deepserve.quant.eval import DEFAULT_PROMPTS, _candidate_pass, _reference_pass, judge, read_eval_text  # noqa: E402
from deepserve.quant.int8 import dequantize_per_channel_ref, quantize_per_channel_ref, quantize_per_token_ref  # noqa: E402
from deepserve.quant.writer import DEFAULT_CALIBRATION, _float_model, plan  # noqa: E402

WINDOW = 512

# name -> (description, builder kind, kwargs)
CONFIGS = {
    "w8a8-rtn": ("W8A8 plain, round-to-nearest", "engine", {"quantization": "int8"}),
    "w8a8-smooth-rtn": ("W8A8 + SmoothQuant a=0.5, RTN", "recipe",
                        {"method": "int8", "rotation": "none", "rounding": "rtn"}),
    "w8a8-smooth-gptq": ("W8A8 + SmoothQuant a=0.5, GPTQ", "recipe", {"method": "int8", "rotation": "none"}),
    "w8a8-had-rtn": ("W8A8 + Hadamard-64, RTN", "recipe",
                     {"method": "int8", "smoothing_alpha": None, "rounding": "rtn"}),
    "w8a8-had-gptq": ("W8A8 + Hadamard-64, GPTQ", "recipe", {"method": "int8", "smoothing_alpha": None}),
    "w8a8-had-smooth-rtn": ("W8A8 + Hadamard-64 + SmoothQuant a=0.5, RTN", "recipe",
                            {"method": "int8", "rounding": "rtn"}),
    "w8a8-had-smooth-gptq": ("W8A8 + Hadamard-64 + SmoothQuant a=0.5, GPTQ (default)", "recipe", {"method": "int8"}),
    "w8a8-had-smooth0.3-gptq": ("W8A8 + Hadamard-64 + SmoothQuant a=0.3, GPTQ", "recipe",
                                {"method": "int8", "smoothing_alpha": 0.3}),
    "w8a8-had-smooth0.7-gptq": ("W8A8 + Hadamard-64 + SmoothQuant a=0.7, GPTQ", "recipe",
                                {"method": "int8", "smoothing_alpha": 0.7}),
    "w8a8-asym-rtn": ("W8A8 asymmetric weights (zero points), RTN", "asym", {}),
    "w8a8-had-smooth-asym-rtn": ("W8A8 asymmetric weights + Hadamard-64 + SmoothQuant a=0.5, RTN", "asym",
                                 {"method": "int8", "rounding": "rtn"}),
    "fp8-rtn": ("FP8 (e4m3 W8A8) plain, RTN", "engine", {"quantization": "fp8"}),
    "fp8-smooth-rtn": ("FP8 + SmoothQuant a=0.5, RTN", "fp8", {"smoothing_alpha": 0.5}),
    "fp8-had-rtn": ("FP8 + Hadamard-64, RTN", "fp8", {"rotate": True}),
    "fp8-had-smooth-rtn": ("FP8 + Hadamard-64 + SmoothQuant a=0.5, RTN", "fp8",
                           {"smoothing_alpha": 0.5, "rotate": True}),
    "w8a16-rtn": ("W8A16 symmetric, RTN", "engine", {"quantization": "int8-weight-only"}),
    "w8a16-asym-rtn": ("W8A16 asymmetric (zero points), RTN", "engine", {"quantization": "int8-weight-only-asym"}),
    "w8a16-gptq": ("W8A16 symmetric, GPTQ", "recipe", {"method": "int8-weight-only"}),
}


class _AsymW8A8Fake(LinearMethod):
    """Measurement only: dequantised asymmetric int8 weights x per-token symmetric int8 activations."""

    def process_weights_after_loading(self, layer) -> None:
        q, scale, zp = quantize_per_channel_ref(layer.weight.detach(), symmetric=False)
        layer.weight = torch.nn.Parameter(dequantize_per_channel_ref(q, scale, zp), requires_grad=False)

    def apply(self, layer, x, bias):
        rows = x.reshape(-1, x.shape[-1])
        q, s = quantize_per_token_ref(rows)
        return F.linear(q.float() * s[:, None], layer.weight, bias).view(*x.shape[:-1], -1)


def _asym(config, calibration_ids, kwargs):
    """Asymmetric-weight W8A8: optionally smoothed (+ Hadamard) float weights, then _AsymW8A8Fake."""
    from deepserve.layers.linear import LinearBase
    from deepserve.quant.calibrated import prepare
    from deepserve.quant.hadamard import block_size_for, rotate_blocks

    net = _float_model(config)
    hadamard = bool(kwargs)
    if hadamard:
        prepare(net, calibration_ids, plan(**kwargs))
    for module in net.modules():
        if isinstance(module, LinearBase):
            block = block_size_for(module.weight.shape[1]) if hadamard else None
            if block:
                module.weight = torch.nn.Parameter(rotate_blocks(module.weight.detach().double(), block).float(),
                                                   requires_grad=False)
            module.method = _AsymW8A8Fake() if not block else _RotatedAsym(block)
            module.method.process_weights_after_loading(module)
    return net.eval()


class _RotatedAsym(_AsymW8A8Fake):
    def __init__(self, block: int):
        self.block = block

    def apply(self, layer, x, bias):
        from deepserve.quant.hadamard import rotate_blocks

        return super().apply(layer, rotate_blocks(x, self.block), bias)


class _Fp8Fake(LinearMethod):
    """Measurement only: e4m3 weights per channel x e4m3 activations per token (fp8's CPU emulation);
    `block`: the input rotated by Hadamard blocks first (the weights were rotated by the caller)."""

    def __init__(self, block: int | None = None):
        self.block = block

    def process_weights_after_loading(self, layer) -> None:
        from deepserve.quant.fp8 import dequantize_weight_fp8_ref, quantize_weight_fp8_ref

        q, scale = quantize_weight_fp8_ref(layer.weight.detach())
        layer.weight = torch.nn.Parameter(dequantize_weight_fp8_ref(q, scale), requires_grad=False)

    def apply(self, layer, x, bias):
        from deepserve.quant.fp8 import quantize_per_token_fp8_ref
        from deepserve.quant.hadamard import rotate_blocks

        rows = (x if self.block is None else rotate_blocks(x, self.block)).reshape(-1, x.shape[-1])
        q, s = quantize_per_token_fp8_ref(rows)
        return F.linear(q.float() * s[:, None], layer.weight, bias).view(*x.shape[:-1], -1)


def _fp8(config, calibration_ids, kwargs):
    """FP8 on optionally smoothed (SmoothQuant, `smoothing_alpha`) and rotated (`rotate`) float weights."""
    from deepserve.layers.linear import LinearBase
    from deepserve.quant.calibrated import prepare
    from deepserve.quant.hadamard import block_size_for, rotate_blocks

    net = _float_model(config)
    if kwargs.get("smoothing_alpha") is not None:
        prepare(net, calibration_ids, plan("int8", rotation="none", smoothing_alpha=kwargs["smoothing_alpha"],
                                           rounding="rtn"))
    for module in net.modules():
        if isinstance(module, LinearBase):
            block = block_size_for(module.weight.shape[1]) if kwargs.get("rotate") else None
            if block:
                module.weight = torch.nn.Parameter(rotate_blocks(module.weight.detach().double(), block).float(),
                                                   requires_grad=False)
            module.method = _Fp8Fake(block)
            module.method.process_weights_after_loading(module)
    return net.eval()


def build(name: str, config, calibration_ids):
    _, kind, kwargs = CONFIGS[name]
    if kind == "engine":
        return load_model(EngineArgs(model=None, device="cpu", dtype="float32",
                                     quantization=kwargs["quantization"]).create_engine_config(), progress=False)
    if kind == "recipe":
        return quantize_in_memory(_float_model(config), calibration_ids, plan(calibration=DEFAULT_CALIBRATION, **kwargs))
    if kind == "fp8":
        return _fp8(config, calibration_ids, kwargs)
    return _asym(config, calibration_ids, kwargs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated of: {', '.join(CONFIGS)}")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "quant_accuracy.jsonl"))
    ns = parser.parse_args(argv)
    torch.manual_seed(0)
    config = EngineArgs(model=None, device="cpu", dtype="float32").create_engine_config()
    tok = load_tokenizer(config.model)
    text_ids, prompt_ids = tok.encode(read_eval_text(None)), [tok.encode(p) for p in DEFAULT_PROMPTS]
    calibration_ids = tok.encode(DEFAULT_CALIBRATION.read_text(encoding="utf-8"))
    reference = _reference_pass(load_model(config, progress=False), text_ids, prompt_ids, WINDOW)
    for name in ns.configs.split(","):
        start = time.perf_counter()
        model = build(name, config, calibration_ids)
        built = time.perf_counter() - start
        report = judge(reference, _candidate_pass(model, reference, text_ids, prompt_ids, WINDOW), 0.97, 0.02)
        del model
        row = {"config": name, "description": CONFIGS[name][0], "ppl_ref": round(report.ppl_ref, 4),
               "ppl": round(report.ppl_cand, 4), "ppl_ratio": round(report.ppl_ratio, 4),
               "top1": round(report.top1_agreement, 4), "top1_ci95": [round(report.top1_low, 4), round(report.top1_high, 4)],
               "mean_kl": round(report.mean_kl, 5), "positions": report.num_positions,
               "text_positions": report.num_text_positions, "passes_gate": report.passed,
               "build_s": round(built, 1), "reference": "float32 on CPU", "model": "SmolLM2-135M-Instruct (Q4_1 GGUF)",
               "calibration_tokens": len(calibration_ids)}
        print(json.dumps(row), flush=True)
        with open(ns.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
