"""The bundled tiny-deepseek-v3 as a DeepSeek-V3 block-FP8 checkpoint (`tests/block_fp8_checkpoint.py`,
two shards, scales in the shard after their weights): loading in every serving mode, exactness of
the dequantisation, agreement with the original bf16 model, the MTP layer, loader errors.

Agreement bounds: the original tiny model was trained in bf16, so rounding its weights to e4m3
(~2.5% rms per weight) moves its predictions; on the reference's greedy continuations of 8 prompts
(585 positions) teacher-forced top-1 agreement measured 0.974 (none), 0.964 (block-fp8: fp8
activations too) and 0.978 (int8 from fp8), mean KL 0.004 / 0.008 / 0.006 nats. The asserted bounds
leave >= 2 points (a dozen positions) for float differences between machines. DeepSeek-V3 itself
was trained with its fp8 weights, so serving it in fp8 does not lose this much.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from deepserve import LLM, SamplingParams
from deepserve.engine.args import EngineArgs
from deepserve.loader.errors import LoadError
from deepserve.loader.model_loader import float_weights, load_model
from deepserve.loader.resolve import resolve_model_path
from deepserve.loader.safetensors_loader import WeightStream, find_checkpoint_files, load_into
from deepserve.quant.block_fp8 import BlockFp8LinearMethod
from deepserve.quant.block_fp8_experts import Int8RoutedExperts
from deepserve.quant.block_fp8_ref import FP8_DTYPE, block_fp8_dequant_ref, block_fp8_to_int8_ref
from deepserve.quant.eval import compare_distributions, next_token_logprobs
from tests.block_fp8_checkpoint import is_quantized, write_block_fp8_checkpoint

PROMPTS = ["def fibonacci(n):\n    ", "To be, or not to be", "The :mod:`os` module provides",
           "import sys\nimport os\n\n\ndef main(argv):\n    parser = ", "class Node:\n    def __init__(self",
           "Shall I compare thee", ".. note::\n\n   The", "for i in range(10):\n    "]
GREEDY16 = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
MIN_TOP1 = {"none": 0.95, "block-fp8": 0.94, "int8": 0.95}
MAX_MEAN_KL = 0.02  # nats


@pytest.fixture(scope="module")
def src() -> Path:
    return Path(resolve_model_path("tiny-deepseek-v3"))


@pytest.fixture(scope="module")
def fp8_dir(src, tmp_path_factory) -> Path:
    return write_block_fp8_checkpoint(src, tmp_path_factory.mktemp("tiny-fp8"), shards=2)


@pytest.fixture(scope="module")
def fp8_tensors(fp8_dir) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(fp8_dir.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


@pytest.fixture(scope="module")
def fake_quant_dir(src, fp8_tensors, tmp_path_factory) -> Path:
    """The original checkpoint with each fp8 weight replaced by its exact float32 dequantisation."""
    out = tmp_path_factory.mktemp("tiny-fake-quant")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (out / name).write_bytes((src / name).read_bytes())
    tensors = {n: block_fp8_dequant_ref(t, fp8_tensors[n + "_scale_inv"]) if t.dtype == FP8_DTYPE else t
               for n, t in fp8_tensors.items() if not n.endswith("_scale_inv")}
    save_file(tensors, str(out / "model.safetensors"))
    return out


def _load(model: str | Path, quantization: str | None = None):
    config = EngineArgs(model=str(model), quantization=quantization, device="cpu").create_engine_config()
    return load_model(config, progress=False)


@pytest.fixture(scope="module")
def reference_continuations(src):
    """The original model's prompts + 64 greedy tokens, and its teacher-forced distributions there."""
    llm = LLM(str(src), num_kv_blocks=128, device="cpu")
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))
    seqs = [llm.tokenizer.encode(p) + o.outputs[0].token_ids for p, o in zip(PROMPTS, outs)]
    return seqs, next_token_logprobs(_load(src), seqs)


def test_checkpoint_layout(fp8_dir, fp8_tensors):
    index = json.loads((fp8_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    kv_a = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"  # [80, 256]: one partial row block
    assert fp8_tensors[kv_a].dtype == FP8_DTYPE and fp8_tensors[kv_a + "_scale_inv"].shape == (1, 2)
    assert fp8_tensors["model.layers.0.self_attn.q_b_proj.weight_scale_inv"].shape == (2, 1)  # [192, 128]
    assert fp8_tensors["model.layers.4.mlp.experts.3.down_proj.weight"].dtype == FP8_DTYPE  # MTP layer too
    for kept in ("model.layers.4.eh_proj.weight", "model.layers.1.mlp.gate.weight", "lm_head.weight",
                 "model.layers.1.mlp.gate.e_score_correction_bias", "model.embed_tokens.weight"):
        assert fp8_tensors[kept].dtype != FP8_DTYPE and kept + "_scale_inv" not in fp8_tensors
    weights = [n for n in fp8_tensors if n.endswith(".weight") and is_quantized(n)]
    assert all(fp8_tensors[n].dtype == FP8_DTYPE and n + "_scale_inv" in fp8_tensors for n in weights)


def test_dequantised_load_is_exact_and_within_fp8_error(src, fp8_dir, fp8_tensors, fake_quant_dir):
    """Mode none (auto on CPU): every parameter equals the float32 dequantisation of the checkpoint
    (the same values loaded from a float checkpoint), and each dequantised tensor is within half an
    e4m3 step of the original bf16 weight. Prints the relative weight error for the record."""
    model, exact = _load(fp8_dir), _load(fake_quant_dir)
    got, want = dict(model.named_parameters()), dict(exact.named_parameters())
    assert got.keys() == want.keys()
    for name in got:
        assert torch.equal(got[name], want[name]), name
    original = load_file(str(src / "model.safetensors"))
    err_fp8 = err_int8 = total = 0.0
    for name, q in fp8_tensors.items():
        if q.dtype != FP8_DTYPE:
            continue
        scale = fp8_tensors[name + "_scale_inv"]
        w, w0 = block_fp8_dequant_ref(q, scale), original[name].float()
        step = block_fp8_dequant_ref(torch.ones_like(q), scale)  # each element's block scale
        fp8_bound = torch.maximum(w0.abs() * 2.0 ** -4, step * 2.0 ** -10) * (1 + 1e-6)
        assert ((w - w0).abs() <= fp8_bound).all(), name
        q8, s8 = block_fp8_to_int8_ref(q, scale)  # the int8 mode's weights, through the fp8 values
        w8 = q8.float() * s8[:, None]
        assert ((w8 - w0).abs() <= s8[:, None] / 2 * (1 + 1e-5) + fp8_bound).all(), name
        err_fp8, err_int8 = err_fp8 + float((w - w0).norm() ** 2), err_int8 + float((w8 - w0).norm() ** 2)
        total += float(w0.norm() ** 2)
    rel_fp8, rel_int8 = (err_fp8 / total) ** 0.5, (err_int8 / total) ** 0.5
    print(f"tiny-deepseek-v3 quantised weights vs bf16: fp8 rel err {rel_fp8:.4f}, fp8->int8 {rel_int8:.4f}")
    assert rel_fp8 < 0.035 and rel_int8 < 0.04  # e4m3: < 2^-4 per element, ~2.5% rms


def test_greedy_tokens_equal_fake_quantised_original(fp8_dir, fake_quant_dir):
    """16 greedy steps on 8 prompts: the fp8 checkpoint (dequantised: the default on CPU) and the
    float checkpoint with the same values give the same tokens."""
    ours = LLM(str(fp8_dir), num_kv_blocks=128, device="cpu").generate(PROMPTS, GREEDY16)
    theirs = LLM(str(fake_quant_dir), num_kv_blocks=128, device="cpu").generate(PROMPTS, GREEDY16)
    for a, b in zip(ours, theirs):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids


@pytest.mark.parametrize("mode", ["none", "block-fp8", "int8"])
def test_top1_agreement_with_original(fp8_dir, reference_continuations, mode):
    seqs, ref = reference_continuations
    report = compare_distributions(ref, next_token_logprobs(_load(fp8_dir, mode), seqs))
    print(f"{mode}: {report}")
    assert report.num_positions == sum(map(len, seqs))
    assert report.top1_agreement >= MIN_TOP1[mode] and report.mean_kl <= MAX_MEAN_KL


def test_block_fp8_mode_keeps_checkpoint_fp8(fp8_dir, fp8_tensors):
    model = _load(fp8_dir, "block-fp8")
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    for layer, hf in ((attn.q_a_proj, "model.layers.1.self_attn.q_a_proj"),
                      (attn.kv_a_proj_with_mqa, "model.layers.1.self_attn.kv_a_proj_with_mqa"),
                      (model.model.layers[0].mlp.down_proj, "model.layers.0.mlp.down_proj")):
        assert isinstance(layer.method, BlockFp8LinearMethod)
        assert torch.equal(layer.weight.view(torch.uint8), fp8_tensors[hf + ".weight"].view(torch.uint8))
        assert torch.equal(layer.weight_scale_inv, fp8_tensors[hf + ".weight_scale_inv"])
    gate_up = mlp.shared_experts.gate_up_proj  # merged: scales stacked gate | up
    prefix = "model.layers.1.mlp.shared_experts."
    assert torch.equal(gate_up.weight_scale_inv, torch.cat([fp8_tensors[prefix + p + "_proj.weight_scale_inv"]
                                                            for p in ("gate", "up")]))
    assert attn.kv_b_proj.weight.dtype == torch.float32  # absorbed into q/o: dequantised
    assert mlp.experts.w13.dtype == torch.float32  # experts: dequantised (no fp8 MoE kernel)


def test_int8_mode_converts_linears_and_experts(fp8_dir, fp8_tensors):
    model = _load(fp8_dir, "int8")
    q_a = model.model.layers[2].self_attn.q_a_proj
    assert q_a.weight.dtype == torch.int8
    experts = model.model.layers[2].mlp.experts
    assert isinstance(experts, Int8RoutedExperts)
    name = "model.layers.2.mlp.experts.5.down_proj.weight"
    w_fp8 = block_fp8_dequant_ref(fp8_tensors[name], fp8_tensors[name + "_scale_inv"])
    w_int8 = experts.w2_q[5].float() * experts.w2_scale[5][:, None]
    assert ((w_int8 - w_fp8).abs() <= experts.w2_scale[5][:, None] / 2 * (1 + 1e-5)).all()
    print(f"tiny expert down_proj: fp8 -> int8 rel err {float((w_int8 - w_fp8).norm() / w_fp8.norm()):.4f}")


def test_mtp_layer_loads_dequantised(fp8_dir, fake_quant_dir):
    from deepserve.models.deepseek_mtp import DeepseekMTP

    config = EngineArgs(model=str(fp8_dir), device="cpu").create_engine_config()
    mtp = DeepseekMTP(config.model_config)
    filled = load_into(mtp, float_weights(WeightStream(find_checkpoint_files(fp8_dir)), config))
    assert "layer.self_attn.q_a_proj.weight" in filled and "eh_proj.weight" in filled
    reference = DeepseekMTP(config.model_config)
    load_into(reference, WeightStream(find_checkpoint_files(fake_quant_dir)))
    for (name, p), (_, r) in zip(mtp.named_parameters(), reference.named_parameters()):
        assert torch.equal(p, r), name


# ---- errors --------------------------------------------------------------------------------------------


def _copy_without(fp8_dir: Path, dst: Path, edit) -> Path:
    """A copy of the checkpoint with `edit(tensors_of_one_shard)` applied to the shard holding
    layer 0's q_a_proj scale."""
    dst.mkdir()
    for path in fp8_dir.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    name = "model.layers.0.self_attn.q_a_proj.weight_scale_inv"
    shard = dst / index["weight_map"][name]
    tensors = load_file(str(shard))
    edit(tensors, name, index["weight_map"])
    save_file(tensors, str(shard))
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return shard


def test_missing_scale_names_file_and_tensor(fp8_dir, tmp_path):
    def drop(tensors, name, weight_map):
        del tensors[name], weight_map[name]

    _copy_without(fp8_dir, tmp_path / "ckpt", drop)
    with pytest.raises(LoadError) as err:
        _load(tmp_path / "ckpt")
    message = str(err.value)
    assert "model.layers.0.self_attn.q_a_proj.weight" in message and "_scale_inv" in message
    assert ".safetensors" in message


def test_misshaped_scale_names_file_and_tensor(fp8_dir, tmp_path):
    def reshape(tensors, name, weight_map):
        tensors[name] = torch.ones(3, 3)

    shard = _copy_without(fp8_dir, tmp_path / "ckpt", reshape)
    for mode in ("none", "block-fp8"):
        with pytest.raises(LoadError) as err:
            _load(tmp_path / "ckpt", mode)
        message = str(err.value)
        assert str(shard) in message and "q_a_proj.weight_scale_inv" in message and "[1, 2]" in message


class _FakeStream:
    def __init__(self, items, folder: Path):
        from deepserve.loader.safetensors_loader import CheckpointFiles

        self.items, self.current_file = items, None
        self.files = CheckpointFiles(folder, (folder / "a.safetensors", folder / "b.safetensors"))

    def __iter__(self):
        for i, (name, tensor) in enumerate(self.items):
            self.current_file = self.files.files[i % 2]
            yield name, tensor


@pytest.mark.parametrize("case,expected", [
    ("orphan_scale", "has no float8_e4m3fn weight"),
    ("bf16_weight_with_scale", "is torch.bfloat16, not float8_e4m3fn"),
    ("float64_scale", "needs float32"),
    ("vector", r"are \[N, K\] matrices"),
])
def test_stream_errors(tmp_path, case, expected):
    from deepserve.quant.block_fp8_loading import BlockFp8Stream

    w = torch.zeros(130, 200, dtype=FP8_DTYPE)
    items = {
        "orphan_scale": [("x.weight_scale_inv", torch.ones(2, 2))],
        "bf16_weight_with_scale": [("x.weight", torch.zeros(130, 200, dtype=torch.bfloat16)),
                                   ("x.weight_scale_inv", torch.ones(2, 2))],
        "float64_scale": [("x.weight", w), ("x.weight_scale_inv", torch.ones(2, 2, dtype=torch.float64))],
        "vector": [("x.weight", torch.zeros(5, dtype=FP8_DTYPE)), ("x.weight_scale_inv", torch.ones(1))],
    }[case]
    with pytest.raises(LoadError, match=expected) as err:
        list(BlockFp8Stream(_FakeStream(items, tmp_path), (128, 128)))
    assert "safetensors" in str(err.value)


def test_stream_pairs_across_files_in_any_order(tmp_path):
    from deepserve.quant.block_fp8_loading import BlockFp8Stream

    q = torch.randn(130, 200).to(FP8_DTYPE)
    scale = torch.rand(2, 2)
    items = [("b.weight_scale_inv", scale), ("norm.weight", torch.ones(3)), ("b.weight", q),
             ("a.weight", q), ("a.weight_scale_inv", scale)]
    out = dict(BlockFp8Stream(_FakeStream(items, tmp_path), (128, 128), keep=frozenset({"a.weight"})))
    assert set(out) == {"norm.weight", "b.weight", "a.weight", "a.weight_scale_inv"}
    assert torch.equal(out["b.weight"], block_fp8_dequant_ref(q, scale))
    assert out["a.weight"].dtype == FP8_DTYPE and torch.equal(out["a.weight_scale_inv"], scale)


# ---- GPU ------------------------------------------------------------------------------------------------


def _load_cuda(model, quantization=None):
    config = EngineArgs(model=str(model), quantization=quantization, device="cuda").create_engine_config()
    return load_model(config, progress=False)


@pytest.mark.gpu
def test_gpu_auto_serves_block_fp8_and_agrees(src, fp8_dir, reference_continuations):
    """On an FP8 GPU (sm89+) the default mode keeps fp8 weights and runs the Triton kernels; the
    model agrees with the original bf16 model on GPU as the CPU emulation does with it on CPU."""
    seqs, _ = reference_continuations
    model = _load_cuda(fp8_dir)
    q_a = model.model.layers[1].self_attn.q_a_proj
    assert isinstance(q_a.method, BlockFp8LinearMethod) and q_a.weight.dtype == FP8_DTYPE
    assert model.model.layers[1].mlp.experts.w13.dtype == torch.bfloat16
    report = compare_distributions(next_token_logprobs(_load_cuda(src), seqs), next_token_logprobs(model, seqs))
    print(report)
    assert report.top1_agreement >= MIN_TOP1["block-fp8"] and report.mean_kl <= MAX_MEAN_KL


@pytest.mark.gpu
def test_gpu_cuda_graphs_match_eager(fp8_dir):
    """Decode batches captured in CUDA graphs run the same kernels as eager ones: same tokens."""
    graphs = LLM(str(fp8_dir), num_kv_blocks=128, device="cuda").generate(PROMPTS[:4], GREEDY16)
    eager = LLM(str(fp8_dir), num_kv_blocks=128, device="cuda", enforce_eager=True).generate(PROMPTS[:4], GREEDY16)
    for a, b in zip(graphs, eager):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["none", "int8"])
def test_gpu_dequantising_modes(fp8_dir, fake_quant_dir, mode):
    """none: the Triton dequantisation gives the bf16 rounding of the exact values; int8 loads."""
    model = _load_cuda(fp8_dir, mode)
    if mode == "none":
        exact = dict(_load_cuda(fake_quant_dir).named_parameters())
        for name, p in model.named_parameters():
            assert torch.equal(p, exact[name]), name
    else:
        attn = model.model.layers[1].self_attn  # q_a_proj and kv_a_proj_with_mqa merged under int8, then quantised
        assert attn.qkv_a_proj.weight.dtype == torch.int8 and attn.q_a_proj.weight.numel() == 0
        assert model.model.layers[1].mlp.experts.w13.dtype == torch.int8  # the W8A16 fused MoE kernel


def test_speculative_mtp_serves_the_fp8_checkpoint(fp8_dir, fake_quant_dir):
    """--speculative mtp loads the checkpoint's MTP layer dequantised; greedy tokens equal those of
    the dequantised-equal (fake-quantised) checkpoint without speculation."""
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    prompts = [[5, 9, 200, 31], [7] * 12]
    spec = LLM(str(fp8_dir), device="cpu", speculative="mtp", num_speculative_tokens=2, num_kv_blocks=64)
    plain = LLM(str(fake_quant_dir), device="cpu", num_kv_blocks=64)
    assert [o.outputs[0].token_ids for o in spec.generate(prompts, params)] == \
           [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
    assert spec.engine.stats().spec_num_draft_tokens > 0
