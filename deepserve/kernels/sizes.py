"""Host-side integer helpers for kernel launches: grid sizes and power-of-two block widths.

    cdiv(x, y)          -> ceil(x / y) for y > 0, as triton.cdiv
    next_power_of_2(n)  -> the smallest power of two >= n (0 for n = 0), as triton.next_power_of_2
    bucket(table, m)    -> table[the smallest key >= m]: the entry of a {max M: config} table for M rows

Triton's own are `ConstexprFunction`s (usable inside kernels too), and a call from host Python pays for
their constexpr unwrapping: 1.90 us against 0.088 us for this cdiv on the 2-core development machine
(Triton 3.9; run s8host, benchmarks/host_launch.py, results/cpu.jsonl), where the int8 GEMM's wrapper with
a no-op launch took 41.13 us with Triton's cdiv and 29.92 us with this one. A launch wrapper calls them a
few times, and an eager prefill step of V2-Lite runs about 700 launches; these are plain functions with the
same results on ints (tests/kernels/test_sizes.py).
"""

from __future__ import annotations


def cdiv(x: int, y: int) -> int:
    return (x + y - 1) // y


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 0 else 0


def bucket(table: dict, m: int):
    return table[min(bound for bound in table if bound >= m)]
