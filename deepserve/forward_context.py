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
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterator

import numpy as np
import torch

from deepserve.platforms import upload


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
    # Metadata a backend derives from this batch once and every layer reuses (see `derived`).
    derived_cache: dict = field(default_factory=dict, compare=False, repr=False)

    def derived(self, key: Hashable, build: Callable[["ForwardContext"], Any]) -> Any:
        """build(self) on the first call with `key`, the same object for every later call (every layer
        of the step). Not for paths captured in CUDA graphs (decode batches, and prefill chunks with
        engine/prefill_graph.py): a capture context serves many replays, so what the first call computed
        from device contents would go stale."""
        if key not in self.derived_cache:
            self.derived_cache[key] = build(self)
        return self.derived_cache[key]

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
    """Build the context for a batch on the host (vectorised with numpy: its cost grows with the
    batch every step), then move it to `device` one tensor each."""
    num_seqs = len(query_lens)
    q_lens = np.asarray(query_lens, dtype=np.int64).reshape(num_seqs)
    s_lens = np.asarray(seq_lens, dtype=np.int64).reshape(num_seqs)
    tables = _pad_tables(block_tables)  # [num_seqs, width] int32
    starts = np.zeros(num_seqs + 1, dtype=np.int64)
    np.cumsum(q_lens, out=starts[1:])
    owner = np.repeat(np.arange(num_seqs), q_lens)  # [num_tokens] sequence of each new token
    positions = np.arange(starts[-1]) - starts[owner] + (s_lens - q_lens)[owner]
    blocks = tables[owner, positions // block_size].astype(np.int64) if owner.size else positions
    slots = blocks * block_size + positions % block_size

    def as_tensor(values: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return upload(torch.from_numpy(values).to(dtype), device)

    return ForwardContext(
        positions=as_tensor(positions, torch.int64),
        slot_mapping=as_tensor(slots, torch.int64),
        query_start_loc=as_tensor(starts, torch.int32),
        seq_lens=as_tensor(s_lens, torch.int32),
        block_tables=as_tensor(tables, torch.int32),
        block_size=block_size,
        query_lens_cpu=tuple(query_lens),
        seq_lens_cpu=tuple(seq_lens),
    )


def _pad_tables(block_tables: list[list[int]]) -> np.ndarray:
    """Ragged block tables -> [num_seqs, width] int32, padded with 0 (width >= 1)."""
    lens = np.fromiter(map(len, block_tables), dtype=np.int64, count=len(block_tables))
    width = int(lens.max(initial=0)) or 1
    flat = np.fromiter(itertools.chain.from_iterable(block_tables), dtype=np.int32, count=int(lens.sum()))
    tables = np.zeros((len(block_tables), width), dtype=np.int32)
    tables[np.arange(width)[None, :] < lens[:, None]] = flat
    return tables
