"""DeepSeek-V2/V3 (MLA + MoE) against HF transformers, tiny random checkpoints, float32 on CPU.

Each variant builds an HF model with random weights (norm weights and V3's score-correction bias
randomised too, so a mis-mapped tensor shows), saves it as safetensors, and loads it into ours.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

from deepserve.config import ModelConfig
from deepserve.engine.kv_cache import allocate_kv_caches, bind_kv_cache
from deepserve.forward_context import build_forward_context, forward_context
from deepserve.layers.linear_method import process_weights_after_loading
from deepserve.models import deepseek_v2 as ours
from tests.paged_harness import PagedRunner

RTOL = 1e-4  # max |ours - hf| / max |hf|
PROMPT_LEN, NEW_TOKENS = 40, 32

COMMON = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
    first_k_dense_replace=1, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    max_position_embeddings=256, initializer_range=0.08, eos_token_id=None, bos_token_id=None,
    pad_token_id=None, attn_implementation="eager",
)
VARIANTS = {
    # V2-Lite-like: no q LoRA, greedy softmax routing, plain rope.
    "v2": (DeepseekV2Config, DeepseekV2ForCausalLM, dict(
        q_lora_rank=None, n_shared_experts=2, topk_method="greedy", routed_scaling_factor=1.0)),
    # V2-like: q LoRA, group-limited greedy, YaRN with a cos/sin attention factor (mscale != mscale_all_dim).
    "v2_qlora_group": (DeepseekV2Config, DeepseekV2ForCausalLM, dict(
        q_lora_rank=32, n_shared_experts=1, topk_method="group_limited_greedy", n_group=4, topk_group=2,
        routed_scaling_factor=1.5,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, mscale=1.0, mscale_all_dim=0.8,
                             original_max_position_embeddings=64, beta_fast=32, beta_slow=1))),
    # V3-like: sigmoid + noaux_tc with a random bias, normalised top-k, YaRN with mscale == mscale_all_dim.
    "v3": (DeepseekV3Config, DeepseekV3ForCausalLM, dict(
        q_lora_rank=32, n_shared_experts=1, n_group=4, topk_group=2, norm_topk_prob=True,
        routed_scaling_factor=2.5,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, mscale=0.707,
                             mscale_all_dim=0.707, original_max_position_embeddings=64,
                             beta_fast=32, beta_slow=1))),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny shapes: intra-op threads only add contention (10x slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomise(hf: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    """(variant name, HF model, our checkpoint folder) per variant."""
    config_cls, model_cls, extra = VARIANTS[request.param]
    torch.manual_seed(1234)
    hf = model_cls(config_cls(**COMMON, **extra)).eval()
    _randomise(hf)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder, safe_serialization=True)
    return request.param, hf, folder


def build_ours(folder, attention_mode: str = "auto") -> torch.nn.Module:
    config = ModelConfig.from_folder(folder)
    cls = getattr(ours, config.architecture)
    model = cls(config, attention_mode=attention_mode)
    filled = model.load_weights(load_file(folder / "model.safetensors").items())
    assert filled == {name for name, _ in model.named_parameters()}, "some parameters were not loaded"
    return model.eval()


def prompt_ids() -> list[int]:
    return torch.randint(0, COMMON["vocab_size"], (PROMPT_LEN,), generator=torch.Generator().manual_seed(7)).tolist()


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).abs().max() / ref.abs().max())


@torch.no_grad()
def all_prefill_logits(model, ids: list[int]) -> torch.Tensor:
    """[T, vocab] logits of every prompt position, one-shot prefill through the paged cache."""
    bind_kv_cache(model, allocate_kv_caches(model, 8, 16, torch.float32, "cpu"))
    ctx = build_forward_context([len(ids)], [len(ids)], [[3, 1, 5]], 16)  # scattered blocks
    with forward_context(ctx):
        hidden = model(torch.tensor(ids), ctx.positions)
    return model.compute_logits(hidden)


@pytest.mark.parametrize("mode", ["naive", "absorb"])
def test_prefill_logits_match_hf(pair, mode):
    _, hf, folder = pair
    ids = prompt_ids()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()  # [T, vocab]
    got = all_prefill_logits(build_ours(folder, mode), ids)
    assert rel_err(got, ref) < RTOL


def test_greedy_matches_hf_generate(pair):
    _, hf, folder = pair
    ids = prompt_ids()
    with torch.no_grad():
        prompt = torch.tensor([ids])  # contains token 0; an explicit mask keeps it from reading as padding
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = out[0, PROMPT_LEN:].tolist()
    tokens, _ = PagedRunner(build_ours(folder, "auto")).greedy(ids, NEW_TOKENS)
    assert len(expected) == NEW_TOKENS
    assert tokens == expected


@pytest.mark.parametrize("merge", [True, False])
def test_merged_input_projection_matches_hf(pair, merge):
    """process_weights_after_loading merges q_proj / q_a_proj and kv_a_proj_with_mqa into one GEMM
    (the originals emptied); logits still match HF, and greedy decoding matches the unprocessed model."""
    _, hf, folder = pair
    model = build_ours(folder, "auto")
    for layer in model.model.layers:
        layer.self_attn.merge_input_projections = merge
    process_weights_after_loading(model)
    attn = model.model.layers[1].self_attn
    first = attn.q_proj if attn.q_lora_rank is None else attn.q_a_proj
    assert (attn.qkv_a_proj is not None) == merge
    if merge:  # held once: the originals are emptied (unmerged CPU layers drop theirs for packed copies)
        assert first.weight.numel() == 0 and attn.kv_a_proj_with_mqa.weight.numel() == 0
        assert attn.qkv_a_proj.in_features == first.in_features
    ids = prompt_ids()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    assert rel_err(all_prefill_logits(model, ids), ref) < RTOL
    tokens, _ = PagedRunner(model).greedy(ids, 8)
    assert tokens == PagedRunner(build_ours(folder, "auto")).greedy(ids, 8)[0]


def test_int8_merges_the_input_projection_into_the_same_rows(pair):
    """Under int8 the input projections merge too (MERGES_UNDER_QUANTIZATION): the merged layer's int8 rows and
    scales are the two layers' own (per output channel), the decoder names it as its attention input linear, and
    on CPU (inputs quantised by the layer itself, exact integer GEMMs) the logits equal the unmerged int8
    model's bit for bit."""
    _, _, folder = pair
    merged, apart = build_ours(folder, "auto"), build_ours(folder, "auto")
    for layer in apart.model.layers:
        layer.self_attn.merge_input_projections = False
    process_weights_after_loading(merged, "int8")
    process_weights_after_loading(apart, "int8")
    for got_layer, want_layer in zip(merged.model.layers, apart.model.layers):
        attn, ref = got_layer.self_attn, want_layer.self_attn
        assert got_layer.attention_input_linear() is attn.qkv_a_proj is not None
        assert want_layer.attention_input_linear() is None and ref.qkv_a_proj is None
        first = ref.q_proj if ref.q_lora_rank is None else ref.q_a_proj
        assert attn.qkv_a_proj.weight.dtype == torch.int8
        assert torch.equal(attn.qkv_a_proj.weight, torch.cat([first.weight, ref.kv_a_proj_with_mqa.weight]))
        assert torch.equal(attn.qkv_a_proj.weight_scale,
                           torch.cat([first.weight_scale, ref.kv_a_proj_with_mqa.weight_scale]))
    ids = prompt_ids()
    assert torch.equal(all_prefill_logits(merged, ids), all_prefill_logits(apart, ids))


def test_int8_weight_only_keeps_the_input_projections_apart(pair):
    """Outside MERGES_UNDER_QUANTIZATION (here W8A16) the two input projections keep their own GEMMs."""
    _, _, folder = pair
    model = build_ours(folder, "auto")
    process_weights_after_loading(model, "int8-weight-only")
    for layer in model.model.layers:
        attn = layer.self_attn
        first = attn.q_proj if attn.q_lora_rank is None else attn.q_a_proj
        assert attn.qkv_a_proj is None and layer.attention_input_linear() is None
        assert first.weight.dtype == attn.kv_a_proj_with_mqa.weight.dtype == torch.int8


def test_absorb_and_naive_agree(pair):
    _, _, folder = pair
    ids = prompt_ids()
    naive_tokens, naive_logits = PagedRunner(build_ours(folder, "naive")).greedy(ids, NEW_TOKENS)
    absorb_tokens, absorb_logits = PagedRunner(build_ours(folder, "absorb")).greedy(ids, NEW_TOKENS)
    assert absorb_tokens == naive_tokens
    for got, ref in zip(absorb_logits, naive_logits):
        assert rel_err(got, ref) < RTOL


@pytest.mark.parametrize("mode", ["naive", "absorb"])
def test_chunked_prefill_equals_one_shot(pair, mode):
    _, _, folder = pair
    ids = prompt_ids()
    model = build_ours(folder, mode)
    one_tokens, one_logits = PagedRunner(model).greedy(ids, 8)
    chunk_tokens, chunk_logits = PagedRunner(model).greedy(ids, 8, chunk=7)  # chunks straddle blocks
    assert chunk_tokens == one_tokens
    for got, ref in zip(chunk_logits, one_logits):
        assert rel_err(got, ref) < RTOL


def test_mixed_batch_equals_separate_runs(pair):
    """A step holding one sequence's prefill chunk and another's decode token."""
    _, _, folder = pair
    ids = prompt_ids()
    model = build_ours(folder, "auto")
    alone = PagedRunner(model)
    a, b = alone.new_seq(), alone.new_seq()
    ref_a = alone.step({a: ids[:20]})[a]
    alone.step({b: ids[20:35]})
    ref_b = alone.step({b: ids[35:36]})[b]
    ref_a2 = alone.step({a: ids[20:30]})[a]
    runner = PagedRunner(model)
    a, b = runner.new_seq(), runner.new_seq()
    runner.step({a: ids[:20], b: ids[20:35]})
    got = runner.step({a: ids[20:30], b: ids[35:36]})
    assert rel_err(got[a], ref_a2) < RTOL and rel_err(got[b], ref_b) < RTOL
    assert ref_a.shape == (COMMON["vocab_size"],)


def test_kv_cache_shape_is_latent_plus_rope(pair):
    _, _, folder = pair
    model = build_ours(folder)
    assert model.kv_cache_shape(10, 16) == (10, 16, 32 + 8)


def test_load_weights_skips_mtp_and_names_bad_tensors(pair):
    name, _, folder = pair
    model = build_ours(folder)
    n = COMMON["num_hidden_layers"]
    mtp = {f"model.layers.{n}.eh_proj.weight": torch.zeros(64, 128),
           f"model.layers.{n}.shared_head.head.weight": torch.zeros(256, 64),
           f"model.layers.{n}.mlp.experts.0.gate_proj.weight": torch.zeros(32, 64)}
    assert model.load_weights(mtp.items()) == set()
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.bogus\.weight"):
        model.load_weights([("model.layers.0.self_attn.bogus.weight", torch.zeros(3))])
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight.*shape"):
        model.load_weights([("model.layers.1.mlp.experts.3.up_proj.weight", torch.zeros(31, 64))])
    with pytest.raises(ValueError, match=r"kv_b_proj"):
        model.load_weights([("model.layers.2.self_attn.kv_b_proj.weight", torch.zeros(128, 33))])


def test_expert_slices_land_in_stacked_weights(pair):
    _, _, folder = pair
    model = build_ours(folder)
    sd = load_file(folder / "model.safetensors")
    experts = model.model.layers[2].mlp.experts
    assert torch.equal(experts.w13[5, :32], sd["model.layers.2.mlp.experts.5.gate_proj.weight"])
    assert torch.equal(experts.w13[5, 32:], sd["model.layers.2.mlp.experts.5.up_proj.weight"])
    assert torch.equal(experts.w2[5], sd["model.layers.2.mlp.experts.5.down_proj.weight"])


def test_config_round_trip_routing(pair):
    name, _, folder = pair
    model = build_ours(folder)
    router = model.model.layers[1].mlp.gate.cfg
    raw = json.loads((folder / "config.json").read_text())
    if name == "v3":
        assert (router.scoring_func, router.topk_method, router.norm_topk_prob) == ("sigmoid", "noaux_tc", True)
        assert model.model.layers[1].mlp.gate.e_score_correction_bias.abs().sum() > 0
    else:
        assert router.scoring_func == "softmax" and router.topk_method == raw["topk_method"]
