"""Paged KV cache: the pool tensors, per-sequence block tables, prefix matching and copy-on-write forks.

Block ids come from the C++ allocator (reference counted) and full blocks of released sequences go to the radix
tree of token prefixes, from which new sequences reuse them. A block is written only at positions >= the owning
sequence's num_cached_tokens; if that block is shared (reference count > 1) it is first copied to a private
block (copy-on-write); the copies are queued and the model runner performs them before the step's forward.
"""
import torch

from engine import memory
from engine.radix_cache import RadixCache
from engine.sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _batchable(copies: list[tuple[int, int]]) -> bool:
    """True when reading every source before writing any target equals copying in order: no target is written
    twice and none is the source of a later copy. (A source freed and reused as a later target is fine.)"""
    written: set[int] = set()
    for src, dst in copies:
        if src in written or dst in written:
            return False
        written.add(dst)
    return True


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, prefix_caching: bool = True) -> None:
        shape = (num_layers, num_blocks, block_size, kv_heads, head_dim)
        self.k = memory.zeros(shape, dtype, device)
        self.v = memory.zeros(shape, dtype, device)
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.cache = RadixCache(num_blocks, block_size)
        self.allocator, self.tree = self.cache.allocator, self.cache.tree
        self.pending_copies: list[tuple[int, int]] = []

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    def _reserve(self, n: int) -> bool:
        """Makes `n` blocks free, evicting cached prefixes (LRU) if needed."""
        short = n - self.allocator.num_free
        if short > 0:
            self.tree.evict(short)
        return self.allocator.num_free >= n

    def admit(self, seq: Sequence) -> bool:
        """Gives a waiting sequence blocks for all its tokens, reusing the longest cached prefix; False if full."""
        assert not seq.block_table
        blocks, node = [], None
        if self.prefix_caching:
            blocks, node = self.tree.match_prefix(seq.token_ids[:len(seq) - 1])  # keep >= 1 token to compute
            node = node if blocks else None
            if node is not None:
                self.tree.lock(node)
                self.allocator.retain_many(blocks)
        needed = cdiv(len(seq), self.block_size) - len(blocks)
        if not self._reserve(needed):
            if node is not None:
                self.tree.unlock(node)
                self.allocator.release_many(blocks)
            return False
        seq.block_table = list(blocks) + self.allocator.allocate(needed)
        seq.num_cached_tokens = len(blocks) * self.block_size
        seq.cache_node = node
        return True

    def reserve_decode(self, seq: Sequence) -> bool:
        """Makes tokens[num_cached:] writable: new blocks at the end, a private copy of a shared block."""
        first = seq.num_cached_tokens // self.block_size
        cow = first < len(seq.block_table) and self.allocator.ref_count(seq.block_table[first]) > 1
        grow = cdiv(len(seq), self.block_size) - len(seq.block_table)
        if not self._reserve(grow + cow):
            return False
        if cow:
            src = seq.block_table[first]
            seq.block_table[first] = self.allocator.allocate(1)[0]
            self.pending_copies.append((src, seq.block_table[first]))
            self.allocator.release(src)
        if grow > 0:
            seq.block_table += self.allocator.allocate(grow)
        return True

    def release(self, seq: Sequence) -> None:
        """Drops the sequence's blocks; its fully computed blocks stay cached in the radix tree."""
        full = seq.num_cached_tokens // self.block_size
        if self.prefix_caching and full:
            self.tree.insert(seq.token_ids[:full * self.block_size], seq.block_table[:full])
        if seq.cache_node is not None:
            self.tree.unlock(seq.cache_node)
        self.allocator.release_many(seq.block_table)
        seq.block_table, seq.num_cached_tokens, seq.cache_node = [], 0, None

    def share_prefix(self, parent: Sequence, child: Sequence, num_tokens: int) -> None:
        """Child reuses the parent's KV of tokens[:num_tokens]: it retains the blocks that hold them."""
        assert num_tokens <= parent.num_cached_tokens
        child.block_table = parent.block_table[:cdiv(num_tokens, self.block_size)]
        self.allocator.retain_many(child.block_table)
        child.num_cached_tokens = num_tokens

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Performs the queued copies as if in order, with one gather and one index_copy_ per pool (K, V) when
        that is the same: every source is read before any target is written, which is what the sequential order
        gives unless a target is written twice or read by a later copy (then they run one by one)."""
        if not copies:
            return
        if not _batchable(copies):
            for src, dst in copies:
                self.k[:, dst] = self.k[:, src]
                self.v[:, dst] = self.v[:, src]
            return
        sources, targets = (torch.tensor(ids, dtype=torch.int64).to(self.k.device, non_blocking=True)
                            for ids in zip(*copies))
        for pool in (self.k, self.v):
            pool.index_copy_(1, targets, pool.index_select(1, sources))

    def reset_prefix_cache(self) -> None:
        self.tree.reset()

    def check_integrity(self, live: list[Sequence]) -> None:
        """free + referenced == total, and every block's reference count == its holders (sequences + tree)."""
        self.cache.check_integrity()
        holders = [0] * self.num_blocks
        for seq in live:
            if len(seq.block_table) < cdiv(seq.num_cached_tokens, self.block_size):
                raise AssertionError(f"{seq} caches {seq.num_cached_tokens} tokens in {len(seq.block_table)} blocks")
            for b in seq.block_table:
                holders[b] += 1
        in_tree = 0
        for b in range(self.num_blocks):
            extra = self.allocator.ref_count(b) - holders[b]
            if extra not in (0, 1):
                raise AssertionError(f"block {b}: ref count {self.allocator.ref_count(b)}, "
                                     f"{holders[b]} sequences hold it")
            in_tree += extra
        if in_tree != self.tree.num_cached_blocks:
            raise AssertionError(f"{in_tree} blocks are held only by the tree, which caches "
                                 f"{self.tree.num_cached_blocks}")
        if self.allocator.num_used != sum(1 for b in range(self.num_blocks) if self.allocator.ref_count(b) > 0):
            raise AssertionError("allocator num_used disagrees with its reference counts")
