"""kernels/sizes.py: the host-side cdiv / next_power_of_2 give Triton's results (which the launch wrappers
used before) on every int they are asked about here."""

import triton

from deepserve.kernels.sizes import cdiv, next_power_of_2


def test_same_as_triton():
    for n in [*range(0, 4200), 8191, 8192, 8193, 18944, 37888, 1 << 20, (1 << 31) + 5]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 2, 3, 7, 16, 64, 128, 132, 4096):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
    assert [next_power_of_2(n) for n in (0, 1, 2, 3, 5, 1025)] == [0, 1, 2, 4, 8, 2048]
    assert [cdiv(n, 4) for n in (0, 1, 4, 5)] == [0, 1, 1, 2]
