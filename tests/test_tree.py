"""ETMR tree sampling on the engine: structure, fork selection, KV reuse, accounting, memory pressure."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from engine import LLM, SamplingParams, TreeParams
from engine.sequence import Sequence
from engine.tree_select import select_fork_positions

PROMPTS = [[1, 5, 9, 14, 3, 7, 22, 8, 31, 4, 17], [2, 40, 6, 6, 13]]
STOP_TOKENS = [3, 11]  # random lengths: roots finish at different steps, some too short for N forks


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=48, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.2, tie_word_embeddings=False, bos_token_id=0, eos_token_id=47)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return str(path)


def make_llm(model_dir, **kwargs):
    kwargs = {"dtype": "float32", "block_size": 4, "num_kv_blocks": 512, **kwargs}
    return LLM(model_dir, **kwargs)


@pytest.fixture(scope="module")
def llm(model_dir):
    return make_llm(model_dir)


def params(**kwargs):
    kwargs = {"temperature": 1.0, "max_tokens": 14, "seed": 1234, "stop_token_ids": STOP_TOKENS, **kwargs}
    return SamplingParams(**kwargs)


def run_trees(llm, tp, sp):
    before = (llm.engine.num_prefill_tokens, llm.engine.num_decode_tokens)
    trees = llm.sample_tree(PROMPTS, tp, sp)
    llm.engine.check_integrity()
    assert not llm.engine.live_sequences()  # every root and branch was freed
    after = (llm.engine.num_prefill_tokens, llm.engine.num_decode_tokens)
    return trees, after[0] - before[0], after[1] - before[1]


def roots_and_branches(tree):
    roots = {leaf.root: leaf for leaf in tree.leaves if leaf.fork_position is None}
    return roots, [leaf for leaf in tree.leaves if leaf.fork_position is not None]


@pytest.mark.parametrize("metric", ["entropy", "surprisal"])
def test_tree_structure_and_fork_selection(llm, metric):
    tp = TreeParams(trees=4, forks=2, branches=2, metric=metric)
    trees, _, decoded = run_trees(llm, tp, params())
    assert len(trees) == len(PROMPTS)
    for tree in trees:
        roots, branches = roots_and_branches(tree)
        assert sorted(roots) == list(range(tp.trees))
        for r, root in roots.items():
            values = root.entropies if metric == "entropy" else [-lp for lp in root.logprobs]
            assert tree.fork_positions[r] == select_fork_positions(values, tp.forks)  # token ids: no \boxed cut
            assert len(tree.fork_positions[r]) == min(tp.forks, len(root.token_ids) - 1)
        expected_leaves = sum(1 + tp.branches * len(p) for p in tree.fork_positions)
        assert len(tree.leaves) == tree.stats.leaves == expected_leaves
        for leaf in branches:
            root, t = roots[leaf.root], leaf.fork_position
            assert leaf.token_ids[:t] == root.token_ids[:t]
            assert leaf.logprobs[:t] == root.logprobs[:t] and leaf.entropies[:t] == root.entropies[:t]
            assert len(leaf.logprobs) == len(leaf.entropies) == len(leaf.token_ids)
            assert t in tree.fork_positions[leaf.root]
        stats = tree.stats
        assert stats.reused_tokens == sum(leaf.fork_position for leaf in branches)
        assert stats.parallel_equivalent_tokens == sum(len(leaf.token_ids) for leaf in tree.leaves)
        assert stats.decoded_tokens == stats.parallel_equivalent_tokens - stats.reused_tokens
    # The engine's decode steps computed exactly these tokens; each root's first token came from the prefill.
    assert decoded == sum(tree.stats.decoded_tokens - tp.trees for tree in trees)


def test_full_trees_have_m_times_1_plus_bn_leaves(llm):
    tp = TreeParams(trees=3, forks=3, branches=2)
    trees, _, _ = run_trees(llm, tp, params(stop_token_ids=[], max_tokens=8, ignore_eos=True))
    for tree in trees:
        assert len(tree.leaves) == tp.num_leaves == 3 * (1 + 2 * 3)
        assert all(len(leaf.token_ids) == 8 for leaf in tree.leaves)


def test_roots_are_the_parallel_samples_of_the_same_seed(llm):
    tp = TreeParams(trees=4, forks=1, branches=1)
    trees, _, _ = run_trees(llm, tp, params())
    parallel = llm.generate(PROMPTS, params(n=tp.trees))
    for tree, request in zip(trees, parallel):
        roots, _ = roots_and_branches(tree)
        assert [roots[r].token_ids for r in range(tp.trees)] == [o.token_ids for o in request.outputs]


def test_per_prompt_sampling_params_give_each_prompt_its_own_seed(llm):
    tp = TreeParams(trees=3, forks=1, branches=1)
    per_prompt = [params(seed=100 + i) for i in range(len(PROMPTS))]
    trees = llm.sample_tree(PROMPTS, tp, per_prompt)
    for i, (prompt, tree) in enumerate(zip(PROMPTS, trees)):
        assert tree.seed == 100 + i
        alone = llm.sample_tree([prompt], tp, params(seed=100 + i))[0]  # same leaves as a call of its own
        assert [leaf.token_ids for leaf in tree.leaves] == [leaf.token_ids for leaf in alone.leaves]
    with pytest.raises(ValueError, match="prompts but"):
        llm.sample_tree(PROMPTS, tp, per_prompt[:1])


@pytest.mark.parametrize("min_gap", [1, 3])
def test_no_fork_from_the_first_marker_on(llm, monkeypatch, min_gap):
    """With a tokenizer, positions from the token that starts the first no_fork_after marker onward are never
    forks; without markers every position but the first is allowed."""
    boxed = {5, 6, 7, 8, 9, 10}
    monkeypatch.setattr(llm, "tokenizer", object())
    monkeypatch.setattr(llm, "decode", lambda ids: "".join("\\boxed{" if i in boxed else "x" for i in ids))
    for markers in (["\\boxed{"], []):
        tp = TreeParams(trees=6, forks=2, branches=1, no_fork_after=markers, min_gap=min_gap)
        trees, _, _ = run_trees(llm, tp, params(stop_token_ids=[], ignore_eos=True))
        cut_somewhere = False
        for tree in trees:
            roots, _ = roots_and_branches(tree)
            for r, root in roots.items():
                first_box = min((k for k, tok in enumerate(root.token_ids) if tok in boxed), default=None)
                cut_somewhere |= first_box is not None
                end = first_box if markers else None
                assert tree.fork_positions[r] == select_fork_positions(root.entropies, tp.forks, end=end,
                                                                       min_gap=min_gap)
        assert cut_somewhere


def test_distinct_branches_resample_a_different_token(llm):
    trees, _, _ = run_trees(llm, TreeParams(trees=4, forks=2, branches=3, distinct=True), params())
    for tree in trees:
        roots, branches = roots_and_branches(tree)
        assert branches
        for leaf in branches:
            assert leaf.token_ids[leaf.fork_position] != roots[leaf.root].token_ids[leaf.fork_position]


def test_branch_prefix_is_never_prefilled(model_dir):
    tp = TreeParams(trees=4, forks=2, branches=2)
    fresh = make_llm(model_dir)
    with_branches, prefilled, _ = run_trees(fresh, tp, params())
    assert fresh.engine.scheduler.num_preemptions == 0  # else recomputation would be prefill too
    assert sum(t.stats.reused_tokens for t in with_branches) > 0
    assert prefilled == sum(map(len, PROMPTS))  # each prompt once (its M roots share it); no branch prefix


def test_branch_from_shared_kv_equals_prefill_from_scratch(llm, model_dir):
    sp = params()
    tree = llm.sample_tree(PROMPTS[:1], TreeParams(trees=3, forks=2, branches=2), sp)[0]
    roots, branches = roots_and_branches(tree)
    fresh = make_llm(model_dir)
    for leaf in branches[:6]:
        prefix = PROMPTS[0] + roots[leaf.root].token_ids[:leaf.fork_position]
        seq = Sequence(prefix, sp, tree.seed, seq_id=leaf.seq_id, num_prompt_tokens=len(PROMPTS[0]))
        fresh.engine.add_sequence(seq)
        while not seq.is_finished:
            fresh.engine.step()
        assert seq.completion_token_ids == leaf.token_ids
        own = len(leaf.token_ids) - leaf.fork_position
        torch.testing.assert_close(torch.tensor(seq.logprobs[-own:]), torch.tensor(leaf.logprobs[-own:]),
                                   rtol=1e-4, atol=1e-4)
        fresh.engine.free(seq)


def test_small_kv_pool_gives_the_same_leaves(llm, model_dir):
    tp, sp = TreeParams(trees=4, forks=2, branches=2), params()
    roomy, _, _ = run_trees(llm, tp, sp)
    cramped_llm = make_llm(model_dir, num_kv_blocks=16)  # 64 token slots: a few sequences at a time
    cramped, _, _ = run_trees(cramped_llm, tp, sp)
    assert cramped_llm.engine.scheduler.num_preemptions > 0
    for a, b in zip(roomy, cramped):
        assert ([(leaf.origin, leaf.token_ids) for leaf in a.leaves]
                == [(leaf.origin, leaf.token_ids) for leaf in b.leaves])


def test_branches_join_while_other_roots_still_decode(llm):
    events = []
    engine = llm.engine
    step, fork = engine.step, engine.fork

    def logged_step():
        finished = step()
        events.extend(("finish", s.parent_uid is None) for s in finished)
        return finished

    def logged_fork(*args, **kwargs):
        events.append(("fork", None))
        return fork(*args, **kwargs)

    engine.step, engine.fork = logged_step, logged_fork
    try:
        llm.sample_tree(PROMPTS, TreeParams(trees=6, forks=2, branches=2), params(max_tokens=24))
    finally:
        del engine.step, engine.fork
    first_fork = events.index(("fork", None))
    assert ("finish", True) in events[first_fork:]  # some root finished after the first branch was forked


def test_an_interrupted_call_frees_everything(llm, monkeypatch):
    step, calls = llm.engine.step, []

    def failing_step():
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return step()

    monkeypatch.setattr(llm.engine, "step", failing_step)
    with pytest.raises(KeyboardInterrupt):
        llm.sample_tree(PROMPTS, TreeParams(trees=4, forks=2, branches=2), params(max_tokens=8))
    assert not llm.engine.live_sequences() and not llm.engine.has_unfinished()
    llm.engine.check_integrity()


def test_bad_tree_params_are_rejected():
    with pytest.raises(ValueError, match="metric"):
        TreeParams(metric="variance")
    with pytest.raises(ValueError, match="trees"):
        TreeParams(trees=0)
    with pytest.raises(ValueError, match="branches"):
        TreeParams(branches=-1)


def test_n_other_than_one_is_rejected(llm):
    with pytest.raises(ValueError, match="n == 1"):
        llm.sample_tree(PROMPTS, TreeParams(), params(n=4))


def test_progress_bar_counts_every_leaf(llm, monkeypatch, capsys):
    """use_tqdm: the bar's total shrinks for roots too short for N forks and ends at the number of leaves."""
    import engine.tree
    from engine.progress import Progress

    bars = []

    class Recording(Progress):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.done = 0
            bars.append(self)

        def update(self, finished: int = 1):
            super().update(finished)
            self.done += finished

    monkeypatch.setattr(engine.tree, "Progress", Recording)
    tp = TreeParams(trees=4, forks=6, branches=1)
    quiet = llm.sample_tree(PROMPTS, tp, params())
    shown = llm.sample_tree(PROMPTS, tp, params(), use_tqdm=True)
    assert ([[leaf.token_ids for leaf in t.leaves] for t in shown]
            == [[leaf.token_ids for leaf in t.leaves] for t in quiet])
    leaves = sum(len(t.leaves) for t in shown)
    assert leaves < len(PROMPTS) * tp.num_leaves  # some roots were too short: the total had to shrink
    assert bars[-1].done == bars[-1].bar.total == leaves
    assert "trees" in capsys.readouterr().out


def leaf_keys(trees):
    return [[(leaf.origin, leaf.token_ids, leaf.logprobs) for leaf in t.leaves] for t in trees]


def test_branching_after_all_roots_gives_the_same_leaves(llm):
    """Deferring the forks until a prompt's roots have all finished changes when branches run, not what they
    sample: every leaf's noise is keyed by (seed, seq_id, position)."""
    tp = TreeParams(trees=4, forks=2, branches=2)
    now, _, _ = run_trees(llm, tp, params())
    later, _, _ = run_trees(llm, TreeParams(trees=4, forks=2, branches=2, branch_after_all_roots=True), params())
    assert leaf_keys(later) == leaf_keys(now)
    assert [t.fork_positions for t in later] == [t.fork_positions for t in now]


def test_select_roots_forks_only_the_chosen_roots(llm):
    tp = TreeParams(trees=5, forks=2, branches=2)
    full, _, _ = run_trees(llm, tp, params())
    calls = []

    def select(i, roots):
        calls.append((i, [leaf.root for leaf in roots], [leaf.token_ids for leaf in roots]))
        return [r for r in range(len(roots)) if (r + i) % 2 == 0]  # prompt 0: roots 0 2 4; prompt 1: roots 1 3

    some = llm.sample_tree(PROMPTS, tp, params(), select_roots=select)
    llm.engine.check_integrity()
    assert not llm.engine.live_sequences()
    assert sorted(i for i, *_ in calls) == [0, 1]  # once per prompt, with its roots in order
    for (i, order, tokens), tree in zip(sorted(calls), full):
        assert order == list(range(tp.trees))
        assert tokens == [leaf.token_ids for leaf in tree.leaves if leaf.fork_position is None]
    for i, (a, b) in enumerate(zip(full, some)):
        chosen = {r for r in range(tp.trees) if (r + i) % 2 == 0}
        expected = [leaf for leaf in a.leaves if leaf.fork_position is None or leaf.root in chosen]
        assert [(x.origin, x.token_ids) for x in b.leaves] == [(x.origin, x.token_ids) for x in expected]
        assert b.stats.decoded_tokens == sum(len(x.token_ids) - (x.fork_position or 0) for x in expected)
    nothing = llm.sample_tree(PROMPTS, tp, params(), select_roots=lambda i, roots: [])
    assert all(len(t.leaves) == tp.trees for t in nothing)


def test_a_bad_root_selection_leaves_the_engine_clean(llm):
    with pytest.raises(ValueError, match="root indices are 0..2"):
        llm.sample_tree(PROMPTS, TreeParams(trees=3, forks=1, branches=1), params(), select_roots=lambda i, r: [7])
    assert not llm.engine.live_sequences() and not llm.engine.has_unfinished()
    llm.engine.check_integrity()


def test_bad_fork_placement_params_are_rejected():
    with pytest.raises(ValueError, match="min_gap"):
        TreeParams(min_gap=0)
    with pytest.raises(ValueError, match="no_fork_after"):
        TreeParams(no_fork_after=[""])
    assert TreeParams(no_fork_after="\\boxed{").no_fork_after == ["\\boxed{"]
