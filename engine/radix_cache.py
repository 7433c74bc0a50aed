"""Prefix cache: a KV block allocator plus the radix tree of token prefixes over its blocks (both in C++)."""
from engine.extension import core


class RadixCache:
    """Owns one `BlockAllocator` and one `RadixTree`; node handles come from `match`/`insert`, 0 is the root."""

    def __init__(self, num_blocks: int, block_size: int):
        ext = core()
        if ext is None:
            raise ImportError("engine._C is not built: install the package (`pip install -e .`) or run "
                              "`python setup.py build_ext --inplace` in the repository")
        self.block_size = block_size
        self.allocator = ext.BlockAllocator(num_blocks)
        self.tree = ext.RadixTree(self.allocator, block_size)

    def match(self, tokens: list[int]) -> tuple[list[int], int]:
        return self.tree.match_prefix(tokens)

    def insert(self, tokens: list[int], blocks: list[int]) -> int:
        return self.tree.insert(tokens, blocks)

    def lock(self, node: int) -> None:
        self.tree.lock(node)

    def unlock(self, node: int) -> None:
        self.tree.unlock(node)

    def evict(self, num_blocks: int) -> int:
        return self.tree.evict(num_blocks)

    def reset(self) -> None:
        self.tree.reset()

    def check_integrity(self) -> None:
        # Each check also verifies that every block the tree holds has ref_count >= 1.
        self.allocator.check_integrity()
        self.tree.check_integrity()
