"""Block FP8 (DeepSeek-V3 layout): references, FP8 -> INT8 conversion bounds, the linear method, the
serving-mode choice, the int8 experts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deepserve.layers.activation import SiluAndMul
from deepserve.layers.linear import MergedColumnParallelLinear, ReplicatedLinear
from deepserve.layers.moe import RoutedExperts, Routing, fused_experts_ref
from deepserve.loader.errors import LoadError
from deepserve.platforms import get_platform
from deepserve.quant import QUANTIZATION_METHODS, check_quantization, get_quant_method
from deepserve.quant.block_fp8 import BlockFp8LinearMethod, checkpoint_block_size, serving_mode
from deepserve.quant.block_fp8_experts import Int8RoutedExperts, quantize_routed_experts_int8
from deepserve.quant.block_fp8_ref import (FP8_DTYPE, block_fp8_dequant_ref, block_fp8_linear_ref,
                                           block_fp8_quant_ref, block_fp8_quantize_weight_ref,
                                           block_fp8_to_int8_ref, scale_shape)

FP8_HALF_STEP = 2.0 ** -4  # e4m3 keeps 3 fraction bits: |x - e4m3(x)| <= 2^-4 |x| for normal numbers
FP8_MIN_NORMAL = 2.0 ** -6


def _fp8_error_bound(w: torch.Tensor, scale: torch.Tensor, block=(128, 128)) -> torch.Tensor:
    """Per element: half an e4m3 step of w / scale, times the scale (subnormals: half of 2^-9)."""
    s = block_fp8_dequant_ref(torch.ones(w.shape, dtype=FP8_DTYPE), scale, block)  # each element's scale
    return torch.maximum(w.abs() * FP8_HALF_STEP, s * 2.0 ** -10) * (1 + 1e-6)


@pytest.mark.parametrize("shape", [(80, 256), (192, 128), (256, 64), (300, 200), (3, 130, 257)])
def test_weight_round_trip_within_half_an_fp8_step_partial_blocks(shape):
    w = torch.randn(shape) * torch.rand(shape[:-1] + (1,)) * 3
    q, scale = block_fp8_quantize_weight_ref(w)
    assert q.dtype == FP8_DTYPE and q.shape == w.shape
    assert scale.shape == scale_shape(w.shape) == (*shape[:-2], -(-shape[-2] // 128), -(-shape[-1] // 128))
    assert (q.float().abs().flatten(-2).amax(-1) == 448).all()  # every block's max lands on 448
    err = (block_fp8_dequant_ref(q, scale) - w).abs()
    assert (err <= _fp8_error_bound(w, scale)).all()


def test_dequant_is_exact_block_product():
    q = torch.randn(200, 300).clamp(-448, 448).to(FP8_DTYPE)
    scale = torch.rand(2, 3) + 0.5
    w = block_fp8_dequant_ref(q, scale)
    assert torch.equal(w[:128, :128], q[:128, :128].float() * scale[0, 0])
    assert torch.equal(w[128:, 256:], q[128:, 256:].float() * scale[1, 2])  # partial corner block
    assert block_fp8_dequant_ref(q, scale, out_dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="scale shape"):
        block_fp8_dequant_ref(q, torch.ones(2, 2))


def test_activation_groups_partial_and_zero():
    x = torch.randn(3, 200) * 10
    x[1] = 0
    q, scale = block_fp8_quant_ref(x)
    assert q.shape == (3, 200) and scale.shape == (3, 2) and torch.isfinite(scale).all()
    assert (q[1].float() == 0).all()
    deq = q.float() * scale.repeat_interleave(128, -1)[:, :200]
    s = scale.repeat_interleave(128, -1)[:, :200]
    assert ((deq - x).abs() <= torch.maximum(x.abs() * FP8_HALF_STEP, s * 2.0 ** -10) * (1 + 1e-6)).all()


def test_fp8_to_int8_error_bound_random_and_relative_error():
    """|int8 dequant - fp8 dequant| <= row scale / 2, hence |int8 dequant - original| <= row scale / 2
    + the fp8 rounding already present. Relative errors (Frobenius) are printed for the record."""
    torch.manual_seed(3)
    w = torch.randn(384, 640) * torch.rand(384, 1) * 0.05
    q8, s8 = block_fp8_quantize_weight_ref(w)
    w_fp8 = block_fp8_dequant_ref(q8, s8)
    qi, si = block_fp8_to_int8_ref(q8, s8)
    assert qi.dtype == torch.int8 and si.shape == (384,)
    w_int8 = qi.float() * si[:, None]
    assert ((w_int8 - w_fp8).abs() <= si[:, None] / 2 * (1 + 1e-5)).all()
    assert ((w_int8 - w).abs() <= si[:, None] / 2 * (1 + 1e-5) + _fp8_error_bound(w, s8)).all()
    rel_fp8 = float((w_fp8 - w).norm() / w.norm())
    rel_int8 = float((w_int8 - w).norm() / w.norm())
    print(f"random weights: fp8 rel err {rel_fp8:.4f}, fp8->int8 rel err {rel_int8:.4f}")
    assert rel_fp8 < 0.035 and rel_int8 < 0.04  # e4m3 ~2.2% rms; int8 adds ~0.8% at 127 levels/row


def test_fp8_to_int8_stacked_experts_per_expert_row():
    w = torch.randn(4, 256, 200)
    w[2] *= 100  # experts of very different ranges keep their own row scales
    qi, si = block_fp8_to_int8_ref(*block_fp8_quantize_weight_ref(w))
    assert qi.shape == (4, 256, 200) and si.shape == (4, 256)
    w_fp8 = block_fp8_dequant_ref(*block_fp8_quantize_weight_ref(w))
    assert ((qi.float() * si[..., None] - w_fp8).abs() <= si[..., None] / 2 * (1 + 1e-5)).all()


# ---- the linear method ----------------------------------------------------------------------------------


def test_method_quantises_float_weight_online_and_matches_reference():
    layer = ReplicatedLinear(200, 80, bias=True)
    with torch.no_grad():
        layer.weight.normal_(0, 0.05), layer.bias.normal_()
    w0 = layer.weight.detach().clone()
    layer.process_weights_after_loading("block-fp8")
    assert isinstance(layer.method, BlockFp8LinearMethod)
    assert layer.weight.dtype == FP8_DTYPE and layer.weight_scale_inv.shape == (1, 2)
    x = torch.randn(5, 200)
    with torch.no_grad():
        y, y_float = layer(x), F.linear(x, w0, layer.bias)
        torch.testing.assert_close(y, block_fp8_linear_ref(x, layer.weight, layer.weight_scale_inv, bias=layer.bias))
    rel = float((y - y_float).norm() / y_float.norm())
    assert rel < 0.05  # weights and activations each ~2% rms off in e4m3
    assert layer(torch.randn(2, 3, 200)).shape == (2, 3, 80)


def test_method_refuses_missing_scale():
    layer = ReplicatedLinear(128, 128, bias=False)
    layer.weight = torch.nn.Parameter(torch.zeros(128, 128, dtype=FP8_DTYPE), requires_grad=False)
    with pytest.raises(ValueError, match="weight_scale_inv"):
        BlockFp8LinearMethod().process_weights_after_loading(layer)


def test_registry_and_none():
    assert {"block-fp8", "none"} <= set(QUANTIZATION_METHODS)
    assert isinstance(get_quant_method("block-fp8"), BlockFp8LinearMethod)
    assert check_quantization("none") == "none"
    with pytest.raises(ValueError):
        get_quant_method("none")


# ---- checkpoint config and serving mode ------------------------------------------------------------------


V3_QC = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


def test_checkpoint_block_size():
    assert checkpoint_block_size({"quantization_config": V3_QC}) == (128, 128)
    assert checkpoint_block_size({}) is None
    assert checkpoint_block_size({"quantization_config": {"quant_method": "deepserve-int8"}}) is None
    for bad in ({"fmt": "e5m2"}, {"weight_block_size": [128]}, {"weight_block_size": [100, 128]},
                {"activation_scheme": "static"}):
        with pytest.raises(LoadError, match="config.json"):
            checkpoint_block_size({"quantization_config": {**V3_QC, **bad}})


def test_serving_mode_on_cpu():
    assert get_platform("cpu").supports_fp8() is False
    assert serving_mode(None, "cpu") == "none"  # auto: no FP8 here -> dequantise
    for name in ("block-fp8", "none", "int8", "int8-weight-only"):
        assert serving_mode(name, "cpu") == name  # block-fp8 on CPU: the reference emulation


# ---- int8 experts -----------------------------------------------------------------------------------------


def test_int8_experts_match_dequantised_reference():
    torch.manual_seed(4)
    experts = RoutedExperts(6, 64, 32, "silu")
    with torch.no_grad():
        experts.w13.normal_(0, 0.1), experts.w2.normal_(0, 0.1)
    x = torch.randn(9, 64)
    ids = torch.stack([torch.randperm(6)[:2] for _ in range(9)])
    routing = Routing(torch.rand(9, 2), ids)
    q = Int8RoutedExperts.from_float(experts)
    assert q.w13_q.dtype == torch.int8 and q.w13_scale.shape == (6, 64) and q.w2_scale.shape == (6, 64)
    w13 = q.w13_q.float() * q.w13_scale[..., None]
    w2 = q.w2_q.float() * q.w2_scale[..., None]
    torch.testing.assert_close(q(x, routing), fused_experts_ref(x, w13, w2, routing, SiluAndMul()))
    with torch.no_grad():
        full = fused_experts_ref(x, experts.w13, experts.w2, routing, SiluAndMul())
        assert float((q(x, routing) - full).norm() / full.norm()) < 0.02  # 127 levels per row


def test_quantize_routed_experts_replaces_modules():
    model = torch.nn.Sequential(torch.nn.Module())
    model[0].experts = RoutedExperts(2, 16, 8, "silu")
    with torch.no_grad():
        model[0].experts.w13.normal_(), model[0].experts.w2.normal_()
    assert quantize_routed_experts_int8(model) == 1
    assert isinstance(model[0].experts, Int8RoutedExperts)


def test_merged_layer_fp8_install_places_scales_by_shard():
    from deepserve.quant.block_fp8_loading import install_fp8_weight

    layer = MergedColumnParallelLinear(256, [128, 200])
    install_fp8_weight(layer, (128, 128))
    assert layer.weight.dtype == FP8_DTYPE and layer.weight_scale_inv.shape == (3, 2)
    gate, up = torch.randn(128, 256), torch.randn(200, 256)
    for shard, w in enumerate((gate, up)):
        q, s = block_fp8_quantize_weight_ref(w)
        layer.weight.weight_loader(layer.weight, q, shard)
        layer.weight_scale_inv.weight_loader(layer.weight_scale_inv, s, shard)
    expected = torch.cat([block_fp8_dequant_ref(*block_fp8_quantize_weight_ref(w)) for w in (gate, up)])
    assert torch.equal(block_fp8_dequant_ref(layer.weight, layer.weight_scale_inv), expected)
    with pytest.raises(ValueError, match="shape mismatch"):
        layer.weight_scale_inv.weight_loader(layer.weight_scale_inv, torch.ones(1, 2), 1)  # up needs 2 rows


def test_only_deepseek_models_keep_fp8_layers():
    from deepserve.quant.block_fp8_loading import keep_fp8_layers

    model = torch.nn.Module()
    model.q_proj = ReplicatedLinear(128, 128, bias=False)
    assert keep_fp8_layers(model, {"q_proj.weight"}, (128, 128)) == frozenset()
    assert model.q_proj.weight.dtype == torch.float32
