"""BlockManager: ref counts, prefix caching by chained block hashes, LRU eviction, no leaks."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepserve.engine.block_manager import NULL_BLOCK, BlockManager, cdiv, hash_block
from deepserve.engine.sequence import Sequence
from deepserve.sampling_params import SamplingParams


def make_seq(rid: str, tokens: list[int]) -> Sequence:
    return Sequence(rid, tokens, SamplingParams(max_tokens=1000))


def compute(bm: BlockManager, seq: Sequence, hits: list[int] = ()) -> None:
    """What one scheduled step does to a sequence: allocate, run all its tokens, register blocks."""
    num_cached = len(hits) * bm.block_size
    assert bm.allocate_slots(seq, seq.num_uncomputed_tokens - num_cached, hits)
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_computed_blocks(seq)


def admit(bm: BlockManager, seq: Sequence) -> list[int]:
    """First schedule with prefix hits; returns the hit blocks."""
    hits = bm.get_computed_blocks(seq)
    compute(bm, seq, hits=hits)
    return hits


# ----- allocation and ref counts ---------------------------------------------------------------

def test_allocate_and_free_track_ref_counts_and_usage():
    bm = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    seq = make_seq("a", list(range(10)))
    assert bm.allocate_slots(seq, 10)
    assert len(seq.block_table) == 3 and NULL_BLOCK not in seq.block_table
    assert [bm.ref_count(b) for b in seq.block_table] == [1, 1, 1]
    assert bm.num_free_blocks == 6 and bm.usage == pytest.approx(3 / 9)
    table = list(seq.block_table)
    bm.free(seq)
    assert seq.block_table == [] and [bm.ref_count(b) for b in table] == [0, 0, 0]
    assert bm.num_free_blocks == 9 and bm.usage == 0.0


def test_table_grows_only_when_a_block_fills():
    bm = BlockManager(10, 4, enable_prefix_caching=False)
    seq = make_seq("a", list(range(7)))
    compute(bm, seq)
    assert len(seq.block_table) == 2
    seq.append_token(7)
    compute(bm, seq)  # token 8 fits the second block
    assert len(seq.block_table) == 2
    seq.append_token(8)
    compute(bm, seq)  # token 9 needs a third
    assert len(seq.block_table) == 3


def test_failed_allocation_changes_nothing():
    bm = BlockManager(num_blocks=4, block_size=4)  # 3 usable blocks
    seq = make_seq("a", list(range(13)))
    assert not bm.allocate_slots(seq, 13)
    assert seq.block_table == [] and bm.num_free_blocks == 3
    assert bm.allocate_slots(seq, 12)


def test_null_block_is_never_handed_out():
    bm = BlockManager(num_blocks=6, block_size=1)
    seqs = [make_seq(str(i), [i]) for i in range(5)]
    for seq in seqs:
        assert bm.allocate_slots(seq, 1)
    assert sorted(b for s in seqs for b in s.block_table) == [1, 2, 3, 4, 5]
    assert not bm.allocate_slots(make_seq("x", [9]), 1)


def test_double_release_is_an_error():
    bm = BlockManager(4, 4)
    seq = make_seq("a", [1, 2])
    bm.allocate_slots(seq, 2)
    table = list(seq.block_table)
    bm.free(seq)
    seq.block_table = table
    with pytest.raises(RuntimeError):
        bm.free(seq)


# ----- prefix caching --------------------------------------------------------------------------

def test_shared_prefix_shares_physical_blocks():
    bm = BlockManager(20, 4)
    a = make_seq("a", list(range(10)))
    admit(bm, a)
    b = make_seq("b", list(range(8)) + [77, 78, 79])
    hits = admit(bm, b)
    assert hits == a.block_table[:2]
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert [bm.ref_count(x) for x in a.block_table] == [2, 2, 1]


def test_different_tokens_do_not_share():
    bm = BlockManager(20, 4)
    a = make_seq("a", list(range(10)))
    admit(bm, a)
    assert bm.get_computed_blocks(make_seq("b", [99] + list(range(1, 10)))) == []
    assert bm.get_computed_blocks(make_seq("c", list(range(5)) + [99] * 5)) == a.block_table[:1]


def test_block_key_is_chained_on_the_parent():
    block = [5, 6, 7, 8]
    parent_a, parent_b = hash_block(b"", [1, 2, 3, 4]), hash_block(b"", [0, 2, 3, 4])
    assert hash_block(parent_a, block) != hash_block(parent_b, block)
    assert hash_block(b"", [1, 2]) == hash_block(b"", [1, 2]) != hash_block(b"", [2, 1])


def test_full_prompt_hit_leaves_the_last_token_to_compute():
    bm = BlockManager(20, 4)
    admit(bm, make_seq("a", list(range(8))))
    b = make_seq("b", list(range(8)))
    assert len(bm.get_computed_blocks(b)) == 1  # not 2: token 7 must run to produce logits
    admit(bm, b)
    assert b.num_computed_tokens == 8 and b.block_table[0] == bm.get_computed_blocks(b)[0]


def test_only_computed_full_blocks_are_cached():
    bm = BlockManager(20, 4)
    a = make_seq("a", list(range(10)))
    assert bm.allocate_slots(a, 10)  # allocated, not yet computed
    assert bm.get_computed_blocks(make_seq("b", list(range(10)))) == []
    a.num_computed_tokens = 6
    bm.cache_computed_blocks(a)
    assert bm.get_computed_blocks(make_seq("c", list(range(10)))) == a.block_table[:1]


def test_blocks_filled_by_decode_tokens_are_cached():
    bm = BlockManager(20, 4)
    a = make_seq("a", [1, 2, 3])
    compute(bm, a)
    for token in (4, 5, 6, 7, 8):
        a.append_token(token)
        compute(bm, a)
    assert a.num_computed_tokens == 8
    assert bm.get_computed_blocks(make_seq("b", [1, 2, 3, 4, 5, 6, 7, 8, 9])) == a.block_table[:2]


def test_freed_cached_blocks_stay_evictable_and_a_hit_revives_them():
    bm = BlockManager(10, 4)
    a = make_seq("a", list(range(9)))
    admit(bm, a)
    table = list(a.block_table)
    bm.free(a)
    assert bm.num_evictable_blocks == 2 and bm.num_free_blocks == 9 and bm.usage == 0.0
    b = make_seq("b", list(range(9)))
    assert admit(bm, b) == table[:2]
    assert [bm.ref_count(x) for x in table[:2]] == [1, 1] and bm.num_evictable_blocks == 0


def test_hit_rate_counts_queried_and_hit_tokens():
    bm = BlockManager(20, 4)
    admit(bm, make_seq("a", list(range(9))))
    admit(bm, make_seq("b", list(range(9))))
    stats = bm.stats()
    assert (stats.prefix_queried_tokens, stats.prefix_hit_tokens) == (18, 8)
    assert stats.prefix_hit_rate == pytest.approx(8 / 18)


def test_prefix_caching_off_never_hits_nor_keeps_blocks():
    bm = BlockManager(10, 4, enable_prefix_caching=False)
    a = make_seq("a", list(range(9)))
    admit(bm, a)
    bm.free(a)
    assert bm.num_evictable_blocks == 0
    assert bm.get_computed_blocks(make_seq("b", list(range(9)))) == []


# ----- eviction --------------------------------------------------------------------------------

def _cached_pair(bm: BlockManager, rid: str, first: int) -> Sequence:
    """A finished request whose 2 full blocks (block size 2) stay cached."""
    seq = make_seq(rid, [first, first + 1, first + 2, first + 3])
    admit(bm, seq)
    bm.free(seq)
    return seq


def _evict(bm: BlockManager, n: int) -> None:
    assert bm.allocate_slots(make_seq(f"hog{n}", [0] * 2 * n), 2 * n)


def test_least_recently_freed_is_evicted_first():
    bm = BlockManager(num_blocks=7, block_size=2)  # 6 usable
    _cached_pair(bm, "a", 10)
    _cached_pair(bm, "b", 20)
    _evict(bm, 4)  # 2 free blocks, then A's 2 cached ones
    assert bm.get_computed_blocks(make_seq("a2", [10, 11, 12, 13, 0])) == []
    assert len(bm.get_computed_blocks(make_seq("b2", [20, 21, 22, 23, 0]))) == 2


def test_a_revived_block_becomes_most_recent():
    bm = BlockManager(num_blocks=7, block_size=2)
    _cached_pair(bm, "a", 10)
    _cached_pair(bm, "b", 20)
    again = make_seq("a-again", [10, 11, 12, 13, 0])
    admit(bm, again)  # revives A's blocks, takes a free block for the partial third
    bm.free(again)  # A is now freed after B; the partial block goes back to the free list
    _evict(bm, 4)  # 2 free blocks, then B's two
    assert len(bm.get_computed_blocks(make_seq("a3", [10, 11, 12, 13, 0]))) == 2
    assert bm.get_computed_blocks(make_seq("b3", [20, 21, 22, 23, 0])) == []


def test_a_requests_tail_is_evicted_before_its_prefix():
    bm = BlockManager(num_blocks=5, block_size=2)  # 4 usable
    _cached_pair(bm, "a", 10)
    _evict(bm, 3)  # 2 free blocks, then A's second block
    assert len(bm.get_computed_blocks(make_seq("a2", [10, 11, 12, 13, 0]))) == 1


def test_hit_after_eviction_is_a_miss():
    bm = BlockManager(num_blocks=4, block_size=2)  # 3 usable
    _cached_pair(bm, "a", 10)
    _evict(bm, 3)
    a2 = make_seq("a2", [10, 11, 12, 13, 0])
    assert bm.get_computed_blocks(a2) == []


def test_eviction_policy_is_pluggable():
    class MostRecentFirst:
        def __init__(self):
            self.order: list[int] = []

        def add(self, b):
            self.order.append(b)

        def remove(self, b):
            self.order.remove(b)

        def pop(self):
            return self.order.pop()

        def __len__(self):
            return len(self.order)

        def __contains__(self, b):
            return b in self.order

    bm = BlockManager(num_blocks=7, block_size=2, eviction_policy=MostRecentFirst())
    _cached_pair(bm, "a", 10)
    _cached_pair(bm, "b", 20)
    _evict(bm, 4)
    assert len(bm.get_computed_blocks(make_seq("a2", [10, 11, 12, 13, 0]))) == 2
    assert bm.get_computed_blocks(make_seq("b2", [20, 21, 22, 23, 0])) == []


# ----- property: random life cycles never leak or corrupt blocks -------------------------------

class SlotStore:
    """Fake KV cache: each slot remembers the token written there, so a wrong hit shows."""

    def __init__(self, bm: BlockManager):
        self.bm, self.slots = bm, {}

    def slot(self, seq: Sequence, pos: int) -> int:
        block = seq.block_table[pos // self.bm.block_size]
        assert block != NULL_BLOCK
        return block * self.bm.block_size + pos % self.bm.block_size

    def run(self, seq: Sequence, n: int) -> None:
        start = seq.num_computed_tokens
        for pos in range(start):
            assert self.slots[self.slot(seq, pos)] == seq.token_ids[pos], "stale or foreign KV"
        for pos in range(start, start + n):
            self.slots[self.slot(seq, pos)] = seq.token_ids[pos]


def check_invariants(bm: BlockManager, live: list[Sequence]) -> None:
    holders: dict[int, int] = {}
    for seq in live:
        assert len(set(seq.block_table)) == len(seq.block_table)
        assert len(seq.block_table) >= cdiv(seq.num_computed_tokens, bm.block_size)
        for b in seq.block_table:
            holders[b] = holders.get(b, 0) + 1
    assert NULL_BLOCK not in holders
    for b in range(1, bm.num_blocks + 1):
        assert bm.ref_count(b) == holders.get(b, 0) >= 0
        assert holders.get(b, 0) <= 1 or bm.is_cached(b), "shared block that is not a cached prefix"
    assert bm.num_free_blocks + len(holders) == bm.num_blocks


class Driver:
    """A minimal scheduler over the block manager alone: random chunks, preempt on failure."""

    def __init__(self, bm: BlockManager, rng: random.Random):
        self.bm, self.rng, self.kv, self.live = bm, rng, SlotStore(bm), []
        self.count = 0

    def add(self) -> None:
        base = self.rng.choice([[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 9, 9, 9], [4, 4, 4, 4]])
        tail = [self.rng.randrange(3) for _ in range(self.rng.randrange(4))]
        tokens = base[: self.rng.randint(1, len(base))] + tail
        self.count += 1
        self.live.append(make_seq(f"r{self.count}", tokens))

    def step(self) -> None:
        for seq in self.live:
            hits = [] if seq.block_table else self.bm.get_computed_blocks(seq)
            start = seq.num_computed_tokens + len(hits) * self.bm.block_size
            n = self.rng.randint(1, seq.num_tokens - start)
            if not self.bm.allocate_slots(seq, n, hits):
                self.bm.free(seq)  # preempted: recompute from scratch later
                seq.num_computed_tokens = 0
                continue
            seq.num_computed_tokens = start
            self.kv.run(seq, n)
            seq.num_computed_tokens += n
            self.bm.cache_computed_blocks(seq)
            if seq.num_computed_tokens == seq.num_tokens:
                seq.append_token(self.rng.randrange(3))

    def remove(self) -> None:
        if self.live:
            self.bm.free(self.live.pop(self.rng.randrange(len(self.live))))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num_blocks=st.integers(2, 24), block_size=st.sampled_from([1, 2, 4]),
       prefix_caching=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_random_cycles_never_leak_blocks(num_blocks, block_size, prefix_caching, seed):
    bm = BlockManager(num_blocks, block_size, prefix_caching)
    rng = random.Random(seed)
    driver = Driver(bm, rng)
    for _ in range(1000):
        op = rng.choice(["add", "step", "step", "step", "finish", "abort"])
        {"add": driver.add, "step": driver.step, "finish": driver.remove, "abort": driver.remove}[op]()
        check_invariants(bm, driver.live)
    while driver.live:
        driver.remove()
    assert bm.num_free_blocks == bm.num_blocks and bm.usage == 0.0
    assert all(bm.ref_count(b) == 0 for b in range(bm.num_blocks + 1))
