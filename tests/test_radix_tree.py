"""engine._C.RadixTree against the brute-force PyRadixTree, driven by a simulated sequence layer."""
import gc
import os

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from engine._C import BlockAllocator, RadixTree
from engine.radix_cache import RadixCache
from tests.brute_force import PyBlockAllocator, PyRadixTree

NUM_BLOCKS = 24
token_lists = st.lists(st.integers(0, 2), max_size=12)  # 3-letter alphabet: prefixes collide all the time
EXAMPLES = int(os.environ.get("RADIX_EXAMPLES", 250))  # lower it while debugging a failure
STEPS = [0]


def same_outcome(fn_cpp, fn_py):
    """Runs both; they must raise the same exception type, or return values that `same` maps onto each other."""
    try:
        expected = fn_py()
    except (ValueError, IndexError, RuntimeError) as e:
        with pytest.raises(type(e)):
            fn_cpp()
        return None, None
    return fn_cpp(), expected


class RadixMachine(RuleBasedStateMachine):
    @initialize(block_size=st.sampled_from([1, 2, 3]))
    def setup(self, block_size):
        self.bs = block_size
        self.cpp_alloc = BlockAllocator(NUM_BLOCKS)
        self.py_alloc = PyBlockAllocator(NUM_BLOCKS)
        self.cpp = RadixTree(self.cpp_alloc, block_size)
        self.py = PyRadixTree(self.py_alloc, block_size)
        self.handles = [(0, PyRadixTree.ROOT)]  # (cpp handle, py handle) of every node handed out
        self.cpp_to_py, self.py_to_cpp = {}, {}
        self.locks = []  # handle pairs locked by free-standing lock() calls
        self.sequences = []  # [tokens, blocks (one reference each), handle pair locked for the sequence or None]

    def remember(self, cpp_handle, py_handle):
        """Handles must correspond one to one over the whole run (stale ones are never reissued)."""
        assert self.cpp_to_py.setdefault(cpp_handle, py_handle) == py_handle
        assert self.py_to_cpp.setdefault(py_handle, cpp_handle) == cpp_handle
        self.handles.append((cpp_handle, py_handle))
        return cpp_handle, py_handle

    def match(self, tokens):
        (cpp_blocks, cpp_node), (py_blocks, py_node) = self.cpp.match_prefix(tokens), self.py.match_prefix(tokens)
        assert cpp_blocks == py_blocks
        return cpp_blocks, self.remember(cpp_node, py_node)

    def evict(self, n):
        got, expected = same_outcome(lambda: self.cpp.evict(n), lambda: self.py.evict(n))
        assert got == expected

    # ---- the sequence layer: match, take references, allocate the rest, later insert and release ----------

    @rule(tokens=token_lists, lock=st.booleans())
    def start_sequence(self, tokens, lock):
        blocks, handle = self.match(tokens)
        self.cpp_alloc.retain_many(blocks)
        self.py_alloc.retain_many(blocks)
        if lock:
            self.cpp.lock(handle[0])
            self.py.lock(handle[1])
        need = -(-len(tokens) // self.bs) - len(blocks)
        if need > self.py_alloc.num_free:
            self.evict(need - self.py_alloc.num_free)
        if need > self.py_alloc.num_free:  # cannot run now: give everything back
            assert need > self.cpp_alloc.num_free
            assert self.cpp_alloc.release_many(blocks) == self.py_alloc.release_many(blocks)
            if lock:
                self.cpp.unlock(handle[0])
                self.py.unlock(handle[1])
            return
        fresh = self.cpp_alloc.allocate(need)
        assert fresh == self.py_alloc.allocate(need)
        self.sequences.append([tokens, blocks + fresh, handle if lock else None])

    @precondition(lambda self: self.sequences)
    @rule(data=st.data(), insert=st.booleans())
    def finish_sequence(self, data, insert):
        tokens, blocks, lock = self.sequences.pop(data.draw(st.integers(0, len(self.sequences) - 1)))
        if insert:
            full = blocks[: len(tokens) // self.bs]  # fails only if insert_arbitrary stole one of them
            got, expected = same_outcome(lambda: self.cpp.insert(tokens, full), lambda: self.py.insert(tokens, full))
            if expected is not None:
                self.remember(got, expected)
        if lock is not None:
            self.cpp.unlock(lock[0])
            self.py.unlock(lock[1])
        assert self.cpp_alloc.release_many(blocks) == self.py_alloc.release_many(blocks)

    # ---- direct tree operations, valid or not -----------------------------------------------------------

    @rule(tokens=token_lists)
    def match_only(self, tokens):
        self.match(tokens)

    @rule(data=st.data())
    def lock(self, data):
        pair = data.draw(st.sampled_from(self.handles))
        try:
            self.py.lock(pair[1])
        except ValueError:
            with pytest.raises(ValueError):
                self.cpp.lock(pair[0])
            return
        self.cpp.lock(pair[0])
        self.locks.append(pair)

    @precondition(lambda self: self.locks)
    @rule(data=st.data())
    def unlock_held(self, data):
        pair = self.locks.pop(data.draw(st.integers(0, len(self.locks) - 1)))
        self.cpp.unlock(pair[0])
        self.py.unlock(pair[1])

    @rule(data=st.data())
    def unlock_any(self, data):
        pair = data.draw(st.sampled_from(self.handles))
        try:
            self.py.unlock(pair[1])
        except (ValueError, RuntimeError) as e:
            with pytest.raises(type(e)):
                self.cpp.unlock(pair[0])
            return
        self.cpp.unlock(pair[0])
        if pair in self.locks:
            self.locks.remove(pair)
        else:  # a sequence's lock: the sequence must not unlock it again
            seq = next(s for s in self.sequences if s[2] == pair)
            seq[2] = None

    @rule(n=st.integers(-1, 8))
    def evict_some(self, n):
        self.evict(n)

    @rule()
    def reset(self):
        same_outcome(self.cpp.reset, self.py.reset)

    @rule(tokens=token_lists, blocks=st.lists(st.integers(-1, NUM_BLOCKS), max_size=5))
    def insert_arbitrary(self, tokens, blocks):
        got, expected = same_outcome(lambda: self.cpp.insert(tokens, blocks), lambda: self.py.insert(tokens, blocks))
        if expected is not None:
            self.remember(got, expected)

    @rule()
    def unlock_all_then_reset(self):
        while self.locks:
            self.unlock_held_pair(self.locks.pop())
        same_outcome(self.cpp.reset, self.py.reset)

    def unlock_held_pair(self, pair):
        self.cpp.unlock(pair[0])
        self.py.unlock(pair[1])

    @invariant()
    def same_state(self):
        STEPS[0] += 1
        self.cpp_alloc.check_integrity()
        self.cpp.check_integrity()
        assert self.cpp.num_cached_blocks == self.py.num_cached_blocks
        assert self.cpp.num_evictable_blocks == self.py.num_evictable_blocks
        assert [self.cpp_alloc.ref_count(b) for b in range(NUM_BLOCKS)] == self.py_alloc.refs
        assert all(self.py_alloc.refs[c.block] >= 1 for c in self.py.cache.values())

    def teardown(self):
        if not hasattr(self, "cpp"):
            return
        for pair in self.locks + [s[2] for s in self.sequences if s[2] is not None]:
            self.unlock_held_pair(pair)
        for _, blocks, _ in self.sequences:
            assert self.cpp_alloc.release_many(blocks) == self.py_alloc.release_many(blocks)
        self.cpp.reset()
        self.py.reset()
        self.cpp.check_integrity()
        self.cpp_alloc.check_integrity()
        assert self.cpp_alloc.num_free == self.py_alloc.num_free == NUM_BLOCKS


RadixMachine.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestRadixTreeMatchesBruteForce = RadixMachine.TestCase


# ---- explicit behaviour ------------------------------------------------------------------------------------


def cache_with(num_blocks=16, block_size=2):
    cache = RadixCache(num_blocks, block_size)
    return cache, cache.allocator, cache.tree


def prefill(cache, tokens):
    """What the engine does for a new prompt: allocate, (compute KV), insert, drop its own references."""
    blocks = cache.allocator.allocate(len(tokens) // cache.block_size)
    node = cache.insert(tokens, blocks)
    cache.allocator.release_many(blocks)
    return blocks, node


def test_n_samples_of_one_prompt_prefill_it_once():
    cache, alloc, tree = cache_with()
    prompt = [5, 6, 7, 8, 9, 10, 11]
    blocks, _ = prefill(cache, prompt)
    for _ in range(4):
        matched, node = cache.match(prompt + [99])
        assert matched == blocks  # the partial last block (token 11) is not cached
        cache.lock(node)
    assert tree.num_cached_blocks == 3 and alloc.num_used == 3
    assert tree.num_evictable_blocks == 0 and cache.evict(3) == 0
    cache.check_integrity()


def test_partial_match_splits_the_node_and_the_lock_pins_only_the_prefix():
    cache, alloc, tree = cache_with()
    blocks, _ = prefill(cache, [1, 1, 2, 2, 3, 3])
    matched, node = cache.match([1, 1, 2, 2, 0, 0])
    assert matched == blocks[:2] and tree.num_nodes == 3  # root, [1 1 2 2], [3 3]
    cache.lock(node)
    assert tree.num_evictable_blocks == 1
    assert cache.evict(5) == 1 and alloc.num_free == 14
    assert cache.match([1, 1, 2, 2, 3, 3])[0] == blocks[:2]
    cache.unlock(node)
    cache.check_integrity()


def test_eviction_is_lru_one_block_at_a_time():
    cache, alloc, tree = cache_with()
    a, _ = prefill(cache, [1, 1, 1, 1])
    b, _ = prefill(cache, [2, 2, 2, 2])
    cache.match([1, 1, 9, 9])  # refreshes only the first block of a
    order = []
    for _ in range(4):
        assert cache.evict(1) == 1
        order += [blk for blk in a + b if alloc.ref_count(blk) == 0 and blk not in order]
        cache.check_integrity()
    assert order == [a[1], b[1], b[0], a[0]]
    cache.check_integrity()


def test_evicting_a_block_still_used_by_a_sequence_frees_nothing():
    cache, alloc, tree = cache_with()
    blocks = alloc.allocate(2)
    cache.insert([1, 2, 3, 4], blocks)  # the sequence keeps its own references
    assert cache.evict(1) == 0 and tree.num_cached_blocks == 0
    assert alloc.release_many(blocks) == 2
    cache.check_integrity()


def test_insert_keeps_existing_blocks_and_adopts_the_rest():
    cache, alloc, tree = cache_with()
    first, _ = prefill(cache, [1, 2, 3, 4])
    mine = alloc.allocate(3)
    node = cache.insert([1, 2, 3, 4, 5, 6, 7], mine)  # longer token list than blocks: extra tokens ignored
    assert [alloc.ref_count(b) for b in mine] == [1, 1, 2]
    assert cache.match([1, 2, 3, 4, 5, 6])[0] == first + mine[2:]
    assert cache.insert([1, 2, 3, 4, 5, 6], mine) == node
    alloc.release_many(mine)
    cache.check_integrity()


def test_bad_inserts_leave_the_tree_untouched():
    cache, alloc, tree = cache_with()
    held = alloc.allocate(2)
    with pytest.raises(ValueError, match="2 blocks need at least 4 tokens, got 3"):
        cache.insert([1, 2, 3], held)
    with pytest.raises(ValueError, match="block 5 is not an allocated block"):
        cache.insert([1, 2, 3, 4], [held[0], 5])
    with pytest.raises(ValueError, match="appears twice"):
        cache.insert([1, 2, 3, 4], [held[0], held[0]])
    cache.insert([1, 2], held[:1])
    with pytest.raises(ValueError, match=f"block {held[0]} is already cached under a different prefix"):
        cache.insert([7, 7], held[:1])
    assert tree.num_cached_blocks == 1 and alloc.ref_count(held[0]) == 2 and alloc.ref_count(held[1]) == 1
    cache.check_integrity()


def test_lock_errors_and_stale_handles():
    cache, alloc, tree = cache_with()
    _, node = prefill(cache, [1, 2, 3, 4])
    with pytest.raises(RuntimeError, match="is not locked"):
        cache.unlock(node)
    cache.lock(node)
    with pytest.raises(RuntimeError, match="1 locks are still held"):
        cache.reset()
    cache.unlock(node)
    cache.evict(1)  # shortens the node: its handle goes stale
    with pytest.raises(ValueError, match="stale or unknown node handle"):
        cache.lock(node)
    _, head = cache.match([1, 2])
    cache.reset()
    assert alloc.num_free == 16 and tree.num_cached_blocks == 0
    with pytest.raises(ValueError, match="stale"):
        cache.unlock(head)
    cache.lock(0)  # the root is always valid
    cache.unlock(0)
    cache.check_integrity()


def test_tree_keeps_its_allocator_alive_and_releases_on_destruction():
    alloc = BlockAllocator(4)
    tree = RadixTree(alloc, 2)
    blocks = alloc.allocate(2)
    tree.insert([1, 2, 3, 4], blocks)
    alloc.release_many(blocks)
    del alloc
    gc.collect()
    assert tree.evict(1) == 1  # still releases into the (kept alive) allocator
    tree.check_integrity()

    alloc = BlockAllocator(4)
    tree = RadixTree(alloc, 2)
    tree.insert([1, 2, 3, 4], blocks := alloc.allocate(2))
    alloc.release_many(blocks)
    del tree
    gc.collect()
    assert alloc.num_free == 4


def test_random_runs_reach_ten_thousand_steps():
    if STEPS[0] == 0 or EXAMPLES < 250:
        pytest.skip("counts steps only after a full run of TestRadixTreeMatchesBruteForce")
    assert STEPS[0] >= 10_000, STEPS[0]
