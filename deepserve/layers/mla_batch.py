"""How an MLA layer splits a batch that is not decode-only between its two GPU kernels.

  * decode rows (q_len 1, with `split_decode_rows`): the absorbed decode kernel over the paged latent
    cache, which reads each context latent once and expands nothing;
  * every other sequence (prefill, chunked prefill, prefix-cache hits): its context latents are
    gathered once for the whole batch, expanded by ONE kv_b_proj GEMM, and attended by the varlen
    prefill kernel (`kernels/mla_prefill_attention`).
Expanding the contexts of decode rows would cost h * (Dn + Dv) values per context token (64 KiB per
token on V3) and a GEMM, for one query row: a mixed step with many long-running decodes would
outgrow the activation memory profiled at start-up.

Everything is computed on the host from the ForwardContext's host tuples and the block-table width
(a shape), then copied to the device in one transfer; the cache slots of the context tokens come
from one device gather of the block table. Nothing reads a device tensor on the host. The plan
depends on the batch only, so the first MLA layer of a step builds it and the others reuse it
(`ForwardContext.derived`).

Shapes: T new tokens, B sequences, W block-table width, bs block size; Bd decode rows; Bp prefill
sequences owning Tp new tokens and Sp context tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from deepserve.forward_context import ForwardContext


@dataclass(frozen=True)
class DecodeRows:
    tokens: torch.Tensor  # [Bd] int64, the flat-batch row of each decode row's token
    seqs: torch.Tensor  # [Bd] int64, its sequence (row of block_tables / seq_lens)
    max_seq_len: int  # longest context among them (host int: the decode kernel's split count)


@dataclass(frozen=True)
class PrefillSeqs:
    tokens: torch.Tensor | None  # [Tp] int64 flat-batch rows of their new tokens; None: all T rows
    cu_q: torch.Tensor  # [Bp + 1] int32, cumulative new tokens
    cu_k: torch.Tensor  # [Bp + 1] int32, cumulative context tokens
    slots: torch.Tensor  # [Sp] int64, cache slot of each context token, sequence by sequence


@dataclass(frozen=True)
class MLABatchPlan:
    decode: DecodeRows | None  # None: no decode rows (or not split off)
    prefill: PrefillSeqs | None  # None: no other sequences


def _cumsum0(x: np.ndarray) -> np.ndarray:
    out = np.zeros(x.size + 1, dtype=np.int64)
    np.cumsum(x, out=out[1:])
    return out


def _ranges(starts: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated ranges starts[i] .. starts[i] + lens[i] - 1 -> (owner i, value), each [sum(lens)]."""
    owner = np.repeat(np.arange(lens.size), lens)
    offset = np.arange(int(lens.sum())) - _cumsum0(lens)[owner]
    return owner, starts[owner] + offset


def plan_mla_batch(ctx: ForwardContext, split_decode_rows: bool) -> MLABatchPlan:
    """The split of `ctx`'s batch (see the module doc), its index tensors on ctx's device."""
    q_lens = np.asarray(ctx.query_lens_cpu, dtype=np.int64)
    s_lens = np.asarray(ctx.seq_lens_cpu, dtype=np.int64)
    q_starts = _cumsum0(q_lens)
    is_decode = (q_lens == 1) if split_decode_rows else np.zeros(q_lens.size, dtype=bool)
    dec, pre = np.flatnonzero(is_decode), np.flatnonzero(~is_decode)
    if pre.size:
        _, pre_tokens = _ranges(q_starts[pre], q_lens[pre])  # [Tp]
        k_owner, pos = _ranges(np.zeros(pre.size, dtype=np.int64), s_lens[pre])  # [Sp] each
        width, bs = ctx.block_tables.shape[1], ctx.block_size
        flat_block = pre[k_owner] * width + pos // bs  # [Sp] index into block_tables.flatten()
        pre_parts = [_cumsum0(q_lens[pre]), _cumsum0(s_lens[pre]), pre_tokens, flat_block, pos % bs]
    else:
        pre_parts = []
    parts = [dec, q_starts[dec], *pre_parts]
    host = torch.from_numpy(np.concatenate(parts).astype(np.int64))
    dev = host.to(ctx.block_tables.device, non_blocking=True).split([p.size for p in parts])
    decode = None
    if dec.size:
        decode = DecodeRows(tokens=dev[1], seqs=dev[0], max_seq_len=int(s_lens[dec].max()))
    if not pre.size:
        return MLABatchPlan(decode, None)
    cu_q, cu_k, tokens, flat_block, offset = dev[2:]
    blocks = ctx.block_tables.reshape(-1).index_select(0, flat_block).long()  # [Sp]
    prefill = PrefillSeqs(tokens=tokens if dec.size else None, cu_q=cu_q.to(torch.int32),
                          cu_k=cu_k.to(torch.int32), slots=blocks * ctx.block_size + offset)
    return MLABatchPlan(decode, prefill)
