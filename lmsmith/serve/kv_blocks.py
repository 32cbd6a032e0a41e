"""Paged KV-cache bookkeeping: which physical blocks hold which request's tokens. No tensors here.

A block is an integer index into the runner's cache tensor and holds the K/V of `block_size`
consecutive tokens of one sequence. A request's block table lists its blocks in token order, so
token position p lives in block `table[p // block_size]` at offset `p % block_size`.

Prefix caching: once a block is full and computed, it is published under a hash of its token ids
chained with the hash of the block before it, so the hash names the whole prefix up to the block's
end. A later request whose prompt starts with the same tokens shares those blocks (reference
counts) instead of recomputing them. A block nobody references any more keeps its hash and stays
findable until the pool runs out of never-cached blocks and evicts it, least recently used first.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import Counter, OrderedDict
from collections.abc import Sequence

from .request import Request

BlockHash = bytes


def hash_block(parent: BlockHash, token_ids: Sequence[int]) -> BlockHash:
    """sha256(parent hash + token ids as int64): equal hashes mean equal prefixes up to collisions."""
    digest = hashlib.sha256(parent)
    digest.update(array("q", token_ids).tobytes())  # fixed width, so (1, 23) and (12, 3) differ
    return digest.digest()


def root_hash(cache_salt: str | None) -> BlockHash:
    """The 'parent' of a sequence's first block; a salt keeps tenants/adapters apart."""
    return b"" if cache_salt is None else hashlib.sha256(cache_salt.encode()).digest()


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockPool:
    """Fixed set of blocks with reference counts, a free queue and a hash → block index.

    The free queue holds every unreferenced block. Never-cached blocks sit at its front and are
    handed out first; cached ones join at the back when released, so taking from the front evicts
    the least recently used cached block only when no plain free block is left.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks!r} must be an int >= 1")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size={block_size!r} must be an int >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref_counts = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._hash_of: list[BlockHash | None] = [None] * num_blocks
        self._block_of: dict[BlockHash, int] = {}

    @property
    def num_free(self) -> int:
        """Unreferenced blocks, cached ones included (they can be evicted at any time)."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._block_of)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def lookup(self, block_hash: BlockHash) -> int | None:
        return self._block_of.get(block_hash)

    def allocate(self) -> int:
        """A fresh block with reference count 1, evicting its old cache entry if it had one."""
        if not self._free:
            raise RuntimeError(f"all {self.num_blocks} KV blocks are in use; check num_free first")
        block_id, _ = self._free.popitem(last=False)
        old_hash = self._hash_of[block_id]
        if old_hash is not None:
            del self._block_of[old_hash]
            self._hash_of[block_id] = None
        self._ref_counts[block_id] = 1
        return block_id

    def acquire(self, block_id: int) -> None:
        """Share a cached block: one more reference; it leaves the free queue if it was there."""
        if self._ref_counts[block_id] == 0:
            del self._free[block_id]
        self._ref_counts[block_id] += 1

    def release(self, block_id: int) -> None:
        assert self._ref_counts[block_id] > 0, f"block {block_id} released more often than acquired"
        self._ref_counts[block_id] -= 1
        if self._ref_counts[block_id] == 0:
            self._free[block_id] = None  # back of the queue: most recently used
            if self._hash_of[block_id] is None:
                self._free.move_to_end(block_id, last=False)  # nothing worth keeping: reuse first

    def publish(self, block_id: int, block_hash: BlockHash) -> None:
        """Make a full, computed block findable by its hash (first block with that hash wins)."""
        assert self._ref_counts[block_id] > 0, f"publishing unreferenced block {block_id}"
        if self._hash_of[block_id] is not None or block_hash in self._block_of:
            return  # already published (a prefix hit), or a twin computed in the same step
        self._hash_of[block_id] = block_hash
        self._block_of[block_hash] = block_id

    def check_invariants(self) -> None:
        for block_id, refs in enumerate(self._ref_counts):
            assert refs >= 0, f"block {block_id} has ref count {refs}"
            in_free_queue = block_id in self._free
            assert (refs == 0) == in_free_queue, f"block {block_id}: ref count {refs}, {in_free_queue=}"
        assert len(self._free) <= self.num_blocks
        for block_hash, block_id in self._block_of.items():
            assert self._hash_of[block_id] == block_hash, f"hash index disagrees for block {block_id}"
        assert sum(h is not None for h in self._hash_of) == len(self._block_of), "stale block hash"


class KVBlockManager:
    """Per-request block tables over a BlockPool, with prefix caching.

    Protocol for one request: `num_cached_prefix_tokens` (how much of it the cache already holds),
    `allocate_for` before each step that computes tokens, `mark_computed` after it, `free` when
    the request finishes or is preempted.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.pool = BlockPool(num_blocks, block_size)
        self.enable_prefix_caching = enable_prefix_caching
        self._holders: dict[str, Request] = {}  # requests that hold a block table
        self._hashes: dict[str, list[BlockHash]] = {}  # memo: hashes of each request's full blocks
        self._num_published: dict[str, int] = {}  # leading blocks of the request already in the cache
        self.prefix_cache_queries = 0  # tokens looked up on first allocations
        self.prefix_cache_hits = 0  # of those, tokens found in the cache

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def block_size(self) -> int:
        return self.pool.block_size

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some request (cached-but-free blocks count as free)."""
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def num_cached_prefix_tokens(self, request: Request) -> int:
        """Leading tokens of a request without blocks that a first allocation would take from the cache."""
        return len(self._cached_prefix_blocks(request)) * self.block_size

    def can_allocate(self, request: Request, num_new_tokens: int) -> bool:
        _, _, from_free = self._plan(request, num_new_tokens)
        return from_free <= self.pool.num_free

    def allocate_for(self, request: Request, num_new_tokens: int) -> int | None:
        """Give the request blocks for `num_new_tokens` more tokens; None (and no change) if they don't fit.

        On the first allocation the cached prefix is attached first and `num_new_tokens` counts the
        tokens after it. Returns the number of prefix-cached tokens attached (0 after the first call).
        """
        cached, num_fresh, from_free = self._plan(request, num_new_tokens)
        if from_free > self.pool.num_free:
            return None
        if request.request_id not in self._holders:
            self._start_table(request, len(cached))
        for block_id in cached:  # take the hits before allocating, so allocation cannot evict them
            self.pool.acquire(block_id)
        request.block_table.extend(cached)
        request.block_table.extend(self.pool.allocate() for _ in range(num_fresh))
        return len(cached) * self.block_size

    def mark_computed(self, request: Request) -> None:
        """Publish the request's full blocks whose tokens are now computed (call after each step)."""
        if not self.enable_prefix_caching or request.request_id not in self._holders:
            return
        num_full = min(request.num_computed_tokens // self.block_size, len(request.block_table))
        hashes = self._block_hashes(request, num_full)
        for i in range(self._num_published[request.request_id], num_full):
            self.pool.publish(request.block_table[i], hashes[i])
        self._num_published[request.request_id] = max(self._num_published[request.request_id], num_full)

    def free(self, request: Request) -> None:
        """Release all the request's blocks; safe to call again or for a request that holds none."""
        self._hashes.pop(request.request_id, None)
        self._num_published.pop(request.request_id, None)
        if self._holders.pop(request.request_id, None) is None:
            return
        for block_id in reversed(request.block_table):  # tail first: the tail is evicted before the prefix
            self.pool.release(block_id)
        request.block_table = []

    def check_invariants(self) -> None:
        """Ref counts equal the number of tables holding each block; no block both free and referenced."""
        self.pool.check_invariants()
        holders = Counter(b for r in self._holders.values() for b in r.block_table)
        for block_id in range(self.num_blocks):
            refs = self.pool.ref_count(block_id)
            held = holders.get(block_id, 0)
            assert refs == held, f"block {block_id}: ref count {refs}, held {held}x"
        for rid, request in self._holders.items():
            table = request.block_table
            assert len(set(table)) == len(table), f"request {rid} holds a block twice: {table}"
            assert request.num_computed_tokens <= len(table) * self.block_size, f"{rid} outgrew its table"

    # -- internals --

    def _start_table(self, request: Request, num_cached_blocks: int) -> None:
        assert not request.block_table, f"request {request.request_id} has blocks the manager never gave it"
        request.block_table = []
        self._holders[request.request_id] = request
        self._num_published[request.request_id] = num_cached_blocks
        self.prefix_cache_queries += request.num_tokens
        self.prefix_cache_hits += num_cached_blocks * self.block_size

    def _plan(self, request: Request, num_new_tokens: int) -> tuple[list[int], int, int]:
        """(cached blocks to share, fresh blocks to allocate, blocks that leave the free queue)."""
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens={num_new_tokens} must be >= 0")
        cached = self._cached_prefix_blocks(request)
        num_tokens = request.num_computed_tokens + len(cached) * self.block_size + num_new_tokens
        have = len(request.block_table) + len(cached)
        num_fresh = max(0, blocks_for_tokens(num_tokens, self.block_size) - have)
        # A cached block nobody holds sits in the free queue: sharing it uses up free space too.
        idle_hits = sum(self.pool.ref_count(b) == 0 for b in cached)
        return cached, num_fresh, num_fresh + idle_hits

    def _cached_prefix_blocks(self, request: Request) -> list[int]:
        if not self.enable_prefix_caching or request.request_id in self._holders:
            return []
        # At least the last token must be computed: the runner samples from its logits.
        num_full = (request.num_tokens - 1) // self.block_size
        blocks = []
        for block_hash in self._block_hashes(request, num_full)[:num_full]:
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            blocks.append(block_id)
        return blocks

    def _block_hashes(self, request: Request, num_full_blocks: int) -> list[BlockHash]:
        """Chained hashes of the request's first full blocks, memoized (tokens never change once known)."""
        hashes = self._hashes.setdefault(request.request_id, [])
        size = self.block_size
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else root_hash(request.cache_salt)
            hashes.append(hash_block(parent, request.token_ids_between(i * size, (i + 1) * size)))
        return hashes
