"""GPU micro-benchmark of the small fused kernels against their PyTorch eager references.

Each case times the Triton kernel and the eager reference with `triton.testing.do_bench`
(median ms) and reports the bandwidth of one pass over the tensors the op must touch
(bytes read + written once / time), bf16 activations. Prints a table; `--json PATH` also appends
one JSON line per case.

    .venv/bin/python benchmarks/kernels_small.py [--quick] [--json benchmarks/results/kernels_small.jsonl]
"""

from __future__ import annotations

import argparse
import json
from typing import Callable, NamedTuple

import torch
import triton.testing

from deepserve.kernels import rms_norm, rotary, sampling, silu_and_mul
from deepserve.layers.sampler import sample_from_probs

BF16 = torch.bfloat16


class Case(NamedTuple):
    name: str
    nbytes: int  # one pass over inputs + outputs
    kernel: Callable[[], object]
    eager: Callable[[], object]


def rms_cases(tokens_list, hidden_list):
    for tokens in tokens_list:
        for hidden in hidden_list:
            x, r = torch.randn(tokens, hidden, dtype=BF16, device="cuda"), torch.randn(tokens, hidden, dtype=BF16, device="cuda")
            w = torch.rand(hidden, dtype=BF16, device="cuda")
            yield Case(f"rms_norm+res T={tokens} H={hidden}", 4 * x.numel() * 2,
                       lambda x=x, r=r, w=w: rms_norm.rms_norm(x, r, w, 1e-6),
                       lambda x=x, r=r, w=w: rms_norm.rms_norm_ref(x, r, w, 1e-6))


def silu_cases(tokens_list, inter_list):
    for tokens in tokens_list:
        for inter in inter_list:
            x = torch.randn(tokens, 2 * inter, dtype=BF16, device="cuda")
            yield Case(f"silu_and_mul T={tokens} I={inter}", 3 * tokens * inter * 2,
                       lambda x=x: silu_and_mul.silu_and_mul(x), lambda x=x: silu_and_mul.silu_and_mul_ref(x))


def rotary_cases(tokens_list):
    shapes = [("qwen7b", 28, 4, 128, 128, False), ("v3-rope", 128, 1, 64, 64, True)]
    for tokens in tokens_list:
        for tag, hq, hk, d, rot, il in shapes:
            cos = torch.randn(32768, rot // 2, device="cuda")
            sin = torch.randn(32768, rot // 2, device="cuda")
            pos = torch.randint(0, 32768, (tokens,), device="cuda")
            q = torch.randn(tokens, hq, d, dtype=BF16, device="cuda")
            k = torch.randn(tokens, hk, d, dtype=BF16, device="cuda")
            nbytes = 2 * (q.numel() + k.numel()) * 2 + 2 * tokens * rot // 2 * 4
            yield Case(f"rotary {tag} T={tokens}", nbytes,
                       lambda a=(pos, q, k, cos, sin, il): rotary.rotary_embedding(*a),
                       lambda a=(pos, q, k, cos, sin, il): rotary.rotary_embedding_ref(*a))


def sampling_cases(rows_list, vocab=152064):
    for rows in rows_list:
        logits = 4 * torch.randn(rows, vocab, device="cuda")
        k = torch.full((rows,), 50, device="cuda")
        p = torch.full((rows,), 0.9, device="cuda")
        seeds = torch.randint(0, 2**62, (rows,), device="cuda")
        gens = (None,) * rows
        nbytes = logits.numel() * 4
        yield Case(f"top-k50+top-p0.9 N={rows} V={vocab}", nbytes,
                   lambda a=(logits, k, p): sampling.apply_top_k_top_p(*a),
                   lambda a=(logits, k, p): sampling.apply_top_k_top_p_ref(*a))
        yield Case(f"top-p0.9 only N={rows} V={vocab}", nbytes,
                   lambda a=(logits, None, p): sampling.apply_top_k_top_p(*a),
                   lambda a=(logits, None, p): sampling.apply_top_k_top_p_ref(*a))
        yield Case(f"race sample N={rows} V={vocab}", nbytes,
                   lambda a=(logits, seeds): sampling.exponential_race_sample(*a),
                   lambda lg=logits, g=gens: sample_from_probs(lg.softmax(dim=-1), g))


def run(cases, out_json):
    print(f"{'case':42s} {'triton ms':>10s} {'eager ms':>10s} {'speedup':>8s} {'triton GB/s':>12s} {'eager GB/s':>11s}")
    for case in cases:
        t_k = triton.testing.do_bench(case.kernel)
        t_e = triton.testing.do_bench(case.eager)
        row = dict(case=case.name, triton_ms=t_k, eager_ms=t_e, triton_gbps=case.nbytes / t_k / 1e6,
                   eager_gbps=case.nbytes / t_e / 1e6, device=torch.cuda.get_device_name())
        print(f"{case.name:42s} {t_k:10.4f} {t_e:10.4f} {t_e / t_k:7.2f}x {row['triton_gbps']:12.0f} "
              f"{row['eager_gbps']:11.0f}", flush=True)
        if out_json:
            with open(out_json, "a") as f:
                f.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--json", default=None, help="append one JSON line per case to this file")
    args = parser.parse_args()
    tokens = [1, 256, 8192] if args.quick else [1, 64, 256, 2048, 8192]
    rows = [1, 256] if args.quick else [1, 32, 128, 256]
    cases = [*rms_cases(tokens, [1536, 3584, 4096, 7168]), *silu_cases(tokens, [18944, 14336]),
             *rotary_cases(tokens), *sampling_cases(rows)]
    with torch.inference_mode():
        run(cases, args.json)


if __name__ == "__main__":
    main()
