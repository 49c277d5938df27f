"""MTP proposer: after the main model's step, run the MTP layer over the step's positions and chain
it for k drafts per greedy sequence.

For a scheduled entry with new tokens at positions start .. start + n - 1, the main model's hidden
states h_i are known there, but only the first m have a known next token t_{i+1}: m = n for a
prefill chunk short of the end; otherwise the tokens fed minus the rejected drafts (t_{i+1} from
the prompt / previous output, the accepted drafts and the bonus token). The MTP layer runs on
positions start .. start + m - 1 (writing its KV there, over the main model's block table) and its
last row proposes d_1; pass j > 1 feeds (y, d_{j-1}) at the next position (decode-only). Those
chained passes write MTP KV past the verified tokens (the scheduler's lookahead slots); the next
step's first pass overwrites it before anything reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence as Seq

import torch

from deepserve.engine.kv_cache import allocate_kv_caches, allocate_kv_scales, bind_kv_cache, bind_split_counters
from deepserve.engine.scheduler import ScheduledSeq
from deepserve.forward_context import build_forward_context, forward_context
from deepserve.models.deepseek_mtp import DeepseekMTP


@dataclass
class _Chain:
    """One sequence's drafting state between chained passes."""

    request_id: str
    block_table: list[int]
    position: int  # of the next MTP query
    num_drafts: int  # to propose
    drafts: list[int]


class MTPProposer:
    def __init__(self, mtp: DeepseekMTP, num_speculative_tokens: int, num_blocks: int, block_size: int,
                 max_model_len: int, device: torch.device | str, kv_cache_dtype: torch.dtype | None = None,
                 max_num_seqs: int = 0):
        self.mtp = mtp
        self.k = num_speculative_tokens
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.device = torch.device(device)
        dtype = kv_cache_dtype or next(mtp.parameters()).dtype  # the main model's cache format (8-bit: + scales)
        self.kv_caches = allocate_kv_caches(mtp, num_blocks, block_size, dtype, self.device)
        self.kv_scales = allocate_kv_scales(self.kv_caches)  # empty unless the cache is 8-bit
        bind_kv_cache(mtp, self.kv_caches, self.kv_scales)
        if max_num_seqs > 0:  # the fused split-K merge of its decode passes (ModelRunner's max_num_seqs)
            bind_split_counters(mtp, max_num_seqs, self.device)

    @torch.inference_mode()
    def propose(self, scheduled: Seq[ScheduledSeq], hidden: torch.Tensor,
                sampled: Mapping[str, list[int]]) -> dict[str, list[int]]:
        """hidden [num_tokens, H]: the main model's step; sampled: request id -> accepted run.
        Returns request id -> drafts for the greedy sequences whose chunk reached its end."""
        rows, ids, entries, lens = [], [], [], []
        offset = 0
        for entry in scheduled:
            if entry.seq.params.greedy:
                next_ids = _next_tokens(entry, sampled.get(entry.seq.request_id, []))
                rows.extend(range(offset, offset + len(next_ids)))
                ids.extend(next_ids)
                entries.append(entry)
                lens.append(len(next_ids))
            offset += entry.num_new_tokens
        if not entries:
            return {}
        out = self._run(ids, [e.start for e in entries], lens, [e.seq.block_table for e in entries],
                        hidden[torch.tensor(rows, dtype=torch.int64, device=hidden.device)])
        return self._chain(entries, lens, out)

    def _run(self, ids: list[int], starts: list[int], lens: list[int], tables: list[list[int]],
             previous: torch.Tensor) -> torch.Tensor:
        """One MTP pass: sequence i queries positions starts[i] .. starts[i] + lens[i] - 1; -> [T, H]."""
        ctx = build_forward_context(query_lens=lens, seq_lens=[s + n for s, n in zip(starts, lens)],
                                    block_tables=tables, block_size=self.block_size, device=self.device)
        input_ids = torch.tensor(ids, dtype=torch.int64).to(self.device)
        with forward_context(ctx):
            return self.mtp(input_ids, ctx.positions, previous)

    def _chain(self, entries: list[ScheduledSeq], lens: list[int], out: torch.Tensor) -> dict[str, list[int]]:
        """Draft from each sampled entry's last row, then chain decode-only passes."""
        last = torch.tensor(lens, device=out.device).cumsum(0) - 1  # [E] last row per entry
        chains, keep = [], []
        for i, entry in enumerate(entries):
            position = entry.start + lens[i]  # the bonus token's; d_1 goes one further
            num = min(self.k, self.max_model_len - 1 - position)
            if entry.is_last_chunk and num > 0:
                chains.append(_Chain(entry.seq.request_id, entry.seq.block_table, position, num, []))
                keep.append(i)
        hidden = out[last[keep]] if keep else out[:0]  # [C, H]
        while chains:
            tokens = self.mtp.compute_logits(hidden).argmax(dim=-1).tolist()  # [C]
            for chain, token in zip(chains, tokens):
                chain.drafts.append(token)
            alive = [i for i, c in enumerate(chains) if len(c.drafts) < c.num_drafts]
            if not alive:
                break
            hidden = self._step([chains[i] for i in alive], hidden[alive])
        return {c.request_id: c.drafts for c in chains}

    def _step(self, chains: list[_Chain], hidden: torch.Tensor) -> torch.Tensor:
        """A chained pass: each chain's last draft at its next position -> [C, H]."""
        out = self._run([c.drafts[-1] for c in chains], [c.position for c in chains], [1] * len(chains),
                        [c.block_table for c in chains], hidden)
        for c in chains:
            c.position += 1
        return out


def _next_tokens(entry: ScheduledSeq, run: list[int]) -> list[int]:
    """t_{i+1} for the entry's positions whose next token is known this step (see module doc)."""
    seq = entry.seq
    if not entry.is_last_chunk:
        return seq.token_ids[entry.start + 1:entry.start + entry.num_new_tokens + 1]
    return seq.token_ids[entry.start + 1:] + list(run)
