"""Token embedding and the LM head (optionally tied to the embedding).

Both hold a [vocab, hidden] matrix; the vocabulary dimension is the one tensor parallelism will
split (each rank a contiguous range of token ids), so the loaders narrow along dim 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepserve.layers.linear import checked_copy
from deepserve.layers.linear_method import DenseLinearMethod, LinearMethod, linear_method_for


class VocabEmbedding(nn.Module):
    """input_ids [num_tokens] int64 -> [num_tokens, hidden]."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        checked_copy(param.data, loaded)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(VocabEmbedding):
    """hidden [num_tokens, hidden] -> logits [num_tokens, vocab] float32 (`float32=False`: in the product's
    dtype, no widening copy; the decode CUDA graph's greedy argmax needs no float32).

    With `tie_to` the head shares the embedding's weight (one Parameter, loaded once).
    """

    def __init__(self, vocab_size: int, hidden_size: int, tie_to: VocabEmbedding | None = None):
        nn.Module.__init__(self)
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.tied = tie_to is not None
        if tie_to is not None:
            self.weight = tie_to.weight
        else:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))
            self.weight.weight_loader = self.weight_loader
        self.method: LinearMethod = DenseLinearMethod()

    # The embedding (tied) or the MTP head may read the dense matrix: keep it next to a packed copy.
    keep_dense_weight = True

    def process_weights_after_loading(self) -> None:
        self.method = linear_method_for(self.weight)
        self.method.process_weights_after_loading(self)

    def forward(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
        logits = self.method.apply(self, hidden, None)
        return logits.float() if float32 else logits
