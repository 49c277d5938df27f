"""Accuracy of the 8-bit KV caches (--kv-cache-dtype int8 / fp8) on the default model
(SmolLM2-135M-Instruct), against the same model with its KV cache in float32 (CPU).

    python benchmarks/kv_cache_accuracy.py [--dtypes int8,fp8] [--window 512] [--greedy-tokens 64]
                                           [--out benchmarks/results/kv_cache_accuracy.jsonl]

Teacher-forced: the held-out text of the accuracy gate (deepserve/quant/data/eval_text.txt, ~3150
tokens) in windows of --window tokens overlapping by one, each window one prefill through a paged
cache of the given dtype; the prefill attention reads every key and value back from that cache, so
every position sees quantised K/V of its whole context (what a decode step sees). Reported per
dtype: top-1 agreement with the float32-cache model (95% Wilson interval), mean / max KL(ref || 8-bit)
in nats, perplexity ratio, over the text positions and, pooled like the accuracy gate, the positions
of its default prompts too (`passes_gate`: pooled top-1 >= 0.97 and perplexity within 2 %, the
thresholds W8A8 checkpoints are held to). Greedy: the default prompts, --greedy-tokens tokens each
through `LLM` (the engine end to end), and how many leading tokens equal the float32 run's.
One JSON line per dtype.

--ablation (text positions only, measurement-only variants that deepserve does not ship): the same
round trip applied to K only or to V only, and with one scale per group of 32 or 16 elements of a
row instead of one per row, simulated by quantising and dequantising K/V before a float32 cache
write. It shows which of K and V the error comes from, and what finer scales would buy.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Iterator
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deepserve import LLM, SamplingParams  # noqa: E402
import deepserve.layers.attention as torch_attention  # noqa: E402
from deepserve.engine.kv_cache import temporary_kv_cache  # noqa: E402
from deepserve.layers.kv_quant import dequantize_kv, kv_storage_dtype, quantize_kv  # noqa: E402
from deepserve.quant.eval import (DEFAULT_PROMPTS, AgreementTally, _nll, _prefill_logprobs, _windows,  # noqa: E402
                                  read_eval_text)

BLOCK = 16


def window_logprobs(model: torch.nn.Module, ids: list[int], window: int, dtype: torch.dtype
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per window: (log p [len - 1, vocab] f32, targets [len - 1]) through a KV cache of `dtype`."""
    spans = [(s, e) for s, e in _windows(len(ids), window) if e - s >= 2]
    with temporary_kv_cache(model, -(-max(e - s for s, e in spans) // BLOCK), BLOCK, dtype, "cpu"):
        for start, end in spans:
            yield _prefill_logprobs(model, ids[start:end], BLOCK)[:-1], torch.tensor(ids[start + 1:end])


def prompt_logprobs(model: torch.nn.Module, prompts: list[list[int]], dtype: torch.dtype) -> list[torch.Tensor]:
    """Teacher-forced log p [len, vocab] at every position of each prompt, through a cache of `dtype`."""
    with temporary_kv_cache(model, -(-max(map(len, prompts)) // BLOCK), BLOCK, dtype, "cpu"):
        return [_prefill_logprobs(model, p, BLOCK) for p in prompts]


def greedy(kv: str, prompts: list[str], tokens: int) -> list[list[int]]:
    llm = LLM(None, kv_cache_dtype=kv, device="cpu")
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    return [out.outputs[0].token_ids for out in llm.generate(prompts, params)]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def fake_quant(x: torch.Tensor, dtype: torch.dtype, group: int) -> torch.Tensor:
    """x [..., D] through the 8-bit round trip with one scale per `group` elements (group = D: per row)."""
    grouped = x.reshape(*x.shape[:-1], x.shape[-1] // group, group)  # [..., D / group, group]
    q, scales = quantize_kv(grouped, dtype)
    return dequantize_kv(q, scales, x.dtype).reshape(x.shape)


def ablation(model: torch.nn.Module, ids: list[int], window: int, reference: list, args) -> None:
    """Text-only agreement of the measurement-only variants (see the module docstring)."""
    write = torch_attention.write_kv
    head_dim = model.kv_cache_shape(1, 1)[-1]
    for dtype, name in ((torch.int8, "int8"), (torch.float8_e4m3fn, "fp8")):
        for which, group in (("k", head_dim), ("v", head_dim), ("kv", 32), ("kv", 16)):
            def patched(cache, k, v, slots, scales=None, which=which, group=group, dtype=dtype):
                k = fake_quant(k, dtype, group) if "k" in which else k
                v = fake_quant(v, dtype, group) if "v" in which else v
                return write(cache, k, v, slots, scales)

            tally = AgreementTally()
            with mock.patch.object(torch_attention, "write_kv", patched):
                for (ref_lp, _), (lp, _) in zip(reference, window_logprobs(model, ids, window, torch.float32)):
                    tally.add(ref_lp, lp)
            r = tally.report()
            label = f"{name} {'K and V' if which == 'kv' else which.upper() + ' only'}, " \
                    f"{'per row' if group == head_dim else f'groups of {group}'}"
            emit({"config": f"ablation-{name}-{which}-g{group}", "description": label, "shipped": False,
                  "model": "SmolLM2-135M-Instruct (Q4_1 GGUF)", "reference": "float32 model, float32 KV cache, CPU",
                  "text_positions": r.num_positions, "text_top1": round(r.top1_agreement, 5),
                  "text_top1_ci95": [round(r.top1_low, 5), round(r.top1_high, 5)],
                  "text_mean_kl": round(r.mean_kl, 6), "text_max_kl": round(r.max_kl, 4),
                  "scale_bytes_per_row": 4 * head_dim // group, "window": window,
                  "notes": "benchmarks/kv_cache_accuracy.py --ablation (fake quantisation before a float32 "
                           "cache write; not a deepserve option)"}, args.out)


def emit(record: dict, out: str | None) -> None:
    print(json.dumps(record), flush=True)
    if out:
        with open(out, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", default="int8,fp8")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--greedy-tokens", type=int, default=64)
    p.add_argument("--out", default=None, help="append one JSON line per dtype")
    p.add_argument("--ablation", action="store_true", help="only the measurement-only variants")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    llm = LLM(None, device="cpu")  # the default model, float32 on CPU
    model, tokenizer = llm.engine.core.runner.model, llm.tokenizer
    ids = tokenizer.encode(read_eval_text(None))
    model_dtype = next(model.parameters()).dtype
    start = time.perf_counter()
    reference = [(lp, t) for lp, t in window_logprobs(model, ids, args.window, model_dtype)]
    ref_nll = sum(_nll(lp, t) for lp, t in reference)
    count = sum(len(t) for _, t in reference)
    if args.ablation:
        return ablation(model, ids, args.window, reference, args)
    prompts = [tokenizer.encode(p) for p in DEFAULT_PROMPTS]
    ref_prompts = prompt_logprobs(model, prompts, model_dtype)
    ref_greedy = greedy("auto", list(DEFAULT_PROMPTS), args.greedy_tokens)
    for kv in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        tally, nll, dtype = AgreementTally(), 0.0, kv_storage_dtype(kv, model_dtype)
        for (ref_lp, _), (lp, t) in zip(reference, window_logprobs(model, ids, args.window, dtype)):
            tally.add(ref_lp, lp)
            nll += _nll(lp, t)
        report = tally.report()
        for ref_lp, lp in zip(ref_prompts, prompt_logprobs(model, prompts, dtype)):
            tally.add(ref_lp, lp)
        pooled = tally.report()
        ppl_ratio = math.exp((nll - ref_nll) / count)
        runs = greedy(kv, list(DEFAULT_PROMPTS), args.greedy_tokens)
        same = [common_prefix(a, b) for a, b in zip(ref_greedy, runs)]
        record = {"config": f"kv-cache-{kv}", "kv_cache_dtype": kv,
                  "model": "SmolLM2-135M-Instruct (Q4_1 GGUF)", "reference": "float32 model, float32 KV cache, CPU",
                  "ppl_ref": round(math.exp(ref_nll / count), 4), "ppl": round(math.exp(nll / count), 4),
                  "ppl_ratio": round(ppl_ratio, 5), "text_positions": report.num_positions,
                  "text_top1": round(report.top1_agreement, 5),
                  "text_top1_ci95": [round(report.top1_low, 5), round(report.top1_high, 5)],
                  "text_mean_kl": round(report.mean_kl, 6), "text_max_kl": round(report.max_kl, 4),
                  "positions": pooled.num_positions, "top1": round(pooled.top1_agreement, 5),
                  "top1_ci95": [round(pooled.top1_low, 5), round(pooled.top1_high, 5)],
                  "mean_kl": round(pooled.mean_kl, 6), "max_kl": round(pooled.max_kl, 4),
                  "passes_gate": pooled.top1_agreement >= 0.97 and ppl_ratio <= 1.02,
                  "greedy_tokens": args.greedy_tokens, "greedy_same_prefix": same,
                  "window": args.window, "seconds": round(time.perf_counter() - start, 1),
                  "notes": "benchmarks/kv_cache_accuracy.py; per-row (token x KV head) dynamic scales"}
        emit(record, args.out)


if __name__ == "__main__":
    main()
