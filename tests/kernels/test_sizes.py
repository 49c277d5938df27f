"""kernels/sizes.py: the host-side cdiv / next_power_of_2 give Triton's results (which the launch wrappers
used before) on every int they are asked about here; bucket picks a {max M: config} table's entry."""

import pytest
import triton

from deepserve.kernels.sizes import bucket, cdiv, next_power_of_2


def test_same_as_triton():
    for n in [*range(0, 4200), 8191, 8192, 8193, 18944, 37888, 1 << 20, (1 << 31) + 5]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 2, 3, 7, 16, 64, 128, 132, 4096):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
    assert [next_power_of_2(n) for n in (0, 1, 2, 3, 5, 1025)] == [0, 1, 2, 4, 8, 2048]
    assert [cdiv(n, 4) for n in (0, 1, 4, 5)] == [0, 1, 1, 2]


def test_bucket_takes_the_smallest_bound_at_or_above_m():
    table = {16: "small", 256: "decode", 1 << 62: "prefill"}
    assert [bucket(table, m) for m in (0, 1, 16, 17, 256, 257, 8192)] == \
        ["small", "small", "small", "decode", "decode", "prefill", "prefill"]
    with pytest.raises(ValueError):
        bucket({16: "small"}, 17)  # no bound covers M
