"""Paged-KV test cases for the attention kernels: shuffled block tables over a NaN-filled cache.

Every slot that no sequence owns holds NaN, so a kernel reading past a sequence's length or through
the wrong block poisons its output. Block 0 is never handed out (tables are padded with 0).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

import torch


@dataclass
class PagedCase:
    kv_cache: torch.Tensor  # [2, num_blocks, block_size, H_kv, D], NaN in unused slots
    block_tables: torch.Tensor  # [B, W] int32, shuffled, padded with 0
    seq_lens: torch.Tensor  # [B] int32

    @property
    def block_size(self) -> int:
        return self.kv_cache.shape[2]


def shuffled_tables(lengths: list[int], block_size: int, generator: torch.Generator) -> tuple[list[list[int]], int]:
    """Disjoint, non-contiguous block lists (block 0 unused) and the number of blocks to allocate."""
    needs = [(n + block_size - 1) // block_size for n in lengths]
    num_blocks = sum(needs) + 8
    perm = (torch.randperm(num_blocks - 1, generator=generator) + 1).tolist()
    tables = []
    for need in needs:
        tables.append(perm[:need])
        perm = perm[need:]
    return tables, num_blocks


def make_case(lengths: list[int], kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
              device: torch.device | str, seed: int = 0) -> PagedCase:
    """A cache whose first lengths[i] positions of sequence i hold random K/V, the rest NaN."""
    gen = torch.Generator().manual_seed(seed)
    tables, num_blocks = shuffled_tables(lengths, block_size, gen)
    cache = torch.full((2, num_blocks, block_size, kv_heads, head_dim), float("nan"), dtype=dtype)
    for table, n in zip(tables, lengths):
        blocks = torch.tensor(table, dtype=torch.long)
        values = torch.randn(2, len(table) * block_size, kv_heads, head_dim, generator=gen)[:, :n]
        view = cache[:, blocks].flatten(1, 2)  # [2, len(table) * block_size, H_kv, D]
        view[:, :n] = values.to(dtype)
        cache[:, blocks] = view.unflatten(1, (len(table), block_size))
    width = max((len(t) for t in tables), default=0) or 1
    padded = [t + [0] * (width - len(t)) for t in tables]
    return PagedCase(
        kv_cache=cache.to(device),
        block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(lengths, dtype=torch.int32, device=device),
    )


def query_start_loc(query_lens: list[int], device: torch.device | str) -> torch.Tensor:
    """[B + 1] int32 cumulative new-token counts."""
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    return torch.tensor(starts, dtype=torch.int32, device=device)


NEW_LENGTHS = [1, 17, 4096, 2000, 0, 555, 16, 3000]  # written over 8 captured lengths before the replay


def replay_with_new_lengths(run, seq_lens: torch.Tensor) -> torch.Tensor:
    """Decode kernels under CUDA graphs: compile `run()` eagerly, capture it with seq_lens [8] int32 as
    they are, write NEW_LENGTHS into seq_lens in place and replay; returns the graph's output."""
    run()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    seq_lens.copy_(torch.tensor(NEW_LENGTHS, dtype=torch.int32))
    graph.replay()
    return out


def long_context_lens(batch: int, longest: int = 4096) -> list[int]:
    """GPU-test sequence lengths: `batch` draws in [1, longest] (seeded by the batch size), the first
    one exactly `longest` so every case reaches the long-context split path."""
    gen = torch.Generator().manual_seed(batch)
    lens = torch.randint(1, longest + 1, (batch,), generator=gen).tolist()
    lens[0] = longest
    return lens


def triton_attention_module() -> ModuleType:
    """deepserve.layers.attention_triton bound to the (possibly interpreted) kernel modules."""
    from tests.kernels.interpret import load_kernel_module

    kernels = [load_kernel_module(n) for n in ("kv_cache_write", "paged_decode_attention", "paged_prefill_attention")]
    module = importlib.import_module("deepserve.layers.attention_triton")
    if module.paged_decode_attention is not kernels[1].paged_decode_attention:
        module = importlib.reload(module)
    return module
