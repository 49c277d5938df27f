"""Run a model through the paged KV cache without the scheduler: prefill in chunks, then decode.

Used by model tests to compare against HF transformers and to check batch invariance. Each
sequence gets its own blocks (no sharing), allocated in order.
"""

from __future__ import annotations

import torch

from deepserve.engine.kv_cache import allocate_kv_caches, bind_kv_cache
from deepserve.forward_context import build_forward_context, forward_context

BLOCK = 16


class PagedRunner:
    def __init__(self, model, num_blocks: int = 256, block_size: int = BLOCK, dtype=torch.float32):
        self.model, self.block_size = model, block_size
        bind_kv_cache(model, allocate_kv_caches(model, num_blocks, block_size, dtype, "cpu"))
        self.next_block = 1  # block 0 stays unused so padding never aliases live data
        self.tables: list[list[int]] = []
        self.lens: list[int] = []

    def new_seq(self) -> int:
        self.tables.append([])
        self.lens.append(0)
        return len(self.tables) - 1

    def _grow(self, sid: int, new_len: int) -> None:
        while len(self.tables[sid]) * self.block_size < new_len:
            self.tables[sid].append(self.next_block)
            self.next_block += 1

    @torch.no_grad()
    def step(self, chunks: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        """Feed `chunks[sid]` new tokens to each sequence; return last-token logits [vocab] per sid."""
        sids = list(chunks)
        for sid in sids:
            self._grow(sid, self.lens[sid] + len(chunks[sid]))
        q_lens = [len(chunks[s]) for s in sids]
        s_lens = [self.lens[s] + len(chunks[s]) for s in sids]
        ctx = build_forward_context(q_lens, s_lens, [self.tables[s] for s in sids], self.block_size)
        ids = torch.tensor([t for s in sids for t in chunks[s]], dtype=torch.int64)
        with forward_context(ctx):
            hidden = self.model(ids, ctx.positions)
        last = torch.cumsum(torch.tensor(q_lens), 0) - 1  # [num_seqs] last new token of each
        logits = self.model.compute_logits(hidden[last])
        for s in sids:
            self.lens[s] += len(chunks[s])
        return {s: logits[i] for i, s in enumerate(sids)}

    def greedy(self, prompt: list[int], steps: int, chunk: int | None = None) -> tuple[list[int], list[torch.Tensor]]:
        """Greedy continuation of one prompt; returns the new tokens and each step's logits."""
        sid = self.new_seq()
        chunk = chunk or len(prompt)
        out_logits = []
        for i in range(0, len(prompt), chunk):
            logits = self.step({sid: prompt[i:i + chunk]})[sid]
        tokens = []
        for _ in range(steps):
            out_logits.append(logits)
            tokens.append(int(logits.argmax()))
            logits = self.step({sid: [tokens[-1]]})[sid]
        return tokens, out_logits
