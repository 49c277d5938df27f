"""Split-K helpers shared by the decode kernels: the split count and the merge of partials."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.interpret import device, load_kernel_module

sk = load_kernel_module("split_k")


def test_choose_num_splits():
    assert sk.choose_num_splits(256, 4, 4096, 132) == 1  # the batch fills the GPU
    assert sk.choose_num_splits(1, 4, 8192, 132) == 64  # capped
    assert sk.choose_num_splits(1, 4, 100, 132) == 1  # too short to split
    assert sk.choose_num_splits(8, 4, 2048, 132) == 16


# one D chunk (head dims) / several (MLA's 512-wide latent; 40 over 300 splits: 16-wide chunks, a ragged last one)
@pytest.mark.parametrize("dim, splits", [(16, 1), (32, 3), (40, 5), (128, 64), (512, 4), (512, 17), (512, 64),
                                         (40, 300)])
def test_merge_matches_reference_with_empty_splits(dim, splits):
    gen = torch.Generator().manual_seed(dim + splits)
    mid_o = torch.randn(3, 2, splits, dim, generator=gen).to(device())
    mid_lse = (torch.randn(3, 2, splits, generator=gen) * 4).to(device())
    mid_lse[0, 0, 0] = float("-inf")  # an empty split: weight 0
    mid_o[0, 0, 0] = float("nan")  # ... whose partial is never read
    mid_lse[1, 1, :] = float("-inf")  # every split empty (a graph padding row): zeros
    out = sk.merge_splits(mid_o, mid_lse, torch.empty(3, 2, dim, device=device()))
    clean = mid_o.clone()
    clean[0, 0, 0] = 0.0
    ref = sk.merge_splits_ref(clean, mid_lse, torch.float32)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[1, 1], torch.zeros(dim, device=device()))
    if splits > 1:  # the weights matter: not a plain mean of the partials
        assert not torch.allclose(out[2, 0], clean[2, 0].mean(0), atol=1e-3)


def test_merge_tiles():
    # (MERGE_G, MERGE_S, MERGE_D): heads x splits x columns within 8192 f32, D >= 16
    assert sk.merge_tiles(6, 128, 7) == (8, 8, 128)  # qwen-7b W-b1: a GQA group's 7 heads, 6 splits, one tile
    assert sk.merge_tiles(64, 128, 1) == (1, 64, 128)  # dense head dim: the whole [S, D] row
    assert sk.merge_tiles(3, 512, 16) == (16, 4, 128)  # MLA latent: a 16-head tile, four 128-wide chunks
    assert sk.merge_tiles(64, 512, 16) == (8, 64, 16)
    assert sk.merge_tiles(300, 40, 7) == (1, 512, 16)


def test_fused_only_for_merges_of_at_most_two_tiles():
    """The last program merges alone: fused where that is <= MAX_FUSED_MERGE_TILES tiles (W-b1 qwen-7b: one),
    the separate launch beyond (64 splits; MLA's 512 latent columns past 2 splits); never without counters
    or with one split."""
    counters, out = torch.zeros(1, 4, dtype=torch.int32), torch.zeros(1)
    fused = lambda splits, dim, heads, c=counters: sk.fused_merge_args(c, splits, dim, heads, out)[1]["FUSED_MERGE"]
    assert sk.MAX_FUSED_MERGE_TILES == 2
    assert sk.fused_merge_tiles(6, 128, 7) == 1 and fused(6, 128, 7)
    assert sk.fused_merge_tiles(64, 128, 7) == 8 and not fused(64, 128, 7)
    assert sk.fused_merge_tiles(2, 512, 16) == 2 and fused(2, 512, 16)
    assert sk.fused_merge_tiles(3, 512, 16) == 4 and not fused(3, 512, 16)
    assert not fused(1, 128, 7) and not fused(6, 128, 7, None)
    placeholder, flags = sk.fused_merge_args(None, 6, 128, 7, out)
    assert placeholder is out and flags == {"FUSED_MERGE": False, "MERGE_G": 1, "MERGE_S": 1, "MERGE_D": 16}


def test_merge_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="do not fit"):
        sk.merge_splits(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 4), torch.zeros(1, 2, 16))
