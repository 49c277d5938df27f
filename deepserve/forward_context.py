"""Per-batch metadata for one forward pass, installed by a context manager.

The model runner builds one `ForwardContext` per step and installs it with `forward_context(...)`;
attention backends read it with `get_forward_context()`. Model files never see it.

Batch layout (the one the GPU kernels of later issues read):
  * the batch is a flat list of `num_tokens` new tokens from `num_seqs` sequences, sequence i owning
    tokens `query_start_loc[i]:query_start_loc[i+1]`;
  * sequence i has `seq_lens[i]` tokens of context after this step (cached + new), so its new tokens
    sit at positions `seq_lens[i] - q_len_i ... seq_lens[i] - 1`;
  * the KV cache of every layer is paged in blocks of `block_size` token slots; token position p of
    sequence i lives in block `block_tables[i, p // block_size]`, at offset `p % block_size`, i.e.
    in slot `block_id * block_size + p % block_size`; `slot_mapping[t]` is that slot for new token t.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass(frozen=True)
class ForwardContext:
    positions: torch.Tensor  # [num_tokens] int64
    slot_mapping: torch.Tensor  # [num_tokens] int64, KV slot written by each new token
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, cumulative new-token counts
    seq_lens: torch.Tensor  # [num_seqs] int32, context length after this step
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, padded with 0
    block_size: int
    # Host copies for CPU backends and for launch decisions (no device sync needed).
    query_lens_cpu: tuple[int, ...]
    seq_lens_cpu: tuple[int, ...]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        return all(q == 1 for q in self.query_lens_cpu)


_CURRENT: contextvars.ContextVar[ForwardContext | None] = contextvars.ContextVar(
    "deepserve_forward_context", default=None
)


@contextlib.contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)


def get_forward_context() -> ForwardContext:
    ctx = _CURRENT.get()
    if ctx is None:
        raise RuntimeError("attention called outside forward_context(); the model runner installs it")
    return ctx


def build_forward_context(
    query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]], block_size: int,
    device: torch.device | str = "cpu",
) -> ForwardContext:
    """Build the context for a batch on the host, then move it to `device` in one go per tensor."""
    positions: list[int] = []
    slots: list[int] = []
    for q_len, s_len, table in zip(query_lens, seq_lens, block_tables):
        for pos in range(s_len - q_len, s_len):
            positions.append(pos)
            slots.append(table[pos // block_size] * block_size + pos % block_size)
    starts = [0]
    for q_len in query_lens:
        starts.append(starts[-1] + q_len)
    width = max((len(t) for t in block_tables), default=0) or 1
    padded = [t + [0] * (width - len(t)) for t in block_tables]

    def as_tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    return ForwardContext(
        positions=as_tensor(positions, torch.int64),
        slot_mapping=as_tensor(slots, torch.int64),
        query_start_loc=as_tensor(starts, torch.int32),
        seq_lens=as_tensor(seq_lens, torch.int32),
        block_tables=as_tensor(padded, torch.int32),
        block_size=block_size,
        query_lens_cpu=tuple(query_lens),
        seq_lens_cpu=tuple(seq_lens),
    )
