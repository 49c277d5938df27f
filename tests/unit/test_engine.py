"""The engine end to end on a tiny random Llama: batching, prefix caching, preemption, stops.

Per-step logits are compared through logprobs (log_softmax of the logits, top 5 + the sampled
token), which the engine returns for every generated token.
"""

import pytest
import torch

from deepserve import LLM, SamplingParams
from tests.tiny_checkpoints import make_tiny_llama

TOL = 1e-4
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=5)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def make_llm(folder, **kw):
    return LLM(str(folder), **{"num_kv_blocks": 256, "max_num_batched_tokens": 256, **kw})


def prompts(n: int) -> list[list[int]]:
    """n prompts of different lengths (3 .. 3 + 7(n-1) tokens), deterministic."""
    return [[(7 * i + 3 * j) % 300 + 2 for j in range(3 + 7 * i)] for i in range(n)]


def assert_same_steps(a, b):
    """Same tokens, and every step's top-5 logprobs within TOL (relative to their magnitude)."""
    assert a.token_ids == b.token_ids
    for la, lb in zip(a.logprobs, b.logprobs):
        assert [t for t, _ in la.top] == [t for t, _ in lb.top]
        for (_, x), (_, y) in zip(la.top, lb.top):
            assert abs(x - y) <= TOL * max(1.0, abs(y))


def test_batch_of_16_matches_each_alone(folder):
    llm = make_llm(folder)
    ps = prompts(16)
    batched = llm.generate(ps, GREEDY)
    for p, out in zip(ps, batched):
        alone = llm.generate([p], GREEDY)[0]
        assert_same_steps(out.outputs[0], alone.outputs[0])


def test_prefix_cache_hit_changes_nothing(folder):
    llm = make_llm(folder)
    shared = prompts(6)[5]  # 38 tokens: two full 16-token blocks
    first = llm.generate([shared + [5, 6, 7]], GREEDY)[0]
    second = llm.generate([shared + [5, 6, 7]], GREEDY)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 32
    assert_same_steps(first.outputs[0], second.outputs[0])
    no_cache = make_llm(folder, enable_prefix_caching=False).generate([shared + [5, 6, 7]], GREEDY)[0]
    assert_same_steps(no_cache.outputs[0], second.outputs[0])


def test_preemption_and_recompute_give_the_same_tokens(folder):
    ps = prompts(8)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    roomy = make_llm(folder).generate(ps, params)
    tight_llm = make_llm(folder, num_kv_blocks=12, max_num_batched_tokens=64)
    tight = tight_llm.generate(ps, params)
    assert tight_llm.engine.core.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in tight] == [o.outputs[0].token_ids for o in roomy]
    assert tight_llm.engine.stats().kv_cache_usage == 0.0


def test_chunked_prefill_matches_whole_prefill(folder):
    p = prompts(8)[7]  # 52 tokens
    whole = make_llm(folder).generate([p], GREEDY)[0]
    chunked = make_llm(folder, max_num_batched_tokens=16).generate([p], GREEDY)[0]
    assert_same_steps(whole.outputs[0], chunked.outputs[0])


def test_seeded_sampling_is_reproducible_in_any_batch(folder):
    llm = make_llm(folder)
    seeded = SamplingParams(max_tokens=16, temperature=1.0, seed=42, ignore_eos=True)
    alone = llm.generate([prompts(3)[2]], seeded)[0].outputs[0].token_ids
    mixed = llm.generate(prompts(3), [SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True),
                                      SamplingParams(max_tokens=16, temperature=0.7, seed=1),
                                      seeded])[2].outputs[0].token_ids
    assert alone == mixed
    other = llm.generate([prompts(3)[2]], SamplingParams(max_tokens=16, temperature=1.0, seed=43,
                                                         ignore_eos=True))[0].outputs[0].token_ids
    assert other != alone


def test_stop_string_max_tokens_and_n(folder):
    llm = make_llm(folder)
    base = llm.generate([prompts(2)[1]], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    text = base[0].outputs[0].text
    assert base[0].outputs[0].finish_reason == "length" and len(base[0].outputs[0].token_ids) == 16
    stop = text[3:6]
    assert stop and stop not in text[:5]
    out = llm.generate([prompts(2)[1]], SamplingParams(max_tokens=16, temperature=0.0, stop=[stop],
                                                        ignore_eos=True))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]
    many = llm.generate([prompts(2)[1]], SamplingParams(max_tokens=5, temperature=1.0, n=3, seed=0))[0]
    assert [o.index for o in many.outputs] == [0, 1, 2]
    assert llm.engine.stats().num_running == 0 and llm.engine.stats().kv_cache_usage == 0.0


def test_kernel_warm_up_keeps_positions_below_max_model_len(folder):
    """A step budget larger than --max-model-len: the warm-up splits each token count into sequences
    of at most max_model_len tokens, so no position reaches past the rotary table (on a GPU that read
    was an illegal memory access at start-up), and every count is still fed whole."""
    llm = make_llm(folder, enable_prefix_caching=False)
    runner, seen = llm.engine.core.runner, []
    forward = runner.model.forward
    runner.model.forward = lambda ids, positions: seen.append(positions.clone()) or forward(ids, positions)
    runner.warm_up(300, 64)
    assert max(int(p.max()) for p in seen) == 63
    assert [p.numel() for p in seen][:10] == [1, 15, 16, 63, 64, 255, 256, 299, 300, 9]
    assert torch.equal(seen[8], torch.cat([torch.arange(64)] * 4 + [torch.arange(44)]))


def test_warm_up_counts_cover_both_multiple_of_16_variants():
    """Triton compiles a kernel per (integer argument % 16 == 0) specialisation: every bucket of the
    ladder is warmed with a multiple of 16 and a count that is not, and the budget with both."""
    from deepserve.engine.model_runner import warm_up_counts

    assert warm_up_counts(8192) == [1, 15, 16, 63, 64, 255, 256, 1023, 1024, 4095, 4096, 8191, 8192]
    assert warm_up_counts(300) == [1, 15, 16, 63, 64, 255, 256, 299, 300]
    assert warm_up_counts(1) == [1]


def test_bad_prompt_ids_are_rejected(folder):
    llm = make_llm(folder)
    with pytest.raises(ValueError, match="prompt token ids"):
        llm.generate([[1, 2, 10_000]], GREEDY)
    assert llm.generate([[3, 4, 5]], GREEDY)[0].outputs[0].token_ids


@pytest.mark.parametrize("model", ["llama", "deepseek"])
def test_kernel_warm_up_writes_only_the_null_block(folder, model):
    """The start-up warm-up (run on platforms that compile kernels at first launch) feeds dummy
    batches up to the step budget; their KV writes must stay in block 0, which no sequence owns,
    and the engine must generate the same tokens afterwards."""
    path = folder if model == "llama" else "deepserve/assets/tiny-deepseek-v3"
    llm = make_llm(path, enable_prefix_caching=False)  # the second run must recompute, not hit 7.0s
    runner = llm.engine.core.runner
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    before = [out.outputs[0].token_ids for out in llm.generate(prompts(3), params)]
    for cache in runner.kv_caches:
        cache.fill_(7.0)
    runner.warm_up(300, llm.engine.config.max_model_len)
    for cache in runner.kv_caches:
        blocks = cache if cache.dim() == 3 else cache.transpose(0, 1)  # [num_blocks, ...]
        assert not torch.equal(blocks[0], torch.full_like(blocks[0], 7.0)), "warm-up wrote nothing"
        assert torch.equal(blocks[1:], torch.full_like(blocks[1:], 7.0)), "warm-up wrote outside block 0"
    assert [out.outputs[0].token_ids for out in llm.generate(prompts(3), params)] == before


def test_start_up_warm_up_stops_at_the_profiled_step(folder, monkeypatch):
    """With max_num_seqs x max_model_len below the token budget, the warm-up (run where kernels compile
    at first launch) feeds at most what memory planning profiled (2 x 64 tokens here, not 256): a larger
    warm-up step could run out of the memory the KV cache was given."""
    llm = make_llm(folder, max_num_seqs=2, max_model_len=64)
    core, calls = llm.engine.core, []
    monkeypatch.setattr(core.runner, "warm_up", lambda budget, max_len: calls.append((budget, max_len)))
    core._warm_up()
    assert calls == [(128, 64)]
