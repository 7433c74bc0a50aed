"""Pure-Python reference twins of the C++ bookkeeping core, written for obviousness, not speed (tests only)."""
import copy
from dataclasses import dataclass


class PyBlockAllocator:
    """Same contract as engine._C.BlockAllocator: a LIFO free list (block 0 first) and reference counts."""

    def __init__(self, num_blocks: int):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.reset()

    def reset(self):
        self.refs = [0] * self.num_blocks
        self.free = list(range(self.num_blocks - 1, -1, -1))

    @property
    def num_free(self):
        return len(self.free)

    @property
    def num_used(self):
        return self.num_blocks - len(self.free)

    def _check_in_use(self, block, releasing):
        if not 0 <= block < self.num_blocks:
            raise IndexError(f"block id {block} is outside the pool")
        if self.refs[block] == 0:
            raise RuntimeError("double release" if releasing else "retain of a free block")

    def allocate(self, n):
        if n < 0:
            raise ValueError("n must be >= 0")
        if n > len(self.free):
            raise RuntimeError("out of KV blocks")
        out = [self.free.pop() for _ in range(n)]
        for b in out:
            self.refs[b] = 1
        return out

    def retain(self, block):
        self._check_in_use(block, releasing=False)
        self.refs[block] += 1

    def release(self, block):
        self._check_in_use(block, releasing=True)
        self.refs[block] -= 1
        if self.refs[block] == 0:
            self.free.append(block)
            return True
        return False

    def retain_many(self, blocks):
        self._all_or_nothing(lambda: [self.retain(b) for b in blocks])

    def release_many(self, blocks):
        return self._all_or_nothing(lambda: sum(self.release(b) for b in blocks))

    def _all_or_nothing(self, fn):
        saved = copy.deepcopy((self.refs, self.free))
        try:
            return fn()
        except Exception:
            self.refs, self.free = saved
            raise

    def ref_count(self, block):
        if not 0 <= block < self.num_blocks:
            raise IndexError(f"block id {block} is outside the pool")
        return self.refs[block]


@dataclass
class CachedBlock:
    block: int
    last_access: int
    uid: int  # distinguishes a prefix cached again after eviction: handles to the old one are stale
    locks: int = 0


class PyRadixTree:
    """A dict from block-aligned token prefixes to their cached block, with LRU by an explicit counter.

    A handle is (prefix, uid of the prefix's last block); the root handle is ((), 0). A lock on a prefix pins
    every block-aligned prefix of it. Eviction removes the least recently used unlocked prefix that no cached
    prefix extends, one block at a time; every access stamps one root path, so no two candidates can tie.
    """

    ROOT = ((), 0)

    def __init__(self, allocator: PyBlockAllocator, block_size: int):
        self.allocator = allocator
        self.block_size = block_size
        self.cache: dict[tuple, CachedBlock] = {}
        self.own_locks: dict[tuple, int] = {}
        self.clock = 0
        self.next_uid = 1

    def _prefixes(self, tokens, n_blocks):
        return [tuple(tokens[: (i + 1) * self.block_size]) for i in range(n_blocks)]

    def _matched_blocks(self, tokens, max_blocks):
        n = 0
        while n < max_blocks and tuple(tokens[: (n + 1) * self.block_size]) in self.cache:
            n += 1
        return n

    def _touch(self, tokens, n_blocks):
        self.clock += 1
        for p in self._prefixes(tokens, n_blocks):
            self.cache[p].last_access = self.clock

    def _handle(self, tokens, n_blocks):
        if n_blocks == 0:
            return self.ROOT
        prefix = tuple(tokens[: n_blocks * self.block_size])
        return prefix, self.cache[prefix].uid

    def match_prefix(self, tokens):
        n = self._matched_blocks(tokens, len(tokens) // self.block_size)
        self._touch(tokens, n)
        return [self.cache[p].block for p in self._prefixes(tokens, n)], self._handle(tokens, n)

    def insert(self, tokens, blocks):
        n = len(blocks)
        if len(tokens) < n * self.block_size:
            raise ValueError("too few tokens for the blocks")
        matched = self._matched_blocks(tokens, n)
        fresh = blocks[matched:]
        held = {c.block for c in self.cache.values()}
        for b in fresh:
            if not 0 <= b < self.allocator.num_blocks or self.allocator.refs[b] == 0:
                raise ValueError(f"block {b} is not allocated")
            if b in held:
                raise ValueError(f"block {b} is already cached")
        if len(set(fresh)) != len(fresh):
            raise ValueError("duplicate block")
        for i in range(matched, n):
            self.allocator.retain(blocks[i])
            self.cache[tuple(tokens[: (i + 1) * self.block_size])] = CachedBlock(blocks[i], 0, self.next_uid)
            self.next_uid += 1
        self._touch(tokens, n)
        return self._handle(tokens, n)

    def _resolve(self, handle):
        prefix, uid = handle
        if handle != self.ROOT and (prefix not in self.cache or self.cache[prefix].uid != uid):
            raise ValueError(f"stale node handle {handle}")
        return prefix

    def _add_locks(self, prefix, delta):
        self.own_locks[prefix] = self.own_locks.get(prefix, 0) + delta
        for p in self._prefixes(prefix, len(prefix) // self.block_size):
            self.cache[p].locks += delta

    def lock(self, handle):
        self._add_locks(self._resolve(handle), +1)

    def unlock(self, handle):
        prefix = self._resolve(handle)
        if self.own_locks.get(prefix, 0) == 0:
            raise RuntimeError("unlock without a matching lock")
        self._add_locks(prefix, -1)

    def _is_leaf(self, prefix):
        return not any(len(p) == len(prefix) + self.block_size and p[: len(prefix)] == prefix for p in self.cache)

    def evict(self, num_blocks):
        if num_blocks < 0:
            raise ValueError("num_blocks must be >= 0")
        freed = 0
        while freed < num_blocks:
            candidates = [p for p, c in self.cache.items() if c.locks == 0 and self._is_leaf(p)]
            if not candidates:
                break
            times = sorted(self.cache[p].last_access for p in candidates)
            assert len(times) < 2 or times[0] < times[1], "two eviction candidates share an access time"
            victim = min(candidates, key=lambda p: self.cache[p].last_access)
            freed += self.allocator.release(self.cache.pop(victim).block)
        return freed

    def reset(self):
        if sum(self.own_locks.values()) > 0:
            raise RuntimeError("locks are still held")
        for b in sorted(c.block for c in self.cache.values()):
            self.allocator.release(b)
        self.cache.clear()

    @property
    def num_cached_blocks(self):
        return len(self.cache)

    @property
    def num_evictable_blocks(self):
        return sum(c.locks == 0 for c in self.cache.values())
