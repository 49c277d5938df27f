"""The bundled tiny-deepseek-v3 (MLA) with an 8-bit latent cache (`--kv-cache-dtype int8|fp8`), against the
float cache, on the CPU PyTorch paths (the quantising writer, dequantising gathers).

Criterion: greedy tokens. An 8-bit cache perturbs every attention score (int8: per element <= amax / 254 of
the row, whose amax is set by the rope key, ~4x the latent's on this model; fp8: <= 2^-4 relative), and
this small trained model has near-ties among its top tokens, so the greedy runs agree on a prefix and may
then fork. Measured here (4 prompts x 24 tokens): int8 agrees on the first 19 / 24 / 24 / 24 tokens with the
chosen-token logprobs within 0.24 on the agreeing prefix; fp8 on the first 2 / 5 / 8 / 24. The tests assert
the first 16 (int8) and 2 (fp8) greedy tokens, and that the MTP draft layer (which shares the 8-bit cache
format) changes no greedy output.
"""

import pytest

from deepserve import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
PROMPTS = ["def fibonacci(n):\n    ", "To be, or not to be", "The :mod:`os` module provides",
           "import sys\nimport os\n\n\ndef main(argv):\n    parser = "]
AGREE = {"int8": 16, "fp8": 2}  # greedy tokens that must match the float cache (see the docstring)


def _tokens(llm, params=GREEDY):
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]


@pytest.fixture(scope="module")
def float_tokens():
    return _tokens(LLM("tiny-deepseek-v3", num_kv_blocks=128))


@pytest.mark.parametrize("kv", ["int8", "fp8"])
def test_8bit_latent_cache_greedy_matches_float_cache(kv, float_tokens):
    llm = LLM("tiny-deepseek-v3", num_kv_blocks=128, kv_cache_dtype=kv)
    caches = llm.engine.core.runner.kv_caches
    assert str(caches[0].dtype) == {"int8": "torch.int8", "fp8": "torch.float8_e4m3fn"}[kv]
    assert llm.engine.core.runner.kv_scales[0].shape == caches[0].shape[:2]  # one scale per token
    for ours, ref in zip(_tokens(llm), float_tokens):
        assert ours[:AGREE[kv]] == ref[:AGREE[kv]]


@pytest.mark.parametrize("mode", ["naive", "absorb"])
def test_8bit_latent_cache_routes_agree(mode):
    auto = _tokens(LLM("tiny-deepseek-v3", num_kv_blocks=128, kv_cache_dtype="int8"))
    assert _tokens(LLM("tiny-deepseek-v3", num_kv_blocks=128, kv_cache_dtype="int8", attention_mode=mode)) == auto


def test_mtp_speculation_with_an_8bit_cache_keeps_greedy_outputs():
    params = SamplingParams(max_tokens=24, temperature=0.0)
    plain = _tokens(LLM("tiny-deepseek-v3", num_kv_blocks=128, kv_cache_dtype="int8"), params)
    spec = LLM("tiny-deepseek-v3", num_kv_blocks=128, kv_cache_dtype="int8", speculative="mtp",
               num_speculative_tokens=2)
    assert spec.engine.core.runner.proposer.kv_caches[0].dtype == spec.engine.core.runner.kv_caches[0].dtype
    assert _tokens(spec, params) == plain
    assert spec.engine.core.stats().spec_num_accepted_tokens > 0
