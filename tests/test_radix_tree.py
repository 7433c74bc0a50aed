"""engine._C.RadixTree against the brute-force PyRadixTree, driven by a simulated sequence layer.

Two drivers share one harness: a hypothesis state machine (short runs, shrinks failures) and seeded random walks
(long runs that grow deep trees, split locked nodes and evict under pressure).
"""
import gc
import os
import random

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from engine._C import BlockAllocator, RadixTree
from engine.radix_cache import RadixCache
from tests.brute_force import PyBlockAllocator, PyRadixTree

NUM_BLOCKS = 32
ALPHABET = 3  # prefixes collide all the time
EXAMPLES = int(os.environ.get("RADIX_EXAMPLES", 150))  # lower it while debugging a failure
ERRORS = (ValueError, IndexError, RuntimeError)


class Twins:
    """The C++ tree and allocator next to their brute-force twins, plus a sequence layer using both.

    Every method does the same thing to both sides and asserts the same result or the same exception type.
    """

    def __init__(self, block_size):
        self.bs = block_size
        self.cpp_alloc, self.py_alloc = BlockAllocator(NUM_BLOCKS), PyBlockAllocator(NUM_BLOCKS)
        self.cpp, self.py = RadixTree(self.cpp_alloc, block_size), PyRadixTree(self.py_alloc, block_size)
        self.handles = [(0, PyRadixTree.ROOT)]  # (cpp handle, py handle) of every node handed out
        self.cpp_to_py, self.py_to_cpp = {}, {}
        self.locks = []  # handle pairs locked by free-standing lock() calls
        self.sequences = []  # [tokens, blocks (one reference each), handle pair locked for the sequence or None]
        self.seen = [[]]  # token lists used so far: new ones often extend a cut of an old one
        self.steps = 0

    def both(self, cpp_call, py_call):
        try:
            expected = py_call()
        except ERRORS as e:
            with pytest.raises(type(e)):
                cpp_call()
            return None, None
        return cpp_call(), expected

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

    def insert(self, tokens, blocks):
        got, expected = self.both(lambda: self.cpp.insert(tokens, blocks), lambda: self.py.insert(tokens, blocks))
        if expected is not None:
            self.remember(got, expected)

    def evict(self, n):
        got, expected = self.both(lambda: self.cpp.evict(n), lambda: self.py.evict(n))
        assert got == expected

    def lock(self, pair):
        got, expected = self.both(lambda: self.cpp.lock(pair[0]), lambda: self.py.lock(pair[1]) or "locked")
        if expected:
            self.locks.append(pair)

    def unlock(self, pair):
        self.cpp.unlock(pair[0])
        self.py.unlock(pair[1])

    def unlock_any(self, pair):
        _, expected = self.both(lambda: self.cpp.unlock(pair[0]), lambda: self.py.unlock(pair[1]) or "unlocked")
        if not expected:
            return
        if pair in self.locks:
            self.locks.remove(pair)
        else:  # it was a sequence's lock: the sequence must not unlock it again
            next(s for s in self.sequences if s[2] == pair)[2] = None

    def reset(self, unlock_first):
        while unlock_first and self.locks:
            self.unlock(self.locks.pop())
        self.both(self.cpp.reset, self.py.reset)

    # ---- the sequence layer: match, take references, allocate the rest; later insert and release ---------

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
                self.unlock(handle)
            return
        fresh = self.cpp_alloc.allocate(need)
        assert fresh == self.py_alloc.allocate(need)
        self.sequences.append([tokens, blocks + fresh, handle if lock else None])

    def finish_sequence(self, index, insert):
        tokens, blocks, lock = self.sequences.pop(index)
        if insert:  # fails only if insert_arbitrary took one of its blocks
            self.insert(tokens, blocks[: len(tokens) // self.bs])
        if lock is not None:
            self.unlock(lock)
        assert self.cpp_alloc.release_many(blocks) == self.py_alloc.release_many(blocks)

    def check(self):
        self.steps += 1
        self.cpp_alloc.check_integrity()
        self.cpp.check_integrity()
        assert self.cpp.num_cached_blocks == self.py.num_cached_blocks
        assert self.cpp.num_evictable_blocks == self.py.num_evictable_blocks
        assert [self.cpp_alloc.ref_count(b) for b in range(NUM_BLOCKS)] == self.py_alloc.refs
        assert all(self.py_alloc.refs[c.block] >= 1 for c in self.py.cache.values())

    def teardown(self):
        for pair in self.locks + [s[2] for s in self.sequences if s[2] is not None]:
            self.unlock(pair)
        for _, blocks, _ in self.sequences:
            assert self.cpp_alloc.release_many(blocks) == self.py_alloc.release_many(blocks)
        self.cpp.reset()
        self.py.reset()
        self.check()
        assert self.cpp_alloc.num_free == self.py_alloc.num_free == NUM_BLOCKS


# ---- driver 1: hypothesis state machine -----------------------------------------------------------------

token_lists = st.lists(st.integers(0, ALPHABET - 1), max_size=12)


class RadixMachine(RuleBasedStateMachine):
    @initialize(block_size=st.sampled_from([1, 2, 3]))
    def setup(self, block_size):
        self.twins = Twins(block_size)

    def draw_tokens(self, data):
        """Random tokens, or a random cut of earlier tokens plus a random tail, so matches end inside nodes."""
        tokens = data.draw(token_lists)
        if data.draw(st.booleans()):
            old = data.draw(st.sampled_from(self.twins.seen))
            tokens = old[: data.draw(st.integers(0, len(old)))] + tokens[: data.draw(st.integers(0, 4))]
        self.twins.seen.append(tokens)
        return tokens

    @rule(data=st.data(), lock=st.booleans())
    def start_sequence(self, data, lock):
        self.twins.start_sequence(self.draw_tokens(data), lock)

    @precondition(lambda self: self.twins.sequences)
    @rule(data=st.data(), insert=st.booleans())
    def finish_sequence(self, data, insert):
        self.twins.finish_sequence(data.draw(st.integers(0, len(self.twins.sequences) - 1)), insert)

    @rule(data=st.data())
    def match(self, data):
        self.twins.match(self.draw_tokens(data))

    @rule(data=st.data(), blocks=st.lists(st.integers(-1, NUM_BLOCKS), max_size=5))
    def insert_arbitrary(self, data, blocks):
        self.twins.insert(self.draw_tokens(data), blocks)

    @rule(data=st.data())
    def lock(self, data):
        self.twins.lock(data.draw(st.sampled_from(self.twins.handles)))

    @precondition(lambda self: self.twins.locks)
    @rule(data=st.data())
    def unlock_held(self, data):
        self.twins.unlock(self.twins.locks.pop(data.draw(st.integers(0, len(self.twins.locks) - 1))))

    @rule(data=st.data())
    def unlock_any(self, data):
        self.twins.unlock_any(data.draw(st.sampled_from(self.twins.handles)))

    @rule(n=st.integers(-1, 4))
    def evict(self, n):
        self.twins.evict(n)

    @rule(dice=st.integers(0, 9), unlock_first=st.booleans())
    def reset_rarely(self, dice, unlock_first):
        if dice == 9:  # rare, so that trees grow between resets
            self.twins.reset(unlock_first)

    @invariant()
    def same_state(self):
        self.twins.check()

    def teardown(self):
        if hasattr(self, "twins"):
            self.twins.teardown()


RadixMachine.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestRadixTreeMatchesBruteForce = RadixMachine.TestCase


# ---- driver 2: long seeded random walks ----------------------------------------------------------------


def random_tokens(rng, twins):
    tail = [rng.randrange(ALPHABET) for _ in range(rng.randrange(9))]
    if rng.random() < 0.2:
        return tail
    old = rng.choice(twins.seen)
    return old[: rng.randint(0, len(old))] + tail[: rng.randrange(5)]


def random_step(rng, twins):
    op = rng.choices(["start", "finish", "match", "lock", "unlock", "unlock_any", "evict", "insert", "reset"],
                     weights=[30, 25, 15, 6, 5, 2, 5, 2, 1])[0]
    if op == "start":
        tokens = random_tokens(rng, twins)
        twins.seen.append(tokens)
        twins.start_sequence(tokens, lock=rng.random() < 0.5)
    elif op == "finish" and twins.sequences:
        twins.finish_sequence(rng.randrange(len(twins.sequences)), insert=rng.random() < 0.9)
    elif op == "match":
        twins.match(random_tokens(rng, twins))
    elif op == "lock":
        twins.lock(rng.choice(twins.handles[-20:]))
    elif op == "unlock" and twins.locks:
        twins.unlock(twins.locks.pop(rng.randrange(len(twins.locks))))
    elif op == "unlock_any":
        twins.unlock_any(rng.choice(twins.handles))
    elif op == "evict":
        twins.evict(rng.randint(-1, 6))
    elif op == "insert":
        twins.insert(random_tokens(rng, twins), [rng.randint(-1, NUM_BLOCKS) for _ in range(rng.randrange(4))])
    elif op == "reset":
        twins.reset(unlock_first=rng.random() < 0.7)


@pytest.mark.parametrize("block_size", [1, 2, 3])
def test_long_random_walks_match_brute_force(block_size):
    for seed in range(3):
        rng, twins = random.Random(seed), Twins(block_size)
        for _ in range(2000):
            random_step(rng, twins)
            twins.check()
        twins.teardown()


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
