"""FP8 (e4m3) W8A8 linear method: quantisation references, the CPU emulation path, the registry, the
capability check, and a tiny model end to end. The CUDA path (`torch._scaled_mm`) is tested in
tests/unit/test_quant_gpu.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from deepserve.layers.linear import ReplicatedLinear
from deepserve.quant import get_quant_method
from deepserve.quant.fp8 import (FP8_DTYPE, Fp8Method, check_fp8_device, dequantize_weight_fp8_ref,
                                 fp8_linear_ref, quantize_per_token_fp8_ref, quantize_weight_fp8_ref)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("per_channel", [True, False])
def test_weight_round_trip_within_half_a_step(per_channel):
    w = torch.randn(48, 80) * torch.rand(48, 1) * 3
    q, scale = quantize_weight_fp8_ref(w, per_channel)
    assert q.dtype == FP8_DTYPE and scale.shape == (48,) and scale.dtype == torch.float32
    assert per_channel or bool((scale == scale[0]).all())
    err = (dequantize_weight_fp8_ref(q, scale) - w).abs()
    # 3 mantissa bits: half a step is 2^-4 of the value; below 2^-6 (subnormals) the step is 2^-9
    assert (err <= torch.maximum(w.abs() * 2.0 ** -4, scale[:, None] * 2.0 ** -10) * (1 + 1e-6)).all()
    assert (q.float().abs().amax(dim=1) == 448).any()  # the largest row element maps to e4m3's max


def test_per_token_activations_and_zero_rows():
    x = torch.randn(7, 64) * 5
    x[3] = 0
    q, scale = quantize_per_token_fp8_ref(x)
    assert q.dtype == FP8_DTYPE and scale.shape == (7,) and torch.isfinite(q.float()).all()
    assert (q[3].float() == 0).all()


def _layer(bias=True):
    torch.manual_seed(3)
    layer = ReplicatedLinear(96, 64, bias=bias)
    with torch.no_grad():
        layer.weight.normal_()
        if layer.bias is not None:
            layer.bias.normal_()
    return layer


@pytest.mark.parametrize("name", ["fp8", "fp8-per-tensor"])
def test_method_on_a_linear_layer(name):
    layer = _layer()
    x = torch.randn(3, 5, 96)
    ref = F.linear(x, layer.weight, layer.bias).detach()
    layer.process_weights_after_loading(name)
    assert isinstance(layer.method, Fp8Method) and layer.method.per_channel == (name == "fp8")
    assert layer.weight.dtype == FP8_DTYPE and layer.weight.is_contiguous()
    with torch.no_grad():
        y = layer(x)
    # Each factor carries a relative rounding error up to 2^-4 (rms ~0.026 over the e4m3 binades), so a
    # product ~0.036 rms: the output's relative error is about that (measured 0.034 / 0.037 here).
    assert y.shape == (3, 5, 64) and _rel(y, ref) < 0.06
    x_q, x_s = quantize_per_token_fp8_ref(x.reshape(15, 96))
    want = fp8_linear_ref(x_q, x_s, layer.weight, layer.weight_scale, layer.bias, torch.float32)
    torch.testing.assert_close(y.reshape(15, 64), want, rtol=0, atol=0)  # CPU runs the emulation itself
    q = layer.weight.clone()
    layer.method.process_weights_after_loading(layer)  # already fp8: kept
    assert torch.equal(layer.weight.view(torch.uint8), q.view(torch.uint8))


def test_registry():
    assert isinstance(get_quant_method("fp8"), Fp8Method) and get_quant_method("fp8").per_channel
    assert get_quant_method("fp8-per-tensor").per_channel is False
    assert get_quant_method("fp8").fast_accum and get_quant_method("fp8-per-tensor").fast_accum  # as vLLM's fp8
    exact = get_quant_method("fp8-exact-accum")
    assert isinstance(exact, Fp8Method) and exact.per_channel and not exact.fast_accum


@pytest.mark.parametrize("name,fast", [("fp8", True), ("fp8-per-tensor", True), ("fp8-exact-accum", False)])
def test_fast_accum_reaches_scaled_mm(monkeypatch, name, fast):
    """Where `_scaled_mm` runs (forced here on CPU, with a stand-in), each method passes its use_fast_accum on
    every entry: a float input, an input the norm quantised, and a SiLU-gated input; with a bias, never (cuBLASLt
    refuses some of those shapes: quant/fp8.py)."""
    import deepserve.quant.fp8 as fp8
    from deepserve.layers.linear_method import PerTokenQuant

    seen = []

    def scaled_mm(a, b, scale_a, scale_b, bias, out_dtype, use_fast_accum):
        seen.append(use_fast_accum)
        return torch.zeros(a.shape[0], b.shape[1], dtype=out_dtype)

    monkeypatch.setattr(fp8, "scaled_mm_fits", lambda x, w: True)
    monkeypatch.setattr(torch, "_scaled_mm", scaled_mm)
    layer = _layer()
    layer.process_weights_after_loading(name)
    x = torch.randn(4, 96)
    q, scale = quantize_per_token_fp8_ref(x)
    assert layer.method.apply(layer, PerTokenQuant(q, scale, torch.float32), None).shape == (4, 64)
    assert layer.method.apply(layer, x, None).shape == (4, 64)
    assert layer.method.apply_silu_and_mul(layer, torch.randn(4, 192), None).shape == (4, 64)
    assert seen == [fast] * 3
    assert layer.method.apply(layer, x, torch.randn(64)).shape == (4, 64)
    assert seen[3:] == [False]


@pytest.mark.parametrize("name", ["fp8", "fp8-exact-accum"])
def test_decode_rows_take_the_gemv(monkeypatch, name):
    """Decode rows (1 to GEMV_MAX_M; forced here on CPU, where the GEMV runs in Triton's interpreter) go to the
    decode GEMV with the e4m3 weights and unquantised rows: `apply` gives the GEMV's bits; `apply_gated` gives
    gemv then silu_and_mul for an fp8 consumer (None for another); `apply_silu_and_mul` runs SiLU-and-mul, then
    the GEMV; `_scaled_mm` (a stand-in) is never called. Five rows keep the W8A8 path."""
    import deepserve.quant.fp8 as fp8
    from deepserve.kernels.gemv import GEMV_MAX_M, gemv
    from deepserve.kernels.silu_and_mul import silu_and_mul as silu_kernel
    from deepserve.layers import fused
    from deepserve.layers.linear_method import DenseLinearMethod

    def decode_rows(x, w):  # `_decode_rows` without its CUDA condition
        rows = x.numel() // x.shape[-1]
        return x.dtype == torch.bfloat16 and 1 <= rows <= fp8.DECODE_GEMV_ROWS and w.dtype == FP8_DTYPE \
            and w.is_contiguous() and w.shape[1] % 16 == 0

    assert fp8.DECODE_GEMV_ROWS <= GEMV_MAX_M
    monkeypatch.setattr(fp8, "_decode_rows", decode_rows)
    monkeypatch.setattr(fp8, "scaled_mm_fits", lambda x, w: True)  # _scaled_mm would take every row count
    calls = []

    def scaled_mm(a, b, scale_a, scale_b, bias, out_dtype, use_fast_accum):
        calls.append(a.shape[0])
        return torch.zeros(a.shape[0], b.shape[1], dtype=out_dtype)

    monkeypatch.setattr(torch, "_scaled_mm", scaled_mm)
    layer, gate_up = _layer(), ReplicatedLinear(96, 128, bias=False)
    with torch.no_grad():
        gate_up.weight.normal_()
    for linear in (layer, gate_up):
        linear.process_weights_after_loading(name)
    x = torch.randn(2, 1, 96).bfloat16()
    want = gemv(x.view(2, 96), layer.weight, layer.bias, w_scale=layer.weight_scale)
    assert torch.equal(layer(x), want.view(2, 1, 64))
    h = gate_up.method.apply_gated(gate_up, x, layer)
    unfused = silu_kernel(gemv(x.view(2, 96), gate_up.weight, None, w_scale=gate_up.weight_scale))  # as on CUDA
    assert h.shape == (2, 1, 64) and torch.equal(h.view(2, 64), unfused)
    other = ReplicatedLinear(64, 64, bias=False)
    other.method = DenseLinearMethod()
    assert gate_up.method.apply_gated(gate_up, x, other) is None
    down = ReplicatedLinear(64, 64, bias=False)
    with torch.no_grad():
        down.weight.normal_()
    down.process_weights_after_loading(name)
    g = torch.randn(2, 128).bfloat16()
    assert torch.equal(down.method.apply_silu_and_mul(down, g, None),
                       gemv(fused.silu_and_mul(g), down.weight, None, w_scale=down.weight_scale))
    assert calls == []
    five = torch.randn(5, 96).bfloat16()
    assert not fp8.decode_gemv_applies(five, layer.weight)
    assert layer(five).shape == (5, 64) and calls == [5]  # W8A8: _scaled_mm (a stand-in here)
    assert gate_up.method.apply_gated(gate_up, five, layer) is None


def test_refuses_gpus_below_sm89(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ValueError, match=r"8\.9.*A100.*sm_80.*int8"):
        check_fp8_device(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_fp8_device(torch.device("cuda", 0))
    check_fp8_device(torch.device("cpu"))


def test_tiny_llama_teacher_forced_agreement(tmp_path: Path):
    """fp8's linear error is ~4x int8's (0.034 vs 0.009 relative, above), so KL ~16x the int8 figure
    (0.003 on this model): ~0.05; the bounds leave a factor 2. The random tiny model's logit gaps
    are small, so top-1 agreement is lower than on a trained model (SmolLM2-135M: 0.91, as int8)."""
    quant_eval = pytest.importorskip("deepserve.quant.eval")
    from deepserve.engine.args import EngineArgs
    from deepserve.loader.model_loader import load_model
    from deepserve.loader.tokenizer import load_tokenizer
    from tests.tiny_checkpoints import make_tiny_llama

    tiny = make_tiny_llama(tmp_path)
    ids = [load_tokenizer(str(tiny)).encode(quant_eval.read_eval_text(None))[:100]]
    ref = quant_eval.next_token_logprobs(
        load_model(EngineArgs(model=str(tiny), device="cpu").create_engine_config(), progress=False), ids)
    cand = load_model(EngineArgs(model=str(tiny), device="cpu", quantization="fp8").create_engine_config(),
                      progress=False)
    report = quant_eval.compare_distributions(ref, quant_eval.next_token_logprobs(cand, ids))
    print(f"tiny llama fp8: top-1 {report.top1_agreement:.3f}, mean KL {report.mean_kl:.4f}")
    assert report.top1_agreement >= 0.65 and report.mean_kl < 0.1


def test_quantize_command_writes_an_fp8_folder(tmp_path: Path):
    """`deepserve quantize --method fp8` writes e4m3 weights with per-row scales (the weights `--quantization fp8`
    computes at load), a quantization_config naming fp8, and a folder that loads as fp8 with the same layers."""
    import json

    from safetensors import safe_open

    from deepserve.cli import main
    from deepserve.engine.args import EngineArgs
    from deepserve.loader.model_loader import load_model
    from tests.tiny_checkpoints import make_tiny_llama

    tiny = make_tiny_llama(tmp_path / "tiny")
    out = tmp_path / "tiny-fp8"
    assert main(["quantize", "--model", str(tiny), "--out", str(out), "--method", "fp8", "--skip-gate"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "deepserve-int8", "scheme": "w8a8-fp8", "symmetric": True,
        "recipe": {"smoothing_alpha": None, "rounding": "rtn", "calibration": None, "calibration_sha256": None,
                   "calibration_tokens": 0, "input_rotation_block": None}}
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        q = f.get_tensor("model.layers.0.mlp.down_proj.weight")
        assert q.dtype == FP8_DTYPE and f.get_tensor("model.layers.0.mlp.down_proj.weight_scale").shape == (q.shape[0],)
        assert f.get_tensor("model.embed_tokens.weight").dtype == f.get_tensor("lm_head.weight").dtype == torch.float32
    loaded = load_model(EngineArgs(model=str(out), device="cpu").create_engine_config(), progress=False)
    fresh = load_model(EngineArgs(model=str(tiny), device="cpu", quantization="fp8").create_engine_config(),
                       progress=False)
    layers = {n: m for n, m in loaded.named_modules() if isinstance(m.__dict__.get("method"), Fp8Method)}
    want = dict(fresh.named_modules())
    assert len(layers) == 2 * 4  # 2 layers x (qkv, o, gate_up, down): the model merges q/k/v and gate/up
    for name, layer in layers.items():
        assert torch.equal(layer.weight.view(torch.uint8), want[name].weight.view(torch.uint8)), name
        # the scale is found again from the dequantised row max, 448 * s rounded, / 448: within one ulp of s
        torch.testing.assert_close(layer.weight_scale, want[name].weight_scale, rtol=2.0 ** -23, atol=0)
    for name in ("int8", "none"):  # the loader dequantises first, so any method can serve the folder
        other = load_model(EngineArgs(model=str(out), device="cpu", quantization=name).create_engine_config(),
                           progress=False)
        assert not any(isinstance(m.__dict__.get("method"), Fp8Method) for m in other.modules())
    from deepserve.quant.writer import quantize_checkpoint

    with pytest.raises(ValueError, match="asymmetric"):
        quantize_checkpoint(tiny, tmp_path / "bad", "fp8", asymmetric=True, progress=False)
    for name in ("fp8-exact-accum", "fp8-per-tensor", "none", "block-fp8"):  # serving choices, not checkpoints
        with pytest.raises(ValueError, match="quantize writes"):
            quantize_checkpoint(tiny, tmp_path / "bad", name, progress=False)
    for flags in (["--calibration", str(tiny / "config.json")], ["--rotation", "none"], ["--smoothing-alpha", "0.3"],
                  ["--no-smoothing"], ["--rounding", "rtn"]):
        assert main(["quantize", "--model", str(tiny), "--out", str(tmp_path / "refused"), "--method", "fp8",
                     "--skip-gate", *flags]) != 0, flags
        assert not (tmp_path / "refused").exists() and not (tmp_path / "refused.partial").exists()


def test_fp8_checkpoint_streams_dequantised():
    """The loader's stream yields an e4m3 weight as q * scale per row (float32) and consumes the scale; fp8
    quantises it back to the same bits."""
    from deepserve.quant.int8 import DequantizingStream

    w = torch.randn(8, 32)
    q, scale = quantize_weight_fp8_ref(w)
    stream = DequantizingStream.for_method([("a.weight_scale", scale), ("a.weight", q), ("b.bias", w[0])], "fp8")
    got = dict(stream)
    assert set(got) == {"a.weight", "b.bias"}
    assert torch.equal(got["a.weight"], dequantize_weight_fp8_ref(q, scale))
    again, _ = quantize_weight_fp8_ref(got["a.weight"])
    assert torch.equal(again.view(torch.uint8), q.view(torch.uint8))
    with pytest.raises(ValueError, match="incomplete"):
        list(DequantizingStream.for_method([("c.weight", q)], "fp8"))


def test_quantize_reports_a_gate_that_cannot_run(tmp_path: Path, monkeypatch):
    """An fp8 candidate cannot load on a GPU below sm_89: the gate's error is reported, nothing is written."""
    from deepserve.cli import main
    from deepserve.quant import eval as quant_eval
    from tests.tiny_checkpoints import make_tiny_llama

    def gate(*args, **kwargs):
        raise ValueError("the fp8 methods need a GPU of compute capability 8.9 or newer")

    monkeypatch.setattr(quant_eval, "gate", gate)
    tiny = make_tiny_llama(tmp_path / "tiny")
    assert main(["quantize", "--model", str(tiny), "--out", str(tmp_path / "o"), "--method", "fp8"]) != 0
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_unknown_checkpoint_scheme_is_refused():
    from deepserve.quant import quantization_from_hf_config

    assert quantization_from_hf_config({"quantization_config": {"quant_method": "deepserve-int8",
                                                                "scheme": "w8a8-fp8"}}) == "fp8"
    with pytest.raises(ValueError, match="w4a16"):
        quantization_from_hf_config({"quantization_config": {"quant_method": "deepserve-int8", "scheme": "w4a16"}})
