"""Query tiles over a varlen batch, shared by the prefill attention kernels (paged and MLA).

Sequence i owns new tokens starts[i]:starts[i+1] of the flat batch. Its tiles of BLOCK tokens are
numbered from `starts[i] // BLOCK + i`, an upper bound the host knows without reading the device
(grid = num_tokens // BLOCK + num_seqs); a program finds its sequence with `find_sequence` and
exits when its tile lies past the sequence's end.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def find_sequence(starts_ptr, num_seqs, tile, BLOCK: tl.constexpr):
    """Largest i with starts[i] // BLOCK + i <= tile (binary search over starts [num_seqs + 1])."""
    lo = num_seqs * 0
    hi = num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tl.load(starts_ptr + mid) // BLOCK + mid <= tile:
            lo = mid
        else:
            hi = mid - 1
    return lo
