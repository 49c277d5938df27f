"""The accuracy gate on the bundled SmolLM2-135M: W8A8 passes it, a broken W8A8 does not.

The candidate is the W8A8 recipe of `deepserve quantize` (SmoothQuant alpha 0.5 folded into the
weights, block-Hadamard input rotation) with round-to-nearest instead of GPTQ, built in memory
(quantize_in_memory computes what the written checkpoint computes; test_quant_smooth.py checks
that) so the module runs in well under a minute. The gate's thresholds are the issue's: perplexity
within 2% of float32 and top-1 agreement >= 97%, over every position of the shipped held-out text.
"""

from __future__ import annotations

import pytest
import torch

from deepserve.engine.args import EngineArgs
from deepserve.loader.model_loader import load_model
from deepserve.loader.tokenizer import load_tokenizer
from deepserve.quant.calibrated import quantize_in_memory
from deepserve.quant.eval import (DEFAULT_PROMPTS, _candidate_pass, _reference_pass, check_held_out, judge,
                                  read_eval_text)
from deepserve.quant.writer import DEFAULT_CALIBRATION, _float_model, plan

WINDOW = 512


@pytest.fixture(scope="module")
def inputs():
    config = EngineArgs(model=None, device="cpu", dtype="float32").create_engine_config()
    tokenizer = load_tokenizer(config.model)
    return (config, tokenizer.encode(read_eval_text(None)), [tokenizer.encode(p) for p in DEFAULT_PROMPTS],
            tokenizer.encode(DEFAULT_CALIBRATION.read_text(encoding="utf-8")))


@pytest.fixture(scope="module")
def reference(inputs):
    config, text_ids, prompt_ids, _ = inputs
    return _reference_pass(load_model(config, progress=False), text_ids, prompt_ids, WINDOW)


@pytest.fixture(scope="module")
def w8a8(inputs):
    config, _, _, calibration_ids = inputs
    return quantize_in_memory(_float_model(config), calibration_ids, plan("int8", rounding="rtn"))


def _judge(model, inputs, reference):
    _, text_ids, prompt_ids, _ = inputs
    report = judge(reference, _candidate_pass(model, reference, text_ids, prompt_ids, WINDOW), 0.97, 0.02)
    print(report.summary())
    return report


def test_shipped_texts_are_held_out_and_large_enough(inputs):
    _, text_ids, _, calibration_ids = inputs
    check_held_out(DEFAULT_CALIBRATION.read_text(encoding="utf-8"), read_eval_text(None))
    assert len(text_ids) >= 3000 and len(calibration_ids) >= 1500


def test_gate_passes_the_w8a8_recipe(inputs, reference, w8a8):
    report = _judge(w8a8, inputs, reference)
    assert report.passed, report.reasons
    assert report.num_text_positions == len(inputs[1]) - 1 and report.num_positions > report.num_text_positions
    assert report.top1_low < report.top1_agreement < report.top1_high


def test_gate_refuses_w8a8_with_down_proj_scales_times_three(inputs, reference, w8a8):
    scales = [m.weight_scale for n, m in w8a8.named_modules() if n.endswith("mlp.down_proj")]
    with torch.no_grad():
        for s in scales:
            s.mul_(3.0)
    try:
        report = _judge(w8a8, inputs, reference)
    finally:
        with torch.no_grad():
            for s in scales:
                s.div_(3.0)
    assert not report.passed
    assert any("top-1" in r for r in report.reasons) and any("perplexity" in r for r in report.reasons)
