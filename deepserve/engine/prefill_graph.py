"""CUDA graphs for single-sequence prefill chunks (decode batches: deepserve/engine/cuda_graph.py).

A short prefill is host-bound: launching a 7B model's ~400 kernels from Python takes longer than
the GPU needs to run them (qwen-7b, a 128-token prompt, H200: 15.6-18.6 ms of launches for 8.9 ms of
GPU work, benchmarks/results/prefill_host.jsonl), so the time to first token of a lone short prompt is
mostly launch overhead. At start-up the model forward (input ids [T] + positions [T] -> hidden states [T, H], not logits) is captured once
per padded token count T of a ladder (16, 32, 64, ... up to the cap, and the cap itself), all over
one set of static buffers sized for the largest, Tmax (`PrefillInputs`).

A batch of exactly one sequence with 2 <= n <= Tmax new tokens (a first chunk, or a later one:
prefix-cache hit, chunked prefill) replays the graph of the smallest T >= n. The batch becomes two
sequences: the chunk (its positions, seq_len, block table and KV slots as scheduled) in rows
[0, n), and T - n padding tokens in rows [n, T) forming a second sequence (query_start_loc
[0, n, T], seq_lens [start + n, T - n]: token 0 at positions 0 .. T - n - 1, slot -1 so nothing is
written, a block table row of zeros so it reads the null block 0, which no sequence owns and the
warm-up filled with finite values). Every row is thus computed on real, finite data: quantisation
paths that take one activation scale over all rows see no garbage. When T == n the second sequence
is empty (q_len 0; the Triton prefill kernel's programs for it exit). hidden[:n] is the answer; the
runner computes the sampling rows' logits eagerly.

Numerics: the linears see T rows, not n, so they may pick other kernels or tiles than an eager run: results
equal an eager forward of the padded batch, and differ from the unpadded one by rounding (bf16), or by
method where a quantisation method routes by row count (2-4 rows: fp8's and W8A16's decode GEMV eagerly,
their prefill GEMMs in the 16-token graph).

Graph safety: nothing on the host runs at replay, so the attention backend's launches must depend on
shapes only (T, the batch of 2, the table width). Attention modules declare it with
`supports_prefill_cuda_graph = True` (TritonAttention: `paged_prefill_attention` sizes its grid from
num_tokens and batch and maps programs to sequences on the device). The capture context's host
tuples are query_lens_cpu (T, 0) and seq_lens_cpu (max_model_len, 0): not decode-only, the padded
batch's shape; a backend declaring support must not read them. MoE models are excluded (their
routing's host paths are not audited for graph safety).

Memory: the graphs share the capturer's pool with the decode graphs (captured after them). A replay's
output (the hidden states) is only valid until the next replay of any graph of that pool, so the
runner consumes it (the logits) right away, in stream order.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from deepserve.config import EngineConfig
from deepserve.engine.block_manager import cdiv
from deepserve.engine.cuda_graph import PAD_SLOT, Capturer, bound_step, copies_queued, padded_size
from deepserve.forward_context import ForwardContext, build_forward_context

LADDER_START = 16  # the smallest padded token count (then 32, 64, ... up to the cap)
META = 8  # int32 header of the packed int32 buffer: query_start_loc at 0..2, seq_lens at 4..5 (16-byte aligned)
Pending = tuple[list[int], list[int], torch.Tensor]  # rows of input_ids, rows of the sampled ids, those ids [N]
ForwardFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ids [T], positions [T]) -> hidden [T, H]


def prefill_capture_sizes(cap: int) -> tuple[int, ...]:
    """Padded token counts, ascending: powers of two from 16 up to `cap`, plus `cap` itself when it is
    not one of them; () when cap < 2 (a one-token batch is a decode)."""
    if cap < 2:
        return ()
    ladder = []
    size = LADDER_START
    while size <= cap:
        ladder.append(size)
        size *= 2
    if not ladder or ladder[-1] != cap:
        ladder.append(cap)
    return tuple(ladder)


def supports_prefill_graphs(model: nn.Module) -> bool:
    """Every attention layer declares `supports_prefill_cuda_graph = True` (shape-only prefill launches)
    and the model has no MoE layer."""
    from deepserve.engine.kv_cache import attention_layers
    from deepserve.layers.moe import RoutedExperts

    layers = attention_layers(model)
    if not layers or not all(getattr(layer, "supports_prefill_cuda_graph", False) for layer in layers):
        return False
    return not any(isinstance(m, RoutedExperts) for m in model.modules())


def prefill_graph_tokens(config: EngineConfig, model: nn.Module) -> int:
    """Tmax, the largest chunk a prefill graph takes: --max-prefill-graph-tokens capped at the step budget
    and max_model_len; 0 when the model does not support prefill graphs or the cap is below 2."""
    if not supports_prefill_graphs(model):
        return 0
    limit = min(config.max_prefill_graph_tokens, config.scheduler.max_num_batched_tokens, config.max_model_len)
    return limit if limit >= 2 else 0


# ------------------------------------------------------------------------------- static inputs


@dataclass(frozen=True)
class PrefillInputs:
    """Device buffers every prefill graph reads, sized for Tmax tokens and two sequences, and their host
    staging copies (pinned on CUDA): a fill is two asynchronous copies (three with pending inputs)."""

    input_ids: torch.Tensor  # [Tmax] int64 (row 0 of `tokens`)
    positions: torch.Tensor  # [Tmax] int64 (row 1)
    slot_mapping: torch.Tensor  # [Tmax] int64 (row 2)
    query_start_loc: torch.Tensor  # [3] int32 (ints[0:3])
    seq_lens: torch.Tensor  # [2] int32 (ints[4:6])
    block_tables: torch.Tensor  # [2, max_blocks_per_seq] int32 (ints[8:]); row 1 stays zeros
    tokens: torch.Tensor  # [3, Tmax] int64: ids, positions, slots
    ints: torch.Tensor  # [8 + 2 * max_blocks_per_seq] int32
    host_tokens: torch.Tensor  # [3, Tmax] int64 on the host
    host_ints: torch.Tensor  # [8 + 2 * max_blocks_per_seq] int32 on the host
    pending: torch.Tensor  # [2, Tmax] int64: rows of input_ids the device fills, their sources
    host_pending: torch.Tensor  # [2, Tmax] int64 on the host
    copied: list  # [the CUDA event recorded after the last fill's copies, or None]

    @classmethod
    def allocate(cls, max_tokens: int, max_blocks: int, device: torch.device | str) -> "PrefillInputs":
        device = torch.device(device)
        pin = device.type == "cuda"
        host_tokens = torch.zeros(3, max_tokens, dtype=torch.int64, pin_memory=pin)
        host_tokens[2] = PAD_SLOT
        host_ints = torch.zeros(META + 2 * max_blocks, dtype=torch.int32, pin_memory=pin)
        host_pending = torch.zeros(2, max_tokens, dtype=torch.int64, pin_memory=pin)
        tokens, ints = host_tokens.to(device, copy=True), host_ints.to(device, copy=True)
        return cls(input_ids=tokens[0], positions=tokens[1], slot_mapping=tokens[2],
                   query_start_loc=ints[0:3], seq_lens=ints[4:6], block_tables=ints[META:].view(2, max_blocks),
                   tokens=tokens, ints=ints, host_tokens=host_tokens, host_ints=host_ints,
                   pending=host_pending.to(device, copy=True), host_pending=host_pending, copied=[None])

    @property
    def max_tokens(self) -> int:
        return self.input_ids.shape[0]

    def context(self, size: int, block_size: int, max_model_len: int) -> ForwardContext:
        """The capture-time ForwardContext of `size` padded tokens in two sequences (host tuples: the
        padded batch's shape, not decode-only, the longest context; see the module docstring)."""
        return ForwardContext(
            positions=self.positions[:size], slot_mapping=self.slot_mapping[:size],
            query_start_loc=self.query_start_loc, seq_lens=self.seq_lens, block_tables=self.block_tables,
            block_size=block_size, query_lens_cpu=(size, 0), seq_lens_cpu=(max_model_len, 0))

    def fill(self, input_ids: torch.Tensor, ctx: ForwardContext, padded: int,
             pending: tuple[list[int], list[int]] | None = None) -> None:
        """Copy a one-sequence chunk (n new tokens: input_ids [n] int64 and ctx on the host) into rows
        [0, n); rows [n, padded) become the padding sequence (module docstring). `pending` (rows, sources)
        is staged the same way, for `pending_rows`. Waits for the previous fill's copies first: they read
        the staging buffers this one rewrites."""
        n, width = input_ids.shape[0], ctx.block_tables.shape[1]
        if ctx.num_seqs != 1 or not 2 <= n <= padded <= self.max_tokens:
            raise ValueError(f"a prefill graph takes one sequence of 2..{padded} tokens, got {ctx.query_lens_cpu}")
        if width > self.block_tables.shape[1]:
            raise ValueError(f"block table width {width} exceeds the captured {self.block_tables.shape[1]}")
        if self.copied[0] is not None:
            self.copied[0].synchronize()
        self._stage(input_ids, ctx, padded)
        self.tokens.copy_(self.host_tokens, non_blocking=True)
        self.ints.copy_(self.host_ints, non_blocking=True)
        if pending is not None:
            staged = self.host_pending.numpy()
            staged[0, :len(pending[0])] = pending[0]
            staged[1, :len(pending[1])] = pending[1]
            self.pending.copy_(self.host_pending, non_blocking=True)
        self.copied[0] = copies_queued(self.tokens)

    def _stage(self, input_ids: torch.Tensor, ctx: ForwardContext, padded: int) -> None:
        """Write the chunk and the padding sequence into the host staging buffers."""
        n, width = input_ids.shape[0], ctx.block_tables.shape[1]
        tokens, ints = self.host_tokens.numpy(), self.host_ints.numpy()
        tokens[0, :n] = input_ids.numpy()
        tokens[1, :n] = ctx.positions.numpy()
        tokens[2, :n] = ctx.slot_mapping.numpy()
        tokens[0, n:padded] = 0
        tokens[1, n:padded] = np.arange(padded - n)
        tokens[2, n:padded] = PAD_SLOT
        ints[0:3] = (0, n, padded)
        ints[4:6] = (ctx.seq_lens_cpu[0], padded - n)
        table = ints[META:].reshape(2, -1)  # [2, max_blocks_per_seq], row 1 stays zeros
        table[0, :width] = ctx.block_tables[0].numpy()
        table[0, width:] = 0

    def pending_rows(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `count` (rows, sources) of the last fill's pending inputs, on the device."""
        return self.pending[0, :count], self.pending[1, :count]


def null_chunk(size: int, block_size: int) -> tuple[torch.Tensor, ForwardContext]:
    """A chunk of `size` tokens (id 0) at positions 0 .. size - 1 over the null block that writes nowhere
    (slots -1): the static buffers' contents while a graph is captured (the capturer's warm-up runs read them)."""
    ctx = build_forward_context([size], [size], [[0] * cdiv(size, block_size)], block_size)
    ctx = dataclasses.replace(ctx, slot_mapping=torch.full((size,), PAD_SLOT, dtype=torch.int64))
    return torch.zeros(size, dtype=torch.int64), ctx


# ------------------------------------------------------------------------------- the runner


class PrefillGraphs:
    """Captured prefill forwards (ids, positions -> hidden states), one per padded token count."""

    def __init__(self, sizes: tuple[int, ...], max_blocks_per_seq: int, block_size: int,
                 max_model_len: int, device: torch.device | str):
        if not sizes or list(sizes) != sorted(set(sizes)) or sizes[0] < 2:
            raise ValueError(f"capture sizes must be ascending, distinct and >= 2, got {sizes}")
        self.sizes = sizes
        self.block_size, self.max_model_len = block_size, max_model_len
        self.static = PrefillInputs.allocate(sizes[-1], max_blocks_per_seq, device)
        self._replays: dict[int, Callable[[], torch.Tensor]] = {}

    @property
    def max_tokens(self) -> int:
        return self.sizes[-1]

    def capture(self, forward: ForwardFn, capturer: Capturer) -> None:
        """Capture `forward` ([T] ids, [T] positions -> [T, H]) for every size, largest first."""
        for size in reversed(self.sizes):
            self.static.fill(*null_chunk(size, self.block_size), padded=size)
            ctx = self.static.context(size, self.block_size, self.max_model_len)
            self._replays[size] = capturer.capture(bound_step(forward, ctx, self.static.input_ids[:size],
                                                              self.static.positions[:size]))

    def can_run(self, query_lens: list[int]) -> bool:
        """Exactly one sequence with 2 <= n <= Tmax new tokens."""
        return len(query_lens) == 1 and 2 <= query_lens[0] <= self.max_tokens

    def run(self, input_ids: torch.Tensor, ctx: ForwardContext, pending: Pending | None = None) -> torch.Tensor:
        """input_ids [n] int64 (host) and the one-sequence ctx (host) -> hidden states [n, H], a view of the
        graph's output. `pending` (async scheduling): (rows, source rows, tokens [N] on the device):
        input_ids[rows[i]] = tokens[sources[i]], gathered on the device after the copy."""
        n = input_ids.shape[0]
        padded = padded_size(self.sizes, n)
        if padded is None or padded not in self._replays:  # the fill checks the rest (one sequence, n >= 2)
            raise ValueError(f"no captured prefill graph for a batch of {ctx.query_lens_cpu} tokens")
        self.static.fill(input_ids, ctx, padded, None if pending is None else pending[:2])
        if pending is not None:
            rows, sources = self.static.pending_rows(len(pending[0]))
            self.static.input_ids[rows] = pending[2][sources]
        return self._replays[padded]()[:n]
