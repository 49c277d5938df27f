"""The bundled tiny-deepseek-v3 under `--quantization int8-weight-only` with int8 routed experts (the fused
W8A16 MoE kernel), against the float model, through the whole engine.

CPU: the expert stacks become int8 only where their MoE backend takes int8 stacks (triton, the CUDA
default); here the triton backend is forced by patching `deepserve.layers.moe.moe_backend_for`, so the
kernels run under the Triton interpreter (float32 activations); the float model runs its CPU default.

Criterion: greedy tokens and their logprobs. Measured here (4 prompts x 24 tokens): the int8-expert
model (linears int8 too) agrees with the float model on all 24 tokens of all 4 prompts, the chosen
tokens' logprobs within 0.10 over the first 8. The test asserts the first 8 tokens of every prompt
(interpreter time: ~15 s) and logprobs within 0.25.
"""

import pytest
import torch

import deepserve.layers.moe as moe_module
from deepserve import LLM, SamplingParams
from deepserve.layers.moe_backend import get_moe_backend

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=1)
PROMPTS = ["def fibonacci(n):\n    ", "To be, or not to be", "The :mod:`os` module provides",
           "import sys\nimport os\n\n\ndef main(argv):\n    parser = "]
MAX_LOGPROB_DIFF = 0.25
# Merged vs apart input projections: the same int8 rows, scales and input quantisation, and int32 sums are exact
# in any tiling, so the logits should agree bit for bit (run s15a, H200: 0.000).
MERGED_MAX_LOGPROB_DIFF = 0.01


def _run(llm: LLM) -> tuple[list[list[int]], list[list[float]]]:
    outs = [o.outputs[0] for o in llm.generate(PROMPTS, GREEDY)]
    return [o.token_ids for o in outs], [[lp.logprob for lp in o.logprobs] for o in outs]


def _experts(llm: LLM) -> list[moe_module.RoutedExperts]:
    model = llm.engine.core.runner.model
    return [m for m in model.modules() if isinstance(m, moe_module.RoutedExperts)]


@pytest.mark.slow
def test_int8_weight_only_runs_int8_experts_and_keeps_greedy_tokens(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("forces the Triton kernels on CPU tensors (the interpreter); on a GPU see the test below")
    float_tokens, float_logprobs = _run(LLM("tiny-deepseek-v3", num_kv_blocks=128))
    default = LLM("tiny-deepseek-v3", num_kv_blocks=128, quantization="int8-weight-only")
    assert all(e.w13.dtype == torch.float32 and e.w13_scale is None for e in _experts(default))  # torch backend

    monkeypatch.setattr(moe_module, "moe_backend_for", lambda device: get_moe_backend("triton"))
    llm = LLM("tiny-deepseek-v3", num_kv_blocks=128, quantization="int8-weight-only")
    experts = _experts(llm)
    assert len(experts) == 3  # 4 layers, the first dense
    for e in experts:
        assert e.moe_backend().name == "triton"
        assert e.w13.dtype == e.w2.dtype == torch.int8 and e.w13_scale.dtype == torch.float32
    tokens, logprobs = _run(llm)
    assert tokens == float_tokens
    worst = max(abs(a - b) for ours, ref in zip(logprobs, float_logprobs) for a, b in zip(ours, ref))
    print(f"int8 experts: greedy tokens equal; max |logprob diff| {worst:.3f}")
    assert worst <= MAX_LOGPROB_DIFF


@pytest.mark.gpu
def test_gpu_int8_weight_only_runs_int8_experts():
    """CUDA defaults (no forcing): int8 stacks selected; CUDA-graph decode gives the eager tokens; the
    first 4 greedy tokens match the bf16 model on at least 3 of the 4 prompts (not measured on a GPU:
    bf16 activations round more than the CPU float32 run above)."""
    llm = LLM("tiny-deepseek-v3", num_kv_blocks=128, device="cuda", quantization="int8-weight-only")
    assert all(e.w13.dtype == torch.int8 and e.moe_backend().name == "triton" for e in _experts(llm))
    tokens, _ = _run(llm)
    eager = LLM("tiny-deepseek-v3", num_kv_blocks=128, device="cuda", quantization="int8-weight-only",
                enforce_eager=True)
    assert _run(eager)[0] == tokens
    bf16_tokens, _ = _run(LLM("tiny-deepseek-v3", num_kv_blocks=128, device="cuda"))
    assert sum(t[:4] == f[:4] for t, f in zip(tokens, bf16_tokens)) >= 3


@pytest.mark.gpu
def test_gpu_int8_merges_the_input_projection(monkeypatch):
    """`--quantization int8` on CUDA: every MLA input projection merged (q_a | kv_a, int8, its input quantised
    by the norm); CUDA-graph decode gives the eager tokens; the greedy tokens and their logprobs match the int8
    model with the merge switched off (two input GEMMs, each quantising its input) on the first 4 tokens of
    every prompt, logprobs within MERGED_MAX_LOGPROB_DIFF (run s15a, H200: 4 of 4, max |logprob diff| 0.000)."""
    import deepserve.layers.mla as mla_module

    llm = LLM("tiny-deepseek-v3", num_kv_blocks=128, device="cuda", quantization="int8")
    layers = llm.engine.core.runner.model.model.layers
    assert all(layer.attention_input_linear() is layer.self_attn.qkv_a_proj is not None for layer in layers)
    assert all(layer.self_attn.qkv_a_proj.weight.dtype == torch.int8 for layer in layers)
    tokens, logprobs = _run(llm)
    eager = LLM("tiny-deepseek-v3", num_kv_blocks=128, device="cuda", quantization="int8", enforce_eager=True)
    assert _run(eager)[0] == tokens

    monkeypatch.setattr(mla_module, "MERGES_UNDER_QUANTIZATION", frozenset())
    apart = LLM("tiny-deepseek-v3", num_kv_blocks=128, device="cuda", quantization="int8")
    assert all(layer.self_attn.qkv_a_proj is None for layer in apart.engine.core.runner.model.model.layers)
    want_tokens, want_logprobs = _run(apart)
    same = [t[:4] == w[:4] for t, w in zip(tokens, want_tokens)]
    assert all(same), (tokens, want_tokens)
    worst = max(abs(a - b) for ok, ours, ref in zip(same, logprobs, want_logprobs) if ok
                for a, b in zip(ours[:4], ref[:4]))
    print(f"int8 merged vs apart: first 4 tokens equal on {sum(same)}/4 prompts, max |logprob diff| {worst:.3f}")
    assert worst <= MERGED_MAX_LOGPROB_DIFF
