"""Paged KV block pool and manager: allocation, reference counts, prefix caching, eviction."""
import pytest

from lmsmith.serve.kv_blocks import BlockPool, KVBlockManager, blocks_for_tokens, hash_block, root_hash
from lmsmith.serve.request import Request

BS = 4  # block size used throughout


def req(rid: str, tokens, salt=None) -> Request:
    return Request(rid, tuple(tokens), arrival_time=0.0, cache_salt=salt)


def compute(manager: KVBlockManager, request: Request, num_new: int) -> int:
    """What the scheduler + runner do for one step: allocate, 'run', advance, publish."""
    cached = manager.allocate_for(request, num_new)
    assert cached is not None
    request.num_computed_tokens += cached + num_new
    manager.mark_computed(request)
    manager.check_invariants()
    return cached


def prefill(manager: KVBlockManager, request: Request) -> int:
    """Compute the whole prompt (minus what the cache already holds); returns cached tokens."""
    cached = manager.num_cached_prefix_tokens(request)
    return compute(manager, request, request.num_tokens - cached)


# -- BlockPool --

@pytest.mark.parametrize("num_blocks, block_size", [(0, 4), (4, 0), (-1, 4), (2.5, 4)])
def test_pool_rejects_bad_sizes(num_blocks, block_size):
    with pytest.raises(ValueError, match="must be an int >= 1"):
        BlockPool(num_blocks, block_size)


def test_pool_allocate_release_round_trip():
    pool = BlockPool(3, BS)
    ids = [pool.allocate() for _ in range(3)]
    assert sorted(ids) == [0, 1, 2] and pool.num_free == 0
    assert all(pool.ref_count(b) == 1 for b in ids)
    with pytest.raises(RuntimeError, match="all 3 KV blocks are in use"):
        pool.allocate()
    for b in ids:
        pool.release(b)
    assert pool.num_free == 3
    pool.check_invariants()


def test_pool_release_too_often_is_caught():
    pool = BlockPool(2, BS)
    b = pool.allocate()
    pool.release(b)
    with pytest.raises(AssertionError, match="released more often"):
        pool.release(b)


def test_pool_prefers_uncached_blocks_then_evicts_lru_cached():
    pool = BlockPool(3, BS)
    a, b, c = (pool.allocate() for _ in range(3))
    pool.publish(a, b"ha")
    pool.publish(b, b"hb")
    pool.release(a)  # cached, released first → least recently used
    pool.release(b)  # cached
    pool.release(c)  # never cached → handed out first
    assert pool.allocate() == c and pool.lookup(b"ha") == a and pool.lookup(b"hb") == b
    assert pool.allocate() == a and pool.lookup(b"ha") is None  # LRU eviction
    assert pool.lookup(b"hb") == b
    pool.check_invariants()


def test_pool_invariant_check_detects_corruption():
    pool = BlockPool(2, BS)
    b = pool.allocate()
    pool._free[b] = None  # a referenced block also in the free queue
    with pytest.raises(AssertionError, match="in_free_queue=True"):
        pool.check_invariants()


def test_hash_is_chained_and_fixed_width():
    root = root_hash(None)
    assert hash_block(root, [1, 2]) == hash_block(root, [1, 2])
    assert hash_block(root, [1, 23]) != hash_block(root, [12, 3])
    assert hash_block(hash_block(root, [9]), [1, 2]) != hash_block(root, [1, 2])
    assert root_hash("tenant-a") != root_hash("tenant-b") != root_hash(None)
    assert blocks_for_tokens(0, 4) == 0 and blocks_for_tokens(4, 4) == 1 and blocks_for_tokens(5, 4) == 2


# -- KVBlockManager --

def test_allocate_grows_table_block_by_block():
    m = KVBlockManager(8, BS)
    r = req("a", range(6))
    assert compute(m, r, 6) == 0
    assert len(r.block_table) == 2 and m.num_free_blocks == 6
    compute(m, r, 1)  # 7 tokens: still 2 blocks
    compute(m, r, 1)  # 8 tokens
    assert len(r.block_table) == 2
    r.output_token_ids.extend([1, 2, 3])  # tokens the table must now hold
    compute(m, r, 1)  # 9th token starts block 3
    assert len(r.block_table) == 3 and m.num_free_blocks == 5
    assert m.usage == pytest.approx(3 / 8)


def test_allocation_that_does_not_fit_changes_nothing():
    m = KVBlockManager(2, BS)
    r = req("a", range(12))
    assert not m.can_allocate(r, 12)
    assert m.allocate_for(r, 12) is None
    assert r.block_table == [] and m.num_free_blocks == 2
    assert m.can_allocate(r, 8)
    with pytest.raises(ValueError, match="num_new_tokens=-1"):
        m.can_allocate(r, -1)
    m.check_invariants()


def test_free_is_idempotent_and_returns_all_blocks():
    m = KVBlockManager(4, BS)
    r = req("a", range(10))
    prefill(m, r)
    assert m.num_free_blocks == 1
    m.free(r)
    m.free(r)
    m.free(req("never-allocated", [1]))
    assert m.num_free_blocks == 4 and r.block_table == []
    m.check_invariants()


def test_shared_prefix_is_computed_once():
    m = KVBlockManager(16, BS)
    a = req("a", list(range(10)))  # 2 full blocks + 2 tokens
    prefill(m, a)
    assert m.pool.num_cached == 2
    b = req("b", list(range(8)) + [99, 98, 97])
    assert m.num_cached_prefix_tokens(b) == 8
    assert prefill(m, b) == 8
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert [m.pool.ref_count(x) for x in b.block_table[:2]] == [2, 2]
    assert m.prefix_cache_hits == 8 and m.prefix_cache_queries == 10 + 11
    m.free(a)
    assert all(m.pool.ref_count(x) == 1 for x in b.block_table)  # b keeps the shared blocks
    m.free(b)
    assert m.num_free_blocks == 16
    m.check_invariants()


def test_whole_prompt_cached_still_computes_last_token():
    m = KVBlockManager(8, BS)
    prefill(m, req("a", range(8)))  # exactly 2 full blocks
    b = req("b", range(8))
    # Only the first block is reused: the last token must run through the model for its logits.
    assert prefill(m, b) == 4 and b.num_computed_tokens == 8


def test_idle_cached_blocks_are_reused_until_evicted():
    m = KVBlockManager(4, BS)
    old = req("old", [7] * 8 + [1])
    prefill(m, old)
    m.free(old)
    assert m.num_free_blocks == 4  # cached but unreferenced blocks count as free
    again = req("again", [7] * 8 + [2])
    assert m.num_cached_prefix_tokens(again) == 8
    other = req("other", [3])
    prefill(m, other)  # 3 blocks left in the free queue, 2 of them the cached ones
    # Sharing idle cached blocks takes them out of the free queue too: 2 hits + 2 fresh > 3.
    assert not m.can_allocate(again, 5) and m.can_allocate(again, 4)
    assert m.allocate_for(again, 5) is None
    m.free(other)
    # Filling the pool with other tokens evicts the cached blocks.
    filler = req("filler", [5] * 16)
    prefill(m, filler)
    m.free(filler)
    assert m.num_cached_prefix_tokens(req("late", [7] * 8 + [3])) == 0


def test_lru_eviction_keeps_the_most_recently_used_prefix():
    m = KVBlockManager(5, BS)
    for rid, tok in (("x", 1), ("y", 2)):  # x's blocks are released first, so they are older
        r = req(rid, [tok] * 8 + [0])
        prefill(m, r)
        m.free(r)
    prefill(m, req("z", [3] * 10))  # needs 3 blocks: 1 uncached + evicts x's 2 (oldest), not y's
    assert m.num_cached_prefix_tokens(req("x2", [1] * 8 + [0])) == 0
    assert m.num_cached_prefix_tokens(req("y2", [2] * 8 + [0])) == 8


def test_different_parent_or_salt_never_hits():
    m = KVBlockManager(16, BS)
    prefill(m, req("a", [1, 2, 3, 4, 5, 6, 7, 8, 0]))
    # Same second block, different first block: the chained hash must not match block 2 alone.
    assert m.num_cached_prefix_tokens(req("b", [9, 9, 9, 9, 5, 6, 7, 8, 0])) == 0
    assert m.num_cached_prefix_tokens(req("c", [1, 2, 3, 4, 5, 6, 7, 8, 0], salt="other")) == 0
    assert m.num_cached_prefix_tokens(req("d", [1, 2, 3, 4, 5, 6, 7, 8, 0])) == 8


def test_generated_tokens_are_cached_too():
    m = KVBlockManager(8, BS)
    a = req("a", [1, 2, 3])
    prefill(m, a)
    for tok in (4, 5, 6):  # decode: each sampled token is computed in the next step
        a.output_token_ids.append(tok)
        compute(m, a, 1)
    assert m.pool.num_cached == 1  # tokens 1..4 filled block 0
    assert m.num_cached_prefix_tokens(req("b", [1, 2, 3, 4, 5])) == 4


def test_prefix_caching_can_be_disabled():
    m = KVBlockManager(8, BS, enable_prefix_caching=False)
    prefill(m, req("a", range(9)))
    b = req("b", range(9))
    assert m.num_cached_prefix_tokens(b) == 0 and prefill(m, b) == 0
    assert m.pool.num_cached == 0 and m.prefix_cache_hit_rate == 0.0


def test_manager_invariant_check_detects_a_leaked_reference():
    m = KVBlockManager(4, BS)
    r = req("a", range(5))
    prefill(m, r)
    m.pool.acquire(r.block_table[0])  # a reference no table accounts for
    with pytest.raises(AssertionError, match="ref count 2, held 1x"):
        m.check_invariants()
