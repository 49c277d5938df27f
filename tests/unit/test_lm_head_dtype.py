"""LMHead's logits dtype: float32 by default (the sampler's contract), the product's own dtype with
float32=False (the decode CUDA graph, whose greedy rows take the argmax without a widening copy)."""

from __future__ import annotations

import torch

from deepserve.layers.embedding import LMHead


def test_lm_head_widens_only_when_asked():
    torch.manual_seed(0)
    head = LMHead(vocab_size=50, hidden_size=16).to(torch.bfloat16)
    head.weight.data.normal_()
    head.process_weights_after_loading()
    hidden = torch.randn(3, 16, dtype=torch.bfloat16)
    wide, narrow = head(hidden), head(hidden, float32=False)
    assert wide.dtype == torch.float32 and narrow.dtype == torch.bfloat16
    assert torch.equal(narrow.float(), wide)  # the widening is exact: same values, same argmax
    assert torch.equal(narrow.argmax(-1), wide.argmax(-1))
