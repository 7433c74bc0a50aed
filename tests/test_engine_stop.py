"""Stopping on text through the engine: stop_regex and stop strings in generate and sample_tree, against the
unconstrained tokens and Python's `re` on their decoded text (byte tokenizer: characters split over tokens)."""
import re

import pytest

from engine import LLM, SamplingParams, TreeParams
from tiny_models import make_tiny_model

PROMPT = list(range(65, 91))  # "ABC...Z" in the byte tokenizer
PATTERNS = [r"[A-Za-z]{2}", r"\d|[xyz]", r"[a-m][^a-m]"]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_tok")
    make_tiny_model("llama_tied", path, tokenizer=True)
    return LLM(path, dtype="float32", block_size=4, num_kv_blocks=512)


def sampling(**kwargs):
    return SamplingParams(**{"temperature": 1.0, "max_tokens": 48, "ignore_eos": True, "seed": 11, "n": 6, **kwargs})


def first_match_end(llm, ids, pattern):
    """Tokens up to the one whose decoded text first holds a match, and that match (the reference). Text that
    ends in U+FFFD is not read yet: the character may be incomplete (its next byte decides)."""
    for k in range(1, len(ids) + 1):
        text = llm.decode(ids[:k])
        found = None if text.endswith("\ufffd") else re.search(pattern, text)
        if found:
            return k, found
    return None, None


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("include", [False, True])
def test_generation_ends_at_the_token_completing_the_first_match(llm, pattern, include):
    free = llm.generate([PROMPT], sampling())[0].outputs
    stopped = llm.generate([PROMPT], sampling(stop_regex=[pattern], include_stop_str_in_output=include))[0].outputs
    matched = 0
    for a, b in zip(free, stopped):
        k, found = first_match_end(llm, a.token_ids, pattern)
        if k is None:  # no match anywhere: exactly the unconstrained sample
            assert (b.token_ids, b.text, b.finish_reason, b.stop_reason) == (a.token_ids, a.text, "length", None)
            continue
        matched += 1
        text = llm.decode(a.token_ids[:k])
        assert b.token_ids == a.token_ids[:k] and b.logprobs == a.logprobs[:k] and b.entropies == a.entropies[:k]
        assert b.finish_reason == "stop" and b.stop_reason == found.group()
        assert b.text == text[:found.end() if include else found.start()]
    assert matched >= 2  # the patterns are common enough in random bytes to be exercised


def test_stop_strings_report_their_stop_reason_and_stop_token_ids_theirs(llm):
    free = llm.generate([PROMPT], sampling(n=1, temperature=0))[0].outputs[0]
    text = llm.decode(free.token_ids)
    pieces = (text[i:i + 2] for i in range(4, len(text) - 2))
    piece = next(p for p in pieces if p.isascii() and p.isprintable())
    out = llm.generate([PROMPT], sampling(n=1, temperature=0, stop=[piece]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == piece and out.text == text[:text.find(piece)]
    out = llm.generate([PROMPT], sampling(n=1, temperature=0, stop=[piece], include_stop_str_in_output=True))
    assert out[0].outputs[0].text == text[:text.find(piece) + 2]
    token = free.token_ids[5]
    out = llm.generate([PROMPT], sampling(n=1, temperature=0, stop_token_ids=[token]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == token
    out = llm.generate([PROMPT], sampling(n=1, temperature=0, max_tokens=3))[0].outputs[0]
    assert out.finish_reason == "length" and out.stop_reason is None


def test_a_pattern_that_never_matches_changes_nothing(llm):
    free = llm.generate([PROMPT], sampling())[0].outputs
    never = llm.generate([PROMPT], sampling(stop_regex=["qqqq(?:zzz)+Q", "^never"]))[0].outputs
    assert [(o.token_ids, o.logprobs, o.text) for o in never] == [(o.token_ids, o.logprobs, o.text) for o in free]


@pytest.mark.parametrize("pattern", PATTERNS[:2])
def test_tree_leaves_stop_at_their_first_match(llm, pattern):
    """Roots and branches alike: a stopped leaf's text first holds a match at its last token (the branch's text
    includes the root's prefix); roots equal the parallel samples with the same stop."""
    params = sampling(n=1, stop_regex=[pattern], include_stop_str_in_output=True)
    tp = TreeParams(trees=5, forks=2, branches=2)
    tree = llm.sample_tree([PROMPT], tp, params)[0]
    llm.engine.check_integrity()
    assert not llm.engine.live_sequences()
    parallel = llm.generate([PROMPT], sampling(n=tp.trees, stop_regex=[pattern], include_stop_str_in_output=True))
    roots = [leaf for leaf in tree.leaves if leaf.fork_position is None]
    assert [r.token_ids for r in roots] == [o.token_ids for o in parallel[0].outputs]
    stopped_branches = 0
    for leaf in tree.leaves:
        k, found = first_match_end(llm, leaf.token_ids, pattern)
        if leaf.finish_reason == "stop":
            assert k == len(leaf.token_ids) and leaf.stop_reason == found.group()
            assert leaf.text == llm.decode(leaf.token_ids)[:found.end()]
            stopped_branches += leaf.fork_position is not None
        else:
            assert k is None and len(leaf.token_ids) == params.max_tokens
    assert stopped_branches >= 2


def test_bad_stop_regex_is_refused_before_anything_runs(llm):
    with pytest.raises(ValueError, match="SamplingParams.stop_regex"):
        SamplingParams(stop_regex=["(a"])
    with pytest.raises(ValueError, match="matches the empty string"):
        SamplingParams(stop_regex="x*")
    with pytest.raises(ValueError, match="non-empty strings"):
        SamplingParams(stop_regex=[""])
    assert SamplingParams(stop_regex="a+").stop_regex == ["a+"]
