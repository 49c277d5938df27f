"""A pre-norm layer's RMSNorm fused with the per-token int8 (or e4m3) quantisation of the W8A8 linear that reads it
(layers/decoder.py `_pre_norm`, `LinearMethod.quantizes_input`, `PerTokenQuant`, fused.rms_norm_quant).

The fused path must give the unfused one's bits. Its CUDA functions run here on `device()`: the GPU when
there is one, else CPU tensors through the Triton interpreter (as tests/unit/test_linear_silu_and_mul.py).
On CPU the int8 method does not quantize its input (the eager norm stays), so the layer-level tests
monkeypatch that capability on: the norm then runs `fused.rms_norm_quant`'s eager branch and the
linear its CPU int8 GEMM on the carrier. The GPU tests at the end run the CUDA branch at qwen shapes.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from deepserve.config import ModelConfig
from deepserve.kernels.gemv import GEMV_MAX_M
from deepserve.layers import fused
from deepserve.layers.linear import LinearBase, MergedColumnParallelLinear, QKVParallelLinear
from deepserve.layers.linear_method import (CpuPackedLinearMethod, DenseLinearMethod, LinearMethod, PerTokenQuant,
                                            process_weights_after_loading)
from deepserve.layers.moe import DeepseekMoE
from deepserve.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from deepserve.models.qwen2 import Qwen2ForCausalLM
from deepserve.quant import get_quant_method
from deepserve.quant.int8 import Int8W8A8Method, quantize_per_channel_ref
from tests.kernels.interpret import device, load_kernel_module
from tests.paged_harness import PagedRunner

RMS = load_kernel_module("rms_norm")
QUANT = load_kernel_module("int8_quant")
OTHERS = ["int8-weight-only", "int8-weight-only-asym", "int8-hadamard", "fp8", "fp8-per-tensor", "fp8-exact-accum",
          "block-fp8"]
FP8_METHODS = ("fp8", "fp8-per-tensor", "fp8-exact-accum")  # quantize their input too (e4m3), where _scaled_mm runs


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


# ---- which methods take pre-quantised input ----------------------------------------------------------


def test_only_w8a8_methods_quantize_their_input_and_only_on_cuda_f16_bf16_rows_held_whole():
    layer = SimpleNamespace()
    cuda = {dt: SimpleNamespace(is_cuda=True, dtype=dt, shape=(2, 8192))
            for dt in (torch.bfloat16, torch.float16, torch.float32)}
    methods = {name: get_quant_method(name) for name in OTHERS}
    methods.update(dense=DenseLinearMethod(), packed=CpuPackedLinearMethod())
    for name, method in methods.items():
        if name in FP8_METHODS:
            continue  # test_fp8_quantizes_its_input_where_scaled_mm_runs
        assert type(method).quantizes_input is LinearMethod.quantizes_input, name  # the default
        assert not any(method.quantizes_input(layer, x) for x in cuda.values()), name
    int8 = get_quant_method("int8")
    assert int8.quantizes_input(layer, cuda[torch.bfloat16]) and int8.quantizes_input(layer, cuda[torch.float16])
    assert not int8.quantizes_input(layer, cuda[torch.float32])
    assert not int8.quantizes_input(layer, torch.randn(2, 8).bfloat16())  # CPU: the eager path
    # wider than the fused norm kernel holds whole: its wide variant is not rms_norm's bits, so no fusion
    assert not int8.quantizes_input(layer, SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, shape=(2, 8193)))


@pytest.mark.parametrize("name", FP8_METHODS)
def test_fp8_quantizes_its_input_where_scaled_mm_runs(name):
    """CUDA f16/bf16 rows of the e4m3 weight's K (a multiple of 16, N too), held whole by the fused norm kernel, more
    than the decode GEMV takes (quant/fp8.py)."""
    fp8 = get_quant_method(name)
    assert fp8.quantized_input_dtype == torch.float8_e4m3fn
    assert get_quant_method("int8").quantized_input_dtype == torch.int8

    def layer(n, k, dtype=torch.float8_e4m3fn):
        return SimpleNamespace(weight=torch.empty(n, k, dtype=dtype))

    def rows(k, dtype=torch.bfloat16, cuda=True, m=16):
        return SimpleNamespace(is_cuda=cuda, dtype=dtype, shape=(m, k))

    assert fp8.quantizes_input(layer(64, 4096), rows(4096))
    assert fp8.quantizes_input(layer(64, 4096), rows(4096, torch.float16))
    assert not fp8.quantizes_input(layer(64, 4096), rows(4096, torch.float32))
    assert not fp8.quantizes_input(layer(64, 4096), rows(4096, cuda=False))
    assert not fp8.quantizes_input(layer(64, 4104), rows(4104))  # K not a multiple of 16: the emulation
    assert not fp8.quantizes_input(layer(72 + 4, 4096), rows(4096))  # N neither
    assert not fp8.quantizes_input(layer(64, 8208), rows(8208))  # wider than the whole-row kernel
    assert not fp8.quantizes_input(layer(64, 4096, torch.bfloat16), rows(4096))  # not processed into e4m3
    assert not fp8.quantizes_input(layer(64, 4096), rows(4096, m=4))  # decode rows: the GEMV takes them unquantised
    assert fp8.quantizes_input(layer(64, 4096), rows(4096, m=5))


# ---- the CUDA functions: norm + quant, then the GEMM, against norm, then w8a8_linear ---------------------


@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["triton", "int_mm"])
def test_int8_cuda_gemm_of_fused_norm_is_the_unfused_linear(m, residual, dtype, backend):
    from deepserve.quant.int8_cuda import w8a8_gemm, w8a8_linear

    dev, hidden = device(), 96
    x = (2 * torch.randn(m, hidden, device=dev)).to(dtype)
    res = torch.randn(m, hidden, device=dev).to(dtype) if residual else None
    norm_w = (1 + 0.1 * torch.randn(hidden, device=dev)).to(dtype)
    w_q, w_s, _ = quantize_per_channel_ref(torch.randn(64, hidden, device=dev))
    bias = torch.randn(64, device=dev).to(dtype)
    normed, new_res = RMS.rms_norm(x, res, norm_w, 1e-6)
    want = w8a8_linear(normed, w_q.contiguous(), w_s, bias, backend=backend)
    q, scale, got_res = QUANT.rms_norm_int8_quant(x, res, norm_w, 1e-6)
    got = w8a8_gemm(q, scale, w_q.contiguous(), w_s, bias, dtype, backend)
    assert got.dtype == dtype and torch.equal(got, want)
    assert (got_res is None) if res is None else torch.equal(got_res, new_res)


def test_fused_kernel_runs_at_rms_norms_warps(monkeypatch):
    """1025-2048 columns: rms_norm runs 8 warps, the plain quantisation 4; the fused kernel takes 8, so
    the row's sum of squares is rms_norm's on the GPU (kernels/int8_quant.py)."""
    from tests.kernels.launches import record_launches

    recorders = record_launches(monkeypatch, QUANT, "_int8_quant_kernel")
    x = torch.randn(2, 1536, device=device())
    QUANT.rms_norm_int8_quant(x, None, torch.ones(1536, device=device()), 1e-6)
    QUANT.int8_quant(x)
    assert [kw["num_warps"] for _, kw in recorders["_int8_quant_kernel"].launches] == [RMS.row_num_warps(2048), 4]


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_dispatch_kernel_branch(monkeypatch, residual, dtype):
    """fused.rms_norm_quant's kernel branch (forced on CPU tensors: interpreter) gives the carrier of
    fused.rms_norm's kernel output (leading dims kept), and the int8 method maps it to the same output."""
    monkeypatch.setattr(fused, "_use_triton", lambda x: True)
    x = torch.randn(2, 3, 64).to(dtype)  # [batch, tokens, H]
    res = torch.randn(2, 3, 64).to(dtype) if residual else None
    norm_w = (1 + 0.1 * torch.randn(64)).to(dtype)
    normed = fused.rms_norm(x, res, norm_w, 1e-6)
    normed, new_res = normed if residual else (normed, None)
    carrier, got_res = fused.rms_norm_quant(x, res, norm_w, 1e-6)
    assert carrier.q.shape == (2, 3, 64) and carrier.scale.shape == (2, 3) and carrier.dtype == dtype
    assert (got_res is None) if res is None else torch.equal(got_res, new_res)
    linear = _column(MergedColumnParallelLinear(64, [32, 48], bias=True), dtype)
    assert torch.equal(linear(carrier), linear(normed))


def test_fused_norm_refuses_other_quantised_dtypes():
    with pytest.raises(ValueError, match="int8 or float8_e4m3fn"):
        fused.rms_norm_quant(torch.randn(2, 64), None, torch.ones(64), 1e-6, torch.float16)


# ---- the linear layers take the carrier ------------------------------------------------------------------


def _column(layer: nn.Module, dtype=torch.float32) -> nn.Module:
    for p in layer.parameters():
        p.normal_(std=p.shape[-1] ** -0.5)
    layer.to(dtype).process_weights_after_loading("int8")
    return layer


@pytest.mark.parametrize("tp_rank", [0, 1])
def test_column_layers_apply_the_carrier_like_the_tensor(tp_rank):
    """QKV / merged column layers (bias, tensor-parallel shards): forward(carrier) == forward(x)."""
    layers = [QKVParallelLinear(64, 16, 4, 2, bias=True, tp_size=2, tp_rank=tp_rank),
              MergedColumnParallelLinear(64, [48, 48], bias=True, tp_size=2, tp_rank=tp_rank)]
    x = torch.randn(5, 64)
    for layer in map(_column, layers):
        carrier, _ = fused.rms_norm_quant(x, None, torch.ones(64), 1e-6)
        assert torch.equal(layer(carrier), layer(fused.rms_norm(x, None, torch.ones(64), 1e-6)))


def test_hooks_turn_the_carrier_off(monkeypatch):
    monkeypatch.setattr(Int8W8A8Method, "quantizes_input", lambda self, layer, x: True)
    layer = _column(MergedColumnParallelLinear(64, [48, 48]))
    x = torch.randn(3, 64)
    assert layer.takes_quantized_input(x)
    for register in (layer.register_forward_pre_hook, layer.register_forward_hook):
        handle = register(lambda *args: None)
        assert not layer.takes_quantized_input(x)
        handle.remove()
    assert layer.takes_quantized_input(x)


# ---- the decoder layers: fused norm once per norm, the carrier to the consumer, same output --------------


def _llama_config(arch: str = "LlamaForCausalLM", layers: int = 2) -> ModelConfig:
    return ModelConfig(architecture=arch, vocab_size=256, hidden_size=64, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                       max_position_embeddings=256)


def _tiny_model(cls, quantization: str | None, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(3)
    model = cls(_llama_config("Qwen2ForCausalLM" if cls is Qwen2ForCausalLM else "LlamaForCausalLM")).eval()
    for p in model.parameters():
        p.normal_(std=0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    model.to(dtype)
    process_weights_after_loading(model, quantization)
    return model


def _logits(model, dtype=torch.float32) -> list[torch.Tensor]:
    """Two prompts prefilled together (first layer: residual None), then one decode step for both."""
    runner = PagedRunner(model, num_blocks=16, dtype=dtype)
    a, b = runner.new_seq(), runner.new_seq()
    first = runner.step({a: list(range(3, 14)), b: list(range(40, 45))})
    second = runner.step({a: [7], b: [9]})
    return [first[a], first[b], second[a], second[b]]


def _prefill(model) -> torch.Tensor:
    runner = PagedRunner(model, num_blocks=16)
    return runner.step({runner.new_seq(): list(range(5, 17))})[0]


class _Spy:
    """Records fused.rms_norm_quant's calls (and the dtypes they quantise to) and what each linear of `method`
    (the int8 W8A8 method by default) receives in apply."""

    def __init__(self, monkeypatch, method: type = Int8W8A8Method):
        self.norm_calls, self.inputs, self.qdtypes = 0, [], []  # inputs: (layer, type of x)
        real_norm, real_apply = fused.rms_norm_quant, method.apply

        def norm(*args):
            self.norm_calls += 1
            carrier, residual = real_norm(*args)
            self.qdtypes.append(carrier.q.dtype)
            return carrier, residual

        def apply(method, layer, x, bias):
            self.inputs.append((layer, type(x)))
            return real_apply(method, layer, x, bias)

        monkeypatch.setattr(fused, "rms_norm_quant", norm)
        monkeypatch.setattr(method, "apply", apply)

    def kinds(self, layer: nn.Module) -> list[type]:
        return [kind for seen, kind in self.inputs if seen is layer]


@pytest.mark.parametrize("cls", [LlamaForCausalLM, Qwen2ForCausalLM])  # Qwen2: q/k/v bias
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoder_layer_feeds_the_carrier(monkeypatch, cls, dtype):
    model = _tiny_model(cls, "int8", dtype)
    want = _logits(model, dtype)  # on CPU the int8 method does not quantize its input: today's path
    spy = _Spy(monkeypatch)
    monkeypatch.setattr(Int8W8A8Method, "quantizes_input", lambda self, layer, x: True)
    got = _logits(model, dtype)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    layers = model.model.layers
    assert spy.norm_calls == 2 * 2 * len(layers)  # two steps, two norms per layer (not the final norm)
    for layer in layers:
        assert isinstance(layer, LlamaDecoderLayer)
        assert spy.kinds(layer.self_attn.qkv_proj) == [PerTokenQuant] * 2
        assert spy.kinds(layer.mlp.gate_up_proj) == [PerTokenQuant] * 2
        assert spy.kinds(layer.self_attn.o_proj) == [torch.Tensor] * 2
        assert spy.kinds(layer.mlp.down_proj) == [torch.Tensor] * 2  # SiLU-and-mul's quantisation, not the norm's


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoder_layer_feeds_the_fp8_carrier(monkeypatch, dtype):
    """fp8 W8A8: the norms quantise to e4m3 for qkv and gate_up (the CPU emulation of both paths), same logits."""
    from deepserve.quant.fp8 import Fp8Method

    model = _tiny_model(Qwen2ForCausalLM, "fp8", dtype)
    want = _logits(model, dtype)  # on CPU the fp8 method does not quantize its input: the unfused path
    spy = _Spy(monkeypatch, Fp8Method)
    monkeypatch.setattr(Fp8Method, "quantizes_input", lambda self, layer, x: True)
    got = _logits(model, dtype)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    layers = model.model.layers
    assert spy.norm_calls == 2 * 2 * len(layers) and set(spy.qdtypes) == {torch.float8_e4m3fn}
    for layer in layers:
        assert spy.kinds(layer.self_attn.qkv_proj) == [PerTokenQuant] * 2
        assert spy.kinds(layer.mlp.gate_up_proj) == [PerTokenQuant] * 2
        assert spy.kinds(layer.self_attn.o_proj) == [torch.Tensor] * 2


@pytest.mark.parametrize("name", [None, *OTHERS])
def test_other_methods_keep_the_unfused_norm(monkeypatch, name):
    """Only the int8 method is forced to quantize its input here: every other method (fp8 included, which
    declines on CPU) keeps the unfused norm."""
    model = _tiny_model(LlamaForCausalLM, name)
    want = _logits(model)
    spy = _Spy(monkeypatch)
    monkeypatch.setattr(Int8W8A8Method, "quantizes_input", lambda self, layer, x: True)
    assert all(torch.equal(g, w) for g, w in zip(_logits(model), want))
    assert spy.norm_calls == 0


def test_hooks_see_real_tensors(monkeypatch):
    """A pre-hook on qkv_proj (calibration, quant/smooth.py) sees the normalised hidden state, as
    unfused; the layer's other norm still fuses; a hook on a norm keeps that norm unfused; the output
    does not change."""
    model = _tiny_model(LlamaForCausalLM, "int8")
    layer = model.model.layers[1]
    seen = []
    layer.self_attn.qkv_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    want = _logits(model)  # unfused (the CPU default): what the hook sees there
    spy = _Spy(monkeypatch)
    monkeypatch.setattr(Int8W8A8Method, "quantizes_input", lambda self, layer, x: True)
    assert all(torch.equal(g, w) for g, w in zip(_logits(model), want))
    assert len(seen) == 4 and all(type(t) is torch.Tensor for t in seen)
    assert torch.equal(seen[2], seen[0]) and torch.equal(seen[3], seen[1])
    assert spy.kinds(layer.self_attn.qkv_proj) == [torch.Tensor] * 2
    assert spy.kinds(layer.mlp.gate_up_proj) == [PerTokenQuant] * 2
    assert spy.norm_calls == 2 * (2 * 2 - 1)
    layer.post_attention_layernorm.register_forward_pre_hook(lambda *args: None)
    spy.norm_calls = 0
    assert all(torch.equal(g, w) for g, w in zip(_logits(model), want))
    assert spy.norm_calls == 2 * 2  # layer 0's two norms only


def test_deepseek_input_norm_feeds_the_merged_projection(monkeypatch):
    """MLA / MoE decoder layers (the bundled tiny V3) under int8: the input norm feeds MLA's merged q_a | kv_a
    projection (`attention_input_linear`), pre-quantised, one fused call per layer and step; the dense first
    layer's post-attention norm feeds its gate_up the same way; the MoE layers' post-attention norm names no
    consumer (router and experts read it) and stays unfused; same logits."""
    from deepserve.engine.args import EngineArgs
    from deepserve.loader.model_loader import load_model

    config = EngineArgs(model="tiny-deepseek-v3", quantization="int8", device="cpu").create_engine_config()
    model = load_model(config, progress=False)
    assert any(isinstance(m.method, Int8W8A8Method) for m in model.modules() if isinstance(m, LinearBase))
    want = _prefill(model)
    spy = _Spy(monkeypatch)
    monkeypatch.setattr(Int8W8A8Method, "quantizes_input", lambda self, layer, x: True)
    assert torch.equal(_prefill(model), want)
    layers = model.model.layers
    dense = [layer for layer in layers if not isinstance(layer.mlp, DeepseekMoE)]
    assert len(dense) == 1 and layers[0] is dense[0]
    assert spy.norm_calls == len(layers) + 1  # one step: every input norm, and the dense layer's second norm
    for layer in layers:
        assert spy.kinds(layer.self_attn.qkv_a_proj) == [PerTokenQuant]
        assert spy.kinds(layer.self_attn.o_proj) == [torch.Tensor]
    assert spy.kinds(dense[0].mlp.gate_up_proj) == [PerTokenQuant]


# ---- GPU: a Llama-shaped layer with int8 on CUDA ---------------------------------------------------------

# hidden, heads, kv heads, I; "v2-lite-dense": the widths of V2-Lite's dense layer 0 (its norm feeds gate_up)
GPU_SHAPES = {"qwen-7b": (3584, 28, 4, 18944), "qwen-1.5b": (1536, 12, 2, 8960), "v2-lite-dense": (2048, 16, 16, 10944)}


class _ProbeAttention(nn.Module):
    """Stands in for the paged attention backend (no KV cache or forward context here): a mix of q, k
    and v in plain torch ops, so the layer's norms and linears are what is under test."""

    def forward(self, q, k, v, positions):
        kv = (k.float().mean(1, keepdim=True) + v.float().mean(1, keepdim=True)).to(q.dtype)  # [T, 1, D]
        return q + kv


def _gpu_layer(shape: str, quantization: str = "int8") -> LlamaDecoderLayer:
    if quantization == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9+ (Ada, Hopper)")
    hidden, heads, kv_heads, inter = GPU_SHAPES[shape]
    config = ModelConfig(architecture="Qwen2ForCausalLM", vocab_size=256, hidden_size=hidden, num_hidden_layers=1,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=inter,
                         max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(config)
    layer = model.model.layers[0]
    for p in layer.parameters():
        p.normal_(std=p.shape[-1] ** -0.5) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    layer.to(torch.bfloat16)
    process_weights_after_loading(layer, quantization)
    layer.self_attn.attn = _ProbeAttention()
    return layer


def _unfused(monkeypatch):
    from deepserve.quant.fp8 import Fp8Method

    for method in (Int8W8A8Method, Fp8Method):
        monkeypatch.setattr(method, "quantizes_input", lambda self, layer, x: False)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
@pytest.mark.parametrize("tokens", [1, 7, 256, 2048])
@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("quantization", ["int8", "fp8"])
def test_gpu_layer_fused_is_unfused_bit_for_bit(monkeypatch, shape, tokens, first, quantization):
    layer = _gpu_layer(shape, quantization)
    hidden = layer.input_layernorm.weight.shape[0]
    x = torch.randn(tokens, hidden, device="cuda").bfloat16()
    residual = None if first else torch.randn_like(x)
    positions = torch.arange(tokens, device="cuda")
    calls = []
    real = fused.rms_norm_quant
    monkeypatch.setattr(fused, "rms_norm_quant", lambda *a: calls.append(a) or real(*a))
    out, res = layer(positions, x, residual)
    fused_norms = 0 if quantization == "fp8" and tokens <= GEMV_MAX_M else 2  # fp8 decode rows: the GEMV, unquantised
    assert len(calls) == fused_norms
    with monkeypatch.context() as m:
        _unfused(m)
        want_out, want_res = layer(positions, x, residual)
    assert len(calls) == fused_norms
    assert torch.equal(out, want_out) and torch.equal(res, want_res)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
@pytest.mark.parametrize("quantization", ["int8", "fp8"])
def test_gpu_layer_fused_in_a_cuda_graph(monkeypatch, shape, quantization):
    layer = _gpu_layer(shape, quantization)
    hidden = layer.input_layernorm.weight.shape[0]
    x, residual = (torch.randn(256, hidden, device="cuda").bfloat16() for _ in range(2))
    positions = torch.arange(256, device="cuda")
    layer(positions, x, residual)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, res = layer(positions, x, residual)
    x.copy_(torch.randn_like(x))
    residual.copy_(torch.randn_like(residual))
    graph.replay()
    torch.cuda.synchronize()
    _unfused(monkeypatch)
    want_out, want_res = layer(positions, x, residual)
    assert torch.equal(out, want_out) and torch.equal(res, want_res)  # Triton launches only: the same bits
