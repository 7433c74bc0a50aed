"""The fork primitive of tree sampling: prefix KV shared (copy-on-write), no prefill, keyed noise."""
import pytest

from engine import LLM, SamplingParams, Sequence
from tiny_models import make_tiny_model

PROMPT = list(range(20, 41))  # 21 tokens: the prompt ends inside a block of 4
PARAMS = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=16, ignore_eos=True)
SEED = 123


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2")
    make_tiny_model("qwen2", path)
    return LLM(path, dtype="float32", block_size=4, num_kv_blocks=256)


def run_to_end(llm, seqs_to_watch):
    engine = llm.engine
    while any(not s.is_finished for s in seqs_to_watch):
        engine.step()
        llm.check_integrity()


def reference(llm, tokens, seq_id, exclude=None):
    """The same key sampled from a fresh sequence whose prompt is `tokens` (prefilled, no sharing)."""
    seq = Sequence(tokens, PARAMS, SEED, seq_id=seq_id, num_prompt_tokens=len(PROMPT))
    seq.exclude_token = -1 if exclude is None else exclude
    llm.engine.add_sequence(seq)
    run_to_end(llm, [seq])
    llm.engine.free(seq)
    return seq.token_ids


@pytest.mark.parametrize("offset", [1, 3, 4, 5, 15])  # fork positions at and around block boundaries
def test_fork_of_finished_root_decodes_without_prefill(llm, offset):
    engine = llm.engine
    root = Sequence(PROMPT, PARAMS, SEED, seq_id=0)
    engine.add_sequence(root)
    run_to_end(llm, [root])
    position = len(PROMPT) + offset
    prefilled, decoded = engine.num_prefill_tokens, engine.num_decode_tokens
    children = [engine.fork(root, position, PARAMS, SEED, seq_id=10 + b) for b in range(2)]
    distinct = engine.fork(root, position, PARAMS, SEED, seq_id=10, exclude_token=root.token_ids[position])
    watched = [*children, distinct]
    run_to_end(llm, watched)
    assert engine.num_prefill_tokens == prefilled  # the branch prefix is never prefilled
    assert engine.num_decode_tokens - decoded == sum(len(c) - position + 1 for c in watched) - 3
    for child in watched:
        assert child.token_ids[:position] == root.token_ids[:position]
        assert len(child.logprobs) == child.num_completion_tokens
    assert distinct.token_ids[position] != root.token_ids[position]
    assert children[0].token_ids != children[1].token_ids
    for child in watched:
        engine.free(child)
    engine.free(root)
    for b, child in enumerate(children):
        assert child.token_ids == reference(llm, root.token_ids[:position], 10 + b)
    assert distinct.token_ids == reference(llm, root.token_ids[:position], 10, root.token_ids[position])
    llm.check_integrity()


def test_fork_of_running_parent_leaves_it_unchanged(llm):
    engine = llm.engine
    alone = Sequence(PROMPT, PARAMS, SEED, seq_id=3)
    engine.add_sequence(alone)
    run_to_end(llm, [alone])
    engine.free(alone)

    parent = Sequence(PROMPT, PARAMS, SEED, seq_id=3)
    engine.add_sequence(parent)
    for _ in range(6):
        engine.step()
    child = engine.fork(parent, len(parent), PARAMS, SEED, seq_id=4)  # resample its newest token
    run_to_end(llm, [parent, child])
    assert parent.token_ids == alone.token_ids
    assert child.token_ids[:len(PROMPT) + 5] == parent.token_ids[:len(PROMPT) + 5]
    engine.free(parent)
    engine.free(child)
    llm.check_integrity()


def test_fork_rejects_bad_positions_and_freed_parents(llm):
    engine = llm.engine
    root = Sequence(PROMPT, PARAMS, SEED, seq_id=0)
    engine.add_sequence(root)
    run_to_end(llm, [root])
    with pytest.raises(ValueError, match="fork position"):
        engine.fork(root, len(PROMPT) - 1, PARAMS, SEED, 1)
    with pytest.raises(ValueError, match="fork position"):
        engine.fork(root, len(root) + 1, PARAMS, SEED, 1)
    engine.free(root)
    with pytest.raises(ValueError, match="holds no KV"):
        engine.fork(root, len(PROMPT) + 2, PARAMS, SEED, 1)
    llm.check_integrity()
