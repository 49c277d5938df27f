"""Paged KV-cache blocks: ref counts, automatic prefix caching, pluggable eviction.

Block 0 is the null block: padded block tables point at it, so it is never handed out.

Life of a block:
  * free        ref_count 0, no hash; in the free list.
  * in use      ref_count > 0; listed in the block table of every sequence that reads it.
  * evictable   ref_count 0 but hashed: it still holds a cached prefix and can be revived by a hit
                or evicted (the eviction policy picks which; default: least recently freed first).
Allocation takes free blocks first, then evicts.

Prefix caching: a full block is keyed by a chained SHA-256, hash(parent hash + its token ids), so
equal prefixes get equal keys. A block is registered once all its tokens are computed (the
scheduler calls `cache_computed_blocks(seq)` after every step, decode steps included); a request's
first allocation may reuse the longest chain of registered blocks (`get_computed_blocks`), always
leaving at least one token to compute so the model produces logits for the last prompt token.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Iterable, Protocol

from deepserve.config import CacheConfig
from deepserve.engine.sequence import Sequence

NULL_BLOCK = 0


def hash_block(parent_hash: bytes, token_ids: list[int]) -> bytes:
    """Chained key of one full block: SHA-256 of the parent block's key + the token ids (int64 LE)."""
    return hashlib.sha256(parent_hash + struct.pack(f"<{len(token_ids)}q", *token_ids)).digest()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None  # set while the block is registered in the prefix cache


class EvictionPolicy(Protocol):
    """Orders the evictable (unreferenced, cached) blocks."""

    def add(self, block_id: int) -> None: ...  # the block's ref count fell to 0
    def remove(self, block_id: int) -> None: ...  # the block was revived by a prefix hit
    def pop(self) -> int: ...  # the next victim
    def __len__(self) -> int: ...
    def __contains__(self, block_id: object) -> bool: ...


class LRUEvictionPolicy:
    """The block unreferenced for longest (least recently freed) is evicted first."""

    def __init__(self) -> None:
        self._order: OrderedDict[int, None] = OrderedDict()

    def add(self, block_id: int) -> None:
        self._order[block_id] = None

    def remove(self, block_id: int) -> None:
        del self._order[block_id]

    def pop(self) -> int:
        return self._order.popitem(last=False)[0]

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, block_id: object) -> bool:
        return block_id in self._order


@dataclass(frozen=True)
class BlockManagerStats:
    num_blocks: int  # usable blocks (the null block excluded)
    num_free_blocks: int  # allocatable now: free + evictable
    num_evictable_blocks: int  # unreferenced but still cached
    usage: float  # fraction of usable blocks referenced by live sequences
    prefix_queried_tokens: int  # cumulative: tokens of requests looked up at admission
    prefix_hit_tokens: int  # cumulative: of those, tokens served from the prefix cache

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_queried_tokens if self.prefix_queried_tokens else 0.0


@dataclass
class _RequestHashes:
    hashes: list[bytes] = field(default_factory=list)  # keys of the request's first full blocks
    num_registered: int = 0  # table entries already offered to the prefix cache


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 eviction_policy: EvictionPolicy | None = None):
        if num_blocks < 2 or block_size < 1:
            raise ValueError(f"need num_blocks >= 2 (block 0 is reserved) and block_size >= 1, "
                             f"got {num_blocks} and {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(1, num_blocks))
        self._evictor: EvictionPolicy = LRUEvictionPolicy() if eviction_policy is None else eviction_policy
        self._cached: dict[bytes, int] = {}  # block key -> block id
        self._requests: dict[str, _RequestHashes] = {}
        self._queried_tokens = 0
        self._hit_tokens = 0

    @classmethod
    def from_config(cls, cache: CacheConfig) -> "BlockManager":
        if cache.num_blocks is None:
            raise ValueError("CacheConfig.num_blocks is unresolved; size the KV cache first")
        return cls(cache.num_blocks, cache.block_size, cache.enable_prefix_caching)

    # ----- plain stats -----------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self._blocks) - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictor)

    @property
    def num_evictable_blocks(self) -> int:
        return len(self._evictor)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self._blocks[block_id].ref_count

    def is_cached(self, block_id: int) -> bool:
        return self._blocks[block_id].block_hash is not None

    def stats(self) -> BlockManagerStats:
        return BlockManagerStats(self.num_blocks, self.num_free_blocks, self.num_evictable_blocks,
                                 self.usage, self._queried_tokens, self._hit_tokens)

    # ----- the scheduler's calls -------------------------------------------------------------
    def get_computed_blocks(self, seq: Sequence) -> list[int]:
        """Longest chain of cached blocks prefixing `seq`, leaving >= 1 token to compute. Read only:
        pass the result straight to `allocate_slots` to take the blocks."""
        if not self.enable_prefix_caching:
            return []
        num_blocks = (seq.num_tokens - 1) // self.block_size
        keys = self._hashes(seq, num_blocks)
        hits: list[int] = []
        for i in range(num_blocks):
            block_id = self._cached.get(keys[i])
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def allocate_slots(self, seq: Sequence, num_new_tokens: int, computed_blocks: Iterable[int] = ()) -> bool:
        """Grow `seq.block_table` to hold its computed tokens, then `computed_blocks` (prefix hits,
        first allocation only) and `num_new_tokens` more. All or nothing: on False (not enough
        free + evictable blocks) nothing changed."""
        hits = list(computed_blocks)
        num_tokens = seq.num_computed_tokens + len(hits) * self.block_size + num_new_tokens
        num_needed = cdiv(num_tokens, self.block_size) - len(seq.block_table) - len(hits)
        num_revived = sum(1 for b in hits if b in self._evictor)
        if num_needed > self.num_free_blocks - num_revived:
            return False
        if not seq.block_table:
            self._record_lookup(seq, len(hits))
        for block_id in hits:  # revive before taking new blocks, so the hits are not evicted
            self._acquire(block_id)
        seq.block_table.extend(hits)
        seq.block_table.extend(self._take_block() for _ in range(num_needed))
        return True

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Register the blocks that `seq.num_computed_tokens` has filled since the last call."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        known = self._requests.get(seq.request_id)
        if known is not None and num_full <= known.num_registered:
            return  # no block filled since the last call (most decode steps)
        keys = self._hashes(seq, num_full)
        state = self._requests[seq.request_id]
        for i in range(state.num_registered, num_full):
            self._register(seq.block_table[i], keys[i])
        state.num_registered = max(state.num_registered, num_full)

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references, tail first, so its prefix blocks are evicted last."""
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table = []
        self._requests.pop(seq.request_id, None)

    # ----- helpers ---------------------------------------------------------------------------
    def _hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """Keys of at least `seq`'s first `num_blocks` full blocks (memoised: token ids only grow)."""
        state = self._requests.setdefault(seq.request_id, _RequestHashes())
        size = self.block_size
        while len(state.hashes) < num_blocks:
            i = len(state.hashes)
            parent = state.hashes[-1] if i else b""
            state.hashes.append(hash_block(parent, seq.token_ids[i * size:(i + 1) * size]))
        return state.hashes

    def _record_lookup(self, seq: Sequence, num_hit_blocks: int) -> None:
        if self.enable_prefix_caching:
            self._queried_tokens += seq.num_tokens
            self._hit_tokens += num_hit_blocks * self.block_size

    def _acquire(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_count == 0:
            self._evictor.remove(block_id)
        block.ref_count += 1

    def _take_block(self) -> int:
        block_id = self._free.popleft() if self._free else self._evict()
        self._blocks[block_id].ref_count = 1
        return block_id

    def _evict(self) -> int:
        block = self._blocks[self._evictor.pop()]
        if self._cached.get(block.block_hash) == block.block_id:
            del self._cached[block.block_hash]
        block.block_hash = None
        return block.block_id

    def _release(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_count <= 0:
            raise RuntimeError(f"block {block_id} released more often than acquired")
        block.ref_count -= 1
        if block.ref_count == 0:
            (self._evictor.add if block.block_hash is not None else self._free.append)(block_id)

    def _register(self, block_id: int, key: bytes) -> None:
        """Cache the block under `key` unless it is cached already or another block holds the key
        (two requests computed the same prefix at once; the later copy stays private)."""
        block = self._blocks[block_id]
        if block.block_hash is None and key not in self._cached:
            block.block_hash = key
            self._cached[key] = block_id
