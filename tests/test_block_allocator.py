"""engine._C.BlockAllocator against the brute-force PyBlockAllocator: random op sequences and error messages."""
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine._C import BlockAllocator
from tests.brute_force import PyBlockAllocator

NUM_BLOCKS = 12


def same_outcome(fn_cpp, fn_py):
    """Runs both; they must return the same value or raise the same exception type."""
    try:
        expected = fn_py()
    except (ValueError, IndexError, RuntimeError) as e:
        with pytest.raises(type(e)):
            fn_cpp()
        return None
    assert fn_cpp() == expected
    return expected


block_ids = st.integers(-2, NUM_BLOCKS + 1)


class AllocatorMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.cpp = BlockAllocator(NUM_BLOCKS)
        self.py = PyBlockAllocator(NUM_BLOCKS)

    def used_blocks(self):
        return [b for b in range(NUM_BLOCKS) if self.py.refs[b] > 0]

    @rule(n=st.integers(-1, 5))
    def allocate(self, n):
        same_outcome(lambda: self.cpp.allocate(n), lambda: self.py.allocate(n))

    @rule(block=block_ids)
    def retain_any(self, block):
        same_outcome(lambda: self.cpp.retain(block), lambda: self.py.retain(block))

    @rule(block=block_ids)
    def release_any(self, block):
        same_outcome(lambda: self.cpp.release(block), lambda: self.py.release(block))

    @precondition(lambda self: self.used_blocks())
    @rule(data=st.data())
    def release_used(self, data):
        block = data.draw(st.sampled_from(self.used_blocks()))
        same_outcome(lambda: self.cpp.release(block), lambda: self.py.release(block))

    @rule(blocks=st.lists(block_ids, max_size=6))
    def retain_many(self, blocks):
        same_outcome(lambda: self.cpp.retain_many(blocks), lambda: self.py.retain_many(blocks))

    @rule(blocks=st.lists(block_ids, max_size=6))
    def release_many_any(self, blocks):
        same_outcome(lambda: self.cpp.release_many(blocks), lambda: self.py.release_many(blocks))

    @precondition(lambda self: self.used_blocks())
    @rule(data=st.data())
    def release_many_used(self, data):
        blocks = data.draw(st.lists(st.sampled_from(self.used_blocks()), max_size=6))
        same_outcome(lambda: self.cpp.release_many(blocks), lambda: self.py.release_many(blocks))

    @rule()
    def reset(self):
        self.cpp.reset()
        self.py.reset()

    @invariant()
    def same_state(self):
        self.cpp.check_integrity()
        assert (self.cpp.num_free, self.cpp.num_used) == (self.py.num_free, self.py.num_used)
        assert [self.cpp.ref_count(b) for b in range(NUM_BLOCKS)] == self.py.refs

    def teardown(self):
        for b in range(NUM_BLOCKS):
            for _ in range(self.py.refs[b]):
                assert self.cpp.release(b) == self.py.release(b)
        self.cpp.check_integrity()
        assert self.cpp.num_free == self.py.num_free == NUM_BLOCKS
        assert sorted(self.cpp.allocate(NUM_BLOCKS)) == list(range(NUM_BLOCKS))  # nothing leaked, nothing twice


AllocatorMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestAllocatorMatchesBruteForce = AllocatorMachine.TestCase


def test_allocation_order_is_lifo_starting_at_block_zero():
    a = BlockAllocator(6)
    assert a.allocate(3) == [0, 1, 2]
    a.release(1)
    a.release(0)
    assert a.allocate(3) == [0, 1, 3]


def test_double_release_names_the_block():
    a = BlockAllocator(4)
    (b,) = a.allocate(1)
    assert a.release(b) is True
    with pytest.raises(RuntimeError, match=rf"double release of block {b} \(it is already free\)"):
        a.release(b)


def test_exhaustion_says_how_many_are_free():
    a = BlockAllocator(4)
    a.allocate(3)
    with pytest.raises(RuntimeError, match=r"out of KV blocks: asked for 2, 1 of 4 free"):
        a.allocate(2)
    assert a.num_free == 1  # a failed allocate takes nothing


def test_bad_ids_and_free_blocks():
    a = BlockAllocator(4)
    with pytest.raises(IndexError, match=r"block id 4 is outside the pool \[0, 4\)"):
        a.retain(4)
    with pytest.raises(IndexError, match=r"block id -1 is outside the pool"):
        a.ref_count(-1)
    with pytest.raises(RuntimeError, match=r"block 2 is free; allocate it first"):
        a.retain(2)
    with pytest.raises(ValueError, match="num_blocks must be positive"):
        BlockAllocator(0)
    with pytest.raises(ValueError, match="n must be >= 0"):
        a.allocate(-1)


def test_bulk_ops_are_all_or_nothing():
    a = BlockAllocator(4)
    x, y = a.allocate(2)
    a.retain(x)
    with pytest.raises(RuntimeError, match=f"release_many: double release of block {y}"):
        a.release_many([x, y, y])
    assert (a.ref_count(x), a.ref_count(y), a.num_free) == (2, 1, 2)
    with pytest.raises(IndexError):
        a.retain_many([x, 9])
    assert a.ref_count(x) == 2
    assert a.release_many([x, x, y]) == 2
    assert a.num_free == 4
    a.check_integrity()
