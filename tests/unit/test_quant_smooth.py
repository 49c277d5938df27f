"""Calibrated quantisation: smoothing, block-Hadamard W8A8, GPTQ rounding, the calibrated writer."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from deepserve.engine.args import EngineArgs
from deepserve.layers.linear import ReplicatedLinear
from deepserve.quant import get_quant_method, quantization_config, quantization_from_hf_config
from deepserve.quant.calibrated import quantize_in_memory
from deepserve.quant.eval import next_token_logprobs, read_eval_text
from deepserve.quant.gptq import gptq_quantize
from deepserve.quant.hadamard import Int8HadamardW8A8Method, block_size_for, hadamard_matrix, rotate_blocks
from deepserve.quant.int8 import DequantizingStream, dequantize_per_channel_ref, quantize_per_channel_ref
from deepserve.quant.smooth import calibrate, smooth_, smoothing_factors
from deepserve.quant.writer import DEFAULT_CALIBRATION, _float_model, plan, quantize_checkpoint
from deepserve.sampling_params import SamplingParams
from tests.tiny_checkpoints import make_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """GQA (4 heads, 2 kv heads) with biases on q/k/v/o and the MLP, so every fold meets a bias."""
    return make_tiny_llama(tmp_path_factory.mktemp("smooth") / "llama", attention_bias=True, mlp_bias=True)


def _config(folder):
    return EngineArgs(model=None if folder is None else str(folder), device="cpu",
                      dtype="float32").create_engine_config()


def _ids(folder, text: str, n: int) -> list[int]:
    from deepserve.loader.tokenizer import load_tokenizer

    return load_tokenizer(_config(folder).model).encode(text)[:n]


def _logprobs(model, ids) -> torch.Tensor:
    return next_token_logprobs(model, [ids])[0]


# ---- smoothing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.2, 0.5, 0.8])
def test_smoothing_keeps_the_float_function_of_a_tiny_gqa_model(tiny, alpha):
    net = _float_model(_config(tiny))
    ids = _ids(tiny, read_eval_text(None), 120)
    before = _logprobs(net, ids)
    stats = calibrate(net, _ids(tiny, DEFAULT_CALIBRATION.read_text(), 200), hessians=False)
    factors = smoothing_factors(net, stats, alpha)
    assert all(torch.isfinite(s).all() and (s > 0).all() for s in factors.values())
    assert any((s - 1).abs().max() > 0.1 for s in factors.values())  # it does move ranges
    smooth_(net, factors)
    torch.testing.assert_close(_logprobs(net, ids), before, atol=2e-5, rtol=0)
    # the inputs of the smoothed linears are the old ones divided by s
    after = calibrate(net, _ids(tiny, DEFAULT_CALIBRATION.read_text(), 200), hessians=False)
    for name, s in factors.items():
        torch.testing.assert_close(after.act_max[name], stats.act_max[name] / s, rtol=1e-4, atol=1e-6)


def test_smoothing_keeps_the_float_function_of_the_default_model():
    """SmolLM2-135M (30 layers, GQA 9/3): smoothed float32 == original within float32 rounding
    (the largest difference measured was 6e-5 nats on 300 tokens)."""
    net = _float_model(_config(None))
    ids = _ids(None, read_eval_text(None), 128)
    before = _logprobs(net, ids)
    stats = calibrate(net, _ids(None, DEFAULT_CALIBRATION.read_text(), 256), hessians=False)
    smooth_(net, smoothing_factors(net, stats, 0.5))
    torch.testing.assert_close(_logprobs(net, ids), before, atol=5e-4, rtol=0)


def test_smoothing_refuses_alpha_outside_0_1(tiny):
    net = _float_model(_config(tiny))
    stats = calibrate(net, _ids(tiny, "The quick brown fox", 8), hessians=False)
    with pytest.raises(ValueError, match="alpha"):
        smoothing_factors(net, stats, 1.5)


# ---- block-Hadamard W8A8 --------------------------------------------------------------------------


def test_hadamard_blocks_are_orthogonal_involutions():
    for order in (1, 2, 64):
        h = hadamard_matrix(order, torch.float64)
        torch.testing.assert_close(h @ h, torch.eye(order, dtype=torch.float64), atol=1e-12, rtol=0)
        torch.testing.assert_close(h, h.t())
    x = torch.randn(3, 5, 192, dtype=torch.float64)
    torch.testing.assert_close(rotate_blocks(rotate_blocks(x, 64), 64), x, atol=1e-12, rtol=0)
    torch.testing.assert_close(rotate_blocks(x, 64).norm(dim=-1), x.norm(dim=-1))
    assert block_size_for(576) == 64 and block_size_for(96) == 32 and block_size_for(7) == 1
    with pytest.raises(ValueError, match="power of two"):
        hadamard_matrix(12)


def test_hadamard_method_on_a_layer_with_an_outlier_channel():
    """x H (W H)^T = x W^T; quantised, the rotation spreads the outlier and cuts the error."""
    torch.manual_seed(0)
    x = torch.randn(16, 128)
    x[:, 5] *= 60.0  # one outlier channel, as in SmolLM2's activations
    errors = {}
    for name in ("int8", "int8-hadamard"):
        layer = ReplicatedLinear(128, 48, bias=True)
        with torch.no_grad():
            layer.weight.normal_()
            layer.bias.normal_()
        ref = F.linear(x, layer.weight, layer.bias).detach()
        layer.process_weights_after_loading(name)
        assert layer.weight.dtype == torch.int8
        errors[name] = float((layer(x).detach() - ref).norm() / ref.norm())
    assert errors["int8-hadamard"] < errors["int8"] / 2, errors


def test_hadamard_checkpoint_weights_come_back_exactly():
    """Stored int8 of W H -> DequantizingStream rotates back -> the method quantises W H again:
    the same integers and scales (to an ulp)."""
    torch.manual_seed(1)
    w = torch.randn(40, 128) * torch.rand(40, 1)
    q, scale, _ = quantize_per_channel_ref(rotate_blocks(w.double(), 64).float())
    stream = DequantizingStream([("l.weight", q), ("l.weight_scale", scale)], hadamard_block=64)
    (name, loaded), = list(stream)
    layer = ReplicatedLinear(128, 40, bias=False)
    with torch.no_grad():
        layer.weight.copy_(loaded)
    Int8HadamardW8A8Method().process_weights_after_loading(layer)
    assert name == "l.weight" and torch.equal(layer.weight, q)
    torch.testing.assert_close(layer.weight_scale, scale, rtol=2e-7, atol=0)


def test_hadamard_quantization_config_round_trip():
    qc = quantization_config("int8-hadamard")
    assert qc["scheme"] == "w8a8" and qc["input_rotation"] == {"type": "block-hadamard", "block_size": 64}
    assert quantization_from_hf_config({"quantization_config": qc}) == "int8-hadamard"
    assert quantization_from_hf_config({"quantization_config": quantization_config("int8")}) == "int8"
    bad = {**qc, "input_rotation": {"type": "block-hadamard", "block_size": 32}}
    with pytest.raises(ValueError, match="input_rotation"):
        quantization_from_hf_config({"quantization_config": bad})
    assert isinstance(get_quant_method("int8-hadamard"), Int8HadamardW8A8Method)


# ---- GPTQ -----------------------------------------------------------------------------------------


def test_gptq_beats_round_to_nearest_on_the_calibration_outputs():
    torch.manual_seed(2)
    mix = torch.randn(96, 96) / 4 + torch.eye(96)  # correlated input channels
    x = torch.randn(512, 96) @ mix
    x[:, 3] *= 20.0
    w = torch.randn(64, 96)
    q, scale = gptq_quantize(w, x.t() @ x)
    rq, rscale, _ = quantize_per_channel_ref(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and torch.equal(scale, rscale)  # same grid
    assert (q.abs().amax(dim=1) == 127).all()  # each row keeps its +-127: re-quantisation is exact
    ref = x @ w.t()
    err = float((x @ dequantize_per_channel_ref(q, scale).t() - ref).norm())
    rtn = float((x @ dequantize_per_channel_ref(rq, rscale).t() - ref).norm())
    assert err < 0.8 * rtn, (err, rtn)
    q2, scale2, _ = quantize_per_channel_ref(dequantize_per_channel_ref(q, scale))
    assert torch.equal(q2, q)


def test_gptq_handles_dead_input_channels():
    torch.manual_seed(3)
    x = torch.randn(64, 32)
    x[:, 7] = 0.0  # never active: its Hessian row and column are zero
    q, _ = gptq_quantize(torch.randn(16, 32), x.t() @ x)
    assert q.dtype == torch.int8
    with pytest.raises(ValueError, match="does not match"):
        gptq_quantize(torch.randn(16, 32), torch.eye(31))


# ---- the calibrated writer ------------------------------------------------------------------------

PROMPTS = ["The quick brown fox", "Paris is the capital", "Émile a mangé 3"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def _greedy(llm) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, GREEDY)]


@pytest.mark.parametrize("method,rotation", [("int8", "hadamard"), ("int8", "none"), ("int8-weight-only", "none")])
def test_calibrated_checkpoint_loads_and_equals_in_memory_quantisation(tiny, tmp_path, method, rotation):
    from deepserve.loader.model_loader import load_model

    summary = quantize_checkpoint(tiny, tmp_path / "q", method, calibration=DEFAULT_CALIBRATION,
                                  rotation=rotation, progress=False)
    recipe = summary.recipe
    assert recipe.rounding == "gptq" and (recipe.smoothing_alpha == 0.5) == (method == "int8")
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["recipe"]["calibration"] == "calibration_text.txt" and qc["recipe"]["calibration_tokens"] > 1000
    assert qc["recipe"]["calibration_sha256"] == hashlib.sha256(DEFAULT_CALIBRATION.read_bytes()).hexdigest()
    with safe_open(str(tmp_path / "q" / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.v_proj.weight").dtype == torch.int8
        assert f.get_tensor("model.layers.0.self_attn.v_proj.bias").dtype == torch.float32
    loaded = load_model(_config(tmp_path / "q"), progress=False)
    memory = quantize_in_memory(_float_model(_config(tiny)), _ids(tiny, DEFAULT_CALIBRATION.read_text(), 10**6),
                                recipe)
    ids = _ids(tiny, read_eval_text(None), 100)
    torch.testing.assert_close(_logprobs(loaded, ids), _logprobs(memory, ids), atol=1e-5, rtol=0)


def test_hadamard_checkpoint_greedy_equals_the_engine_quantising_the_float_model(tiny, tmp_path):
    """Without smoothing and GPTQ the checkpoint is the engine's own --quantization int8-hadamard."""
    from deepserve import LLM

    out = quantize_checkpoint(tiny, tmp_path / "rtn", "int8", calibration=DEFAULT_CALIBRATION,
                              smoothing_alpha=None, rounding="rtn", progress=False).out
    loaded = LLM(str(out), num_kv_blocks=64)
    assert loaded.engine.config.quantization == "int8-hadamard"
    assert _greedy(loaded) == _greedy(LLM(str(tiny), quantization="int8-hadamard", num_kv_blocks=64))


def test_plan_choices():
    assert plan("int8").method == "int8-hadamard"
    assert plan("int8", rotation="none").method == "int8"
    assert plan("int8", calibration=None).rounding == "rtn"
    assert plan("int8-weight-only", asymmetric=True).rounding == "rtn"  # GPTQ grid is symmetric
    assert plan("int8-weight-only").smoothing_alpha is None
    with pytest.raises(ValueError, match="asymmetric"):
        plan("int8", asymmetric=True)
    with pytest.raises(ValueError, match="rounding"):
        plan("int8", rounding="nearest")


def test_cli_refuses_a_calibration_text_that_is_not_held_out(tiny, tmp_path, capsys):
    from deepserve.cli import main

    eval_copy = tmp_path / "cal.txt"
    eval_copy.write_text(read_eval_text(None))
    assert main(["quantize", "--model", str(tiny), "--out", str(tmp_path / "o"), "--calibration",
                 str(eval_copy), "--skip-gate"]) == 2
    assert "not held out" in capsys.readouterr().err and not (tmp_path / "o").exists()
