"""CUDA graphs for decode-only batches (single-sequence prefill chunks: deepserve/engine/prefill_graph.py,
which reuses this module's padding rule, `Capturer`s and pool).

At start-up the model's decode step (input ids + positions -> logits) is captured once per batch
size of a ladder (1, 2, 4, 8, 16, 24, 32, ... up to the cap), all over one set of static input
buffers sized for the largest. A decode-only batch of b sequences replays the smallest captured
size >= b: the first b rows of the static buffers get the batch, the padding rows get a dummy
token that writes nowhere (slot_mapping -1, which KV writers skip) and reads one slot of the null
block (seq_len 1, block table row of zeros); the first b rows of the output are the answer.

Inside a graph nothing on the host runs at replay, so the attention backend's launch decisions
must depend only on tensor shapes (the padded batch size, the block-table width) and never on the
host copies `seq_lens_cpu` / `query_lens_cpu`. The capture context sets those to the worst case
(every sequence at max_model_len) so a backend that does read them sizes for every replay.

The capture mechanism sits behind `Capturer` so CPU tests can swap in `EagerCapturer`, which
re-runs the function at replay over the same static buffers (same padding and slicing logic).
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn

from deepserve.forward_context import ForwardContext, forward_context

logger = logging.getLogger(__name__)

StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ids [B], positions [B]) -> [B, V]
LADDER_HEAD = (1, 2, 4, 8)
LADDER_STEP = 8  # after 8: 16, 24, 32, ...
PAD_SLOT = -1  # KV writers skip negative slots
PAD_SEQ_LEN = 1  # padding rows attend to one (null-block) slot, so no row is empty


def capture_sizes(max_num_seqs: int, max_graph_batch_size: int) -> tuple[int, ...]:
    """The batch-size ladder, ascending: 1, 2, 4, 8, 16, 24, ... up to min(max_num_seqs, cap),
    with that limit itself as the top rung so every allowed decode batch has a graph."""
    limit = min(max_num_seqs, max_graph_batch_size)
    if limit < 1:
        return ()
    ladder = [s for s in LADDER_HEAD if s <= limit]
    ladder += range(2 * LADDER_STEP, limit + 1, LADDER_STEP)
    if ladder[-1] != limit:
        ladder.append(limit)
    return tuple(ladder)


def padded_size(sizes: tuple[int, ...], batch: int) -> int | None:
    """The smallest captured size >= batch; None when the batch is larger than every graph."""
    i = bisect.bisect_left(sizes, batch)
    return sizes[i] if i < len(sizes) else None


def supports_graphs(model: nn.Module) -> bool:
    """Every attention layer declares `supports_cuda_graph = True` (shape-only launch decisions)."""
    from deepserve.engine.kv_cache import attention_layers

    layers = attention_layers(model)
    return bool(layers) and all(getattr(layer, "supports_cuda_graph", False) for layer in layers)


def copies_queued(tensor: torch.Tensor):
    """A CUDA event recorded on the current stream after the copies queued so far (into `tensor`'s
    device); None off CUDA, where copies are synchronous. A fill synchronizes on the last one before it
    rewrites the staging buffers that those copies read."""
    if not tensor.is_cuda:
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def bound_step(step: StepFn, ctx: ForwardContext, ids: torch.Tensor, positions: torch.Tensor
               ) -> Callable[[], torch.Tensor]:
    """`step(ids, positions)` under `ctx` as a no-argument function over static buffers (what a capturer records)."""

    def run() -> torch.Tensor:
        with forward_context(ctx):
            return step(ids, positions)

    return run


# ------------------------------------------------------------------------------- static inputs


@dataclass(frozen=True)
class StaticInputs:
    """Device buffers every graph reads, sized for the largest captured batch (max_bs), and their
    host staging copies (pinned on CUDA) so that a fill is three asynchronous copies."""

    input_ids: torch.Tensor  # [max_bs] int64 (row 0 of `tokens`)
    positions: torch.Tensor  # [max_bs] int64 (row 1)
    slot_mapping: torch.Tensor  # [max_bs] int64 (row 2)
    seq_lens: torch.Tensor  # [max_bs] int32
    query_start_loc: torch.Tensor  # [max_bs + 1] int32, always 0..max_bs (one token per row)
    block_tables: torch.Tensor  # [max_bs, max_blocks_per_seq] int32
    tokens: torch.Tensor  # [3, max_bs] int64: ids, positions, slots
    host_tokens: torch.Tensor  # [3, max_bs] int64 on the host
    host_seq_lens: torch.Tensor  # [max_bs] int32 on the host
    host_tables: torch.Tensor  # [max_bs, max_blocks_per_seq] int32 on the host
    pending: torch.Tensor  # [2, max_bs] int64: rows of input_ids the device fills, their sources
    host_pending: torch.Tensor  # [2, max_bs] int64 on the host
    copied: list  # [the CUDA event recorded after the last fill's copies, or None]

    @classmethod
    def allocate(cls, max_bs: int, max_blocks: int, device: torch.device | str) -> "StaticInputs":
        device = torch.device(device)
        pin = device.type == "cuda"

        def host(*shape: int, dtype: torch.dtype, value: int = 0) -> torch.Tensor:
            return torch.full(shape, value, dtype=dtype, pin_memory=pin)

        host_tokens = host(3, max_bs, dtype=torch.int64)
        host_tokens[2] = PAD_SLOT
        host_seq_lens = host(max_bs, dtype=torch.int32, value=PAD_SEQ_LEN)
        host_tables = host(max_bs, max_blocks, dtype=torch.int32)
        tokens = host_tokens.to(device, copy=True)
        host_pending = host(2, max_bs, dtype=torch.int64)
        return cls(input_ids=tokens[0], positions=tokens[1], slot_mapping=tokens[2],
                   seq_lens=host_seq_lens.to(device, copy=True),
                   query_start_loc=torch.arange(max_bs + 1, dtype=torch.int32, device=device),
                   block_tables=host_tables.to(device, copy=True), tokens=tokens, host_tokens=host_tokens,
                   host_seq_lens=host_seq_lens, host_tables=host_tables,
                   pending=host_pending.to(device, copy=True), host_pending=host_pending, copied=[None])

    @property
    def max_bs(self) -> int:
        return self.input_ids.shape[0]

    def context(self, bs: int, block_size: int, max_model_len: int) -> ForwardContext:
        """The capture-time ForwardContext over the first `bs` rows (host fields: worst case)."""
        return ForwardContext(
            positions=self.positions[:bs], slot_mapping=self.slot_mapping[:bs],
            query_start_loc=self.query_start_loc[:bs + 1], seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs], block_size=block_size,
            query_lens_cpu=(1,) * bs, seq_lens_cpu=(max_model_len,) * bs)

    def pending_rows(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `count` (rows, sources) of the last fill's pending inputs, on the device."""
        return self.pending[0, :count], self.pending[1, :count]

    def fill(self, input_ids: torch.Tensor, ctx: ForwardContext, padded: int,
             pending: tuple[list[int], list[int]] | None = None) -> None:
        """Copy a decode batch (b rows of host tensors) into rows [0, b); rows [b, padded) become
        padding (token 0 at position 0, slot -1, seq_len 1, block table row of zeros).

        The batch is written into the host staging buffers, then copied to the device
        asynchronously (pinned memory: a pageable copy would wait for the device). `pending`
        (rows, sources) is staged the same way, for `pending_rows`. Table columns past the batch's widest table keep what an earlier batch
        left there: no row reads past its own blocks (a padding row reads only column 0)."""
        b, width = ctx.num_seqs, ctx.block_tables.shape[1]
        if width > self.block_tables.shape[1]:
            raise ValueError(f"block table width {width} exceeds the captured {self.block_tables.shape[1]}")
        if self.copied[0] is not None:
            self.copied[0].synchronize()  # the previous fill's copies have read the staging buffers
        tokens, seq_lens, tables = self.host_tokens.numpy(), self.host_seq_lens.numpy(), self.host_tables.numpy()
        tokens[0, :b] = input_ids.numpy()
        tokens[1, :b] = ctx.positions.numpy()
        tokens[2, :b] = ctx.slot_mapping.numpy()
        tokens[:2, b:padded] = 0
        tokens[2, b:padded] = PAD_SLOT
        seq_lens[:b] = ctx.seq_lens.numpy()
        seq_lens[b:padded] = PAD_SEQ_LEN
        tables[:b, :width] = ctx.block_tables.numpy()
        tables[b:padded, :width] = 0
        self.tokens.copy_(self.host_tokens, non_blocking=True)
        self.seq_lens.copy_(self.host_seq_lens, non_blocking=True)
        self.block_tables[:padded].copy_(self.host_tables[:padded], non_blocking=True)
        if pending is not None:
            rows, sources = pending
            staged = self.host_pending.numpy()
            staged[0, :len(rows)] = rows
            staged[1, :len(sources)] = sources
            self.pending.copy_(self.host_pending, non_blocking=True)
        self.copied[0] = copies_queued(self.tokens)


# ------------------------------------------------------------------------------- capturers


class Capturer(Protocol):
    def capture(self, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        """Record `fn` (which reads only static buffers); returns a replay returning its output."""
        ...


class EagerCapturer:
    """No graph: `fn` runs once at capture (as a recording would) and again at every replay
    (CPU tests, and a debugging aid)."""

    def capture(self, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        fn()
        return fn


class CudaGraphCapturer:
    """torch.cuda.CUDAGraph per capture, all sharing one memory pool (capture largest first)."""

    def __init__(self, warmup_runs: int = 2):
        self.warmup_runs = warmup_runs
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: list[torch.cuda.CUDAGraph] = []

    def capture(self, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup_runs):  # lazy init, autotuning, allocator warm-up
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        self.graphs.append(graph)

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay


# ------------------------------------------------------------------------------- the runner


class DecodeGraphs:
    """Captured decode steps, one per ladder size, over shared static inputs."""

    def __init__(self, sizes: tuple[int, ...], max_blocks_per_seq: int, block_size: int,
                 max_model_len: int, device: torch.device | str):
        if not sizes or list(sizes) != sorted(set(sizes)):
            raise ValueError(f"capture sizes must be ascending and distinct, got {sizes}")
        self.sizes = sizes
        self.block_size, self.max_model_len = block_size, max_model_len
        self.static = StaticInputs.allocate(sizes[-1], max_blocks_per_seq, device)
        self._replays: dict[int, Callable[[], torch.Tensor]] = {}

    def capture(self, step: StepFn, capturer: Capturer) -> None:
        """Capture `step` for every size, largest first (the pool then fits the smaller ones)."""
        for bs in reversed(self.sizes):
            ctx = self.static.context(bs, self.block_size, self.max_model_len)
            self._replays[bs] = capturer.capture(bound_step(step, ctx, self.static.input_ids[:bs],
                                                            self.static.positions[:bs]))

    def can_run(self, query_lens: list[int]) -> bool:
        """Decode-only (one new token per sequence) and no larger than the largest graph."""
        return bool(query_lens) and len(query_lens) <= self.sizes[-1] and all(q == 1 for q in query_lens)

    def run(self, input_ids: torch.Tensor, ctx: ForwardContext,
            pending: tuple[list[int], list[int], torch.Tensor] | None = None) -> torch.Tensor:
        """input_ids [b] int64 (host) and a decode-only ctx of b sequences -> step output rows
        [b, ...]. `pending` (async scheduling): (rows, source rows, tokens [N] on the device):
        ids only the device knows, input_ids[rows[i]] = tokens[sources[i]], gathered on the
        device after the copy."""
        b = ctx.num_seqs
        padded = padded_size(self.sizes, b)
        if padded is None or padded not in self._replays:
            raise ValueError(f"no captured graph for a decode batch of {b}")
        self.static.fill(input_ids, ctx, padded, None if pending is None else pending[:2])
        if pending is not None:
            rows, sources = self.static.pending_rows(len(pending[0]))
            self.static.input_ids[rows] = pending[2][sources]
        return self._replays[padded]()[:b]
