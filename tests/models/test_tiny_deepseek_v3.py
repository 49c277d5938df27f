"""The bundled tiny-deepseek-v3 (real trained weights, MLA + MoE + YaRN) through the whole engine.

Checks the engine's greedy output against HF transformers' own DeepseekV3ForCausalLM on the same
folder, MLA absorb vs naive through the paged latent cache, and batch / prefix-cache invariance.
"""

import pytest
import torch

from deepserve import LLM, SamplingParams
from deepserve.loader.resolve import resolve_model_path

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=3)
PROMPTS = ["def fibonacci(n):\n    ", "To be, or not to be", "The :mod:`os` module provides",
           "import sys\nimport os\n\n\ndef main(argv):\n    parser = "]


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny-deepseek-v3", num_kv_blocks=128)


def test_matches_hf_transformers_greedy(llm):
    from transformers import AutoModelForCausalLM

    folder = resolve_model_path("tiny-deepseek-v3")
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for prompt in PROMPTS[:2]:
        ids = llm.tokenizer.encode(prompt)
        ours = llm.generate([ids], GREEDY)[0].outputs[0]
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=24, min_new_tokens=24, do_sample=False)
        assert ours.token_ids == ref[0, len(ids):].tolist()


def test_absorb_and_naive_agree(llm):
    naive = LLM("tiny-deepseek-v3", num_kv_blocks=128, attention_mode="naive")
    absorb = LLM("tiny-deepseek-v3", num_kv_blocks=128, attention_mode="absorb")
    a = naive.generate(PROMPTS, GREEDY)
    b = absorb.generate(PROMPTS, GREEDY)
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        for la, lb in zip(x.outputs[0].logprobs, y.outputs[0].logprobs):
            assert abs(la.logprob - lb.logprob) <= 1e-4 * max(1.0, abs(lb.logprob))


def test_batch_and_prefix_cache_invariance(llm):
    batched = llm.generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, batched):
        alone = llm.generate([prompt], GREEDY)[0]
        assert alone.outputs[0].token_ids == out.outputs[0].token_ids
    long_prompt = PROMPTS[3] * 3
    first = llm.generate([long_prompt], GREEDY)[0]
    second = llm.generate([long_prompt], GREEDY)[0]
    assert second.num_cached_tokens >= 16
    assert first.outputs[0].token_ids == second.outputs[0].token_ids


def test_chat_template_renders_deepseek_format(llm):
    out = llm.chat([{"role": "user", "content": "Hello"}], SamplingParams(max_tokens=4, temperature=0))[0]
    assert out.prompt.startswith("<｜begin▁of▁sentence｜>") and "<｜User｜>Hello<｜Assistant｜>" in out.prompt
    assert len(out.outputs[0].token_ids) >= 1
