"""Dense models (Llama, Qwen2) against HF transformers, through the paged KV cache.

Tiny random checkpoints are built with HF, saved as safetensors and loaded with `load_weights`.
`initializer_range` 0.2 keeps attention far from uniform so RoPE, masking and paging errors show.
"""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, Qwen2Config
from transformers import LlamaForCausalLM as HFLlama
from transformers import Qwen2ForCausalLM as HFQwen2

from deepserve.config import ModelConfig
from deepserve.engine.kv_cache import allocate_kv_caches, bind_kv_cache
from deepserve.forward_context import build_forward_context, forward_context
from deepserve.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from deepserve.models.llama import LlamaForCausalLM
from deepserve.models.qwen2 import Qwen2ForCausalLM
from deepserve.models.registry import get_model_class
from tests.paged_harness import BLOCK, PagedRunner

TOL = 1e-4
BASE = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
            initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=None)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
CASES = {
    "llama3_rope": (HFLlama, LlamaConfig(**BASE, rope_parameters=LLAMA3_ROPE), LlamaForCausalLM),
    "qwen2": (HFQwen2, Qwen2Config(**BASE, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
              Qwen2ForCausalLM),
    "llama_tied_wide_heads": (HFLlama, LlamaConfig(**BASE, tie_word_embeddings=True, head_dim=32),
                              LlamaForCausalLM),
}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    """(HF model, our model with the same weights, checkpoint tensors, our config)."""
    hf_cls, hf_cfg, our_cls = CASES[request.param]
    torch.manual_seed(1234)
    hf = hf_cls(hf_cfg).eval()
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder, safe_serialization=True)
    config = ModelConfig.from_folder(folder)
    ours = our_cls(config).eval()
    tensors = load_file(folder / "model.safetensors")
    loaded = ours.load_weights(tensors.items())
    assert loaded == {name for name, _ in ours.named_parameters()}
    return hf, ours, tensors, config


def prompt(n: int = 40, seed: int = 7) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def all_prefill_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits of every prompt position from one prefill through a fresh paged cache."""
    bind_kv_cache(model, allocate_kv_caches(model, 8, BLOCK, torch.float32, "cpu"))
    table = [5, 2, 7, 1][: (len(ids) + BLOCK - 1) // BLOCK]  # shuffled blocks
    ctx = build_forward_context([len(ids)], [len(ids)], [table], BLOCK)
    with torch.no_grad(), forward_context(ctx):
        return model.compute_logits(model(torch.tensor(ids), ctx.positions))


def test_prompt_logits_match_hf(pair):
    hf, ours, _, _ = pair
    ids = prompt()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]  # [40, vocab]
    logits = all_prefill_logits(ours, ids)
    assert logits.dtype == torch.float32 and logits.shape == ref.shape
    assert rel_err(logits[-1], ref[-1]) < TOL
    assert rel_err(logits, ref) < TOL


def test_greedy_continuation_matches_hf_generate(pair):
    hf, ours, _, _ = pair
    ids = prompt()
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=32, min_new_tokens=32, do_sample=False)
    tokens, _ = PagedRunner(ours).greedy(ids, 32)
    assert tokens == out[0, len(ids):].tolist()
    assert len(set(tokens)) > 4  # a real continuation, not one token repeated


def test_chunked_prefill_matches_one_shot(pair):
    _, ours, _, _ = pair
    ids = prompt()
    one_tokens, one_logits = PagedRunner(ours).greedy(ids, 8)
    chunk_tokens, chunk_logits = PagedRunner(ours).greedy(ids, 8, chunk=7)
    assert chunk_tokens == one_tokens
    for a, b in zip(chunk_logits, one_logits):
        assert rel_err(a, b) < TOL


def test_batch_invariance_mixed_steps(pair):
    """4 sequences of different lengths in one step (then decode + chunk mixed) vs each alone."""
    _, ours, _, _ = pair
    lengths = [5, 17, 33, 40]
    seqs = [prompt(n, seed=n) for n in lengths]
    second = {0: [3], 1: prompt(6, seed=99), 2: [11], 3: [200]}  # decodes and a chunk
    together = PagedRunner(ours)
    sids = [together.new_seq() for _ in seqs]
    first_all = together.step({sid: s for sid, s in zip(sids, seqs)})
    second_all = together.step({sids[i]: toks for i, toks in second.items()})
    for i, s in enumerate(seqs):
        alone = PagedRunner(ours)
        sid = alone.new_seq()
        assert rel_err(first_all[sids[i]], alone.step({sid: s})[sid]) < TOL
        assert rel_err(second_all[sids[i]], alone.step({sid: second[i]})[sid]) < TOL


@pytest.mark.parametrize("pair", ["llama3_rope"], indirect=True)
def test_llama3_rope_scaling_is_applied(pair):
    """Guard against a vacuous parity check: without the scaling the logits differ."""
    _, ours, tensors, config = pair
    assert config.rope_scaling["rope_type"] == "llama3"
    plain = type(ours)(dataclasses.replace(config, rope_scaling=None)).eval()
    plain.load_weights(tensors.items())
    ids = prompt()
    assert rel_err(all_prefill_logits(plain, ids), all_prefill_logits(ours, ids)) > 1e-2


def test_load_weights_errors_and_skips(pair):
    _, ours, tensors, config = pair
    model = type(ours)(config)
    name = "model.layers.1.self_attn.k_proj.weight"
    bad = tensors[name][:-1]
    rows = 2 * config.resolved_head_dim
    with pytest.raises(ValueError, match=rf"k_proj\.weight.*expected \({rows}, 64\), got \({rows - 1}, 64\)"):
        model.load_weights([(name, bad)])
    with pytest.raises(ValueError, match="model.layers.9.mlp.up_proj.weight"):
        model.load_weights([("model.layers.9.mlp.up_proj.weight", torch.zeros(128, 64))])
    with pytest.raises(ValueError, match="model.norm.weight.*expected \\(64,\\), got \\(65,\\)"):
        model.load_weights([("model.norm.weight", torch.zeros(65))])
    skipped = [("model.layers.0.self_attn.rotary_emb.inv_freq", torch.zeros(8))]
    if config.tie_word_embeddings:
        assert "lm_head.weight" not in tensors
        skipped.append(("lm_head.weight", torch.zeros(256, 64)))
        assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.load_weights(skipped) == set()


def test_registry():
    assert get_model_class("LlamaForCausalLM") is LlamaForCausalLM
    assert get_model_class("Qwen2ForCausalLM") is Qwen2ForCausalLM
    with pytest.raises(ValueError, match="MistralForCausalLM.*DeepseekV3ForCausalLM.*LlamaForCausalLM"):
        get_model_class("MistralForCausalLM")


def test_qwen2_sliding_window_rejected():
    raw = dict(architectures=["Qwen2ForCausalLM"], **{k: v for k, v in BASE.items() if v is not None},
               use_sliding_window=True, max_window_layers=1)
    with pytest.raises(ValueError, match="sliding-window"):
        Qwen2ForCausalLM(ModelConfig.from_hf_dict(raw))


@pytest.mark.parametrize("tp_size", [2, 4])
def test_linear_shards_recombine(tp_size):
    """Per-rank slices from the weight loaders reproduce the full layers (TP-ready shapes).

    tp 4 with 2 kv heads exercises kv-head replication (ranks 0,1 hold head 0; ranks 2,3 head 1).
    """
    hidden, d, heads, kv_heads, inter = 16, 4, 4, 2, 12
    wq, wk, wv = (torch.randn(n * d, hidden) for n in (heads, kv_heads, kv_heads))
    gate, up, down = torch.randn(inter, hidden), torch.randn(inter, hidden), torch.randn(hidden, inter)
    x = torch.randn(3, hidden)
    q_parts, row_sum = [], 0
    for rank in range(tp_size):
        qkv = QKVParallelLinear(hidden, d, heads, kv_heads, tp_size=tp_size, tp_rank=rank)
        for shard, w in zip("qkv", (wq, wk, wv)):
            qkv.weight_loader(qkv.weight, w, shard)
        kv_size = qkv.num_kv_heads * d
        q, k, v = qkv(x).split([qkv.num_heads * d, kv_size, kv_size], -1)
        head = rank * kv_heads // tp_size  # first kv head of this rank
        torch.testing.assert_close(k, x @ wk[head * d: head * d + kv_size].T)
        torch.testing.assert_close(v, x @ wv[head * d: head * d + kv_size].T)
        q_parts.append(q)
        gate_up = MergedColumnParallelLinear(hidden, [inter, inter], tp_size=tp_size, tp_rank=rank)
        gate_up.weight_loader(gate_up.weight, gate, 0)
        gate_up.weight_loader(gate_up.weight, up, 1)
        g, u = gate_up(x).chunk(2, -1)  # this rank's columns of gate and of up
        cols = slice(rank * inter // tp_size, (rank + 1) * inter // tp_size)
        torch.testing.assert_close(u, x @ up[cols].T)
        row = RowParallelLinear(inter, hidden, tp_size=tp_size, tp_rank=rank, all_reduce=lambda t: t)
        row.weight_loader(row.weight, down)
        row_sum = row_sum + row(g)  # the all-reduce, done by hand
    torch.testing.assert_close(torch.cat(q_parts, -1), x @ wq.T)
    torch.testing.assert_close(row_sum, (x @ gate.T) @ down.T)
