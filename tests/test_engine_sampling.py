"""The engine's sampled tokens against the brute-force distribution of the model's own logits.

Many seeded draws of one token after a fixed prompt (n samples of one request: each its own noise) are
compared with softmax(logits / T) from transformers, restricted to the top-k / top-p set computed by a full
float64 sort: the support must be exact (no token outside the set, ever) and the counts must pass a Pearson
chi-square test. Exclusion (distinct tree branches) is checked the same way against p without the root's
token. The draws are seeded, so each test is deterministic; the p-value bound (1e-4) says how surprising the
counts would have to be for a correct sampler.
"""
import math

import pytest
import torch

from engine import LLM, SamplingParams, TreeParams
from tiny_models import make_tiny_model

PROMPT = [65, 66, 67, 68, 69]
DRAWS = 4000


@pytest.fixture(scope="module")
def model_and_llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("sampling_llama")
    model = make_tiny_model("llama", path, tokenizer=True)
    return model, LLM(path, dtype="float32", block_size=4, num_kv_blocks=4096)


@torch.no_grad()
def next_token_logits(model, contexts: list[list[int]]) -> torch.Tensor:
    """transformers' fp32 logits of the token after each context (all the same length), float64 [N, V]."""
    return model(torch.tensor(contexts)).logits[:, -1].double()


def allowed_set(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Brute force: sort, keep the top k, then the smallest prefix whose renormalised mass reaches top_p;
    tokens tied with the last kept logit stay (the sampler's threshold semantics)."""
    values = logits.sort(descending=True).values
    keep = len(values) if top_k <= 0 else min(top_k, len(values))
    probs = torch.softmax(values / temperature, 0)[:keep]
    if top_p < 1:
        cum = (probs / probs.sum()).cumsum(0)
        # a cut this close to top_p would depend on float32 rounding: the test's parameters must avoid it
        assert (cum - top_p).abs().min() > 1e-4, "top_p sits on a cumulative-mass boundary; pick another"
        keep = min(keep, int((cum < top_p).sum()) + 1)
    return logits >= values[keep - 1]


def chi_square_p_value(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's test, bins with expected count < 5 pooled; p from the Wilson-Hilferty approximation."""
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum()[None]]).double()
    exp = torch.cat([expected[~small], expected[small].sum()[None]]).double()
    if exp[-1] < 5:  # the pooled bin is still too small: fold it into the smallest large bin
        i = int(exp[:-1].argmin())
        obs[i] += obs[-1]
        exp[i] += exp[-1]
        obs, exp = obs[:-1], exp[:-1]
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = len(exp) - 1
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


def first_tokens(llm, params: SamplingParams) -> torch.Tensor:
    out = llm.generate([PROMPT], params)[0].outputs
    assert len(out) == params.n
    return torch.tensor([o.token_ids[0] for o in out])


CASES = [
    {"temperature": 1.0},
    {"temperature": 0.6},
    {"temperature": 1.7},
    {"temperature": 1.0, "top_k": 5},
    {"temperature": 0.8, "top_p": 0.6},
    {"temperature": 1.3, "top_k": 40, "top_p": 0.7},
    {"temperature": 1.0, "top_p": 0.25},
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_sampled_tokens_follow_the_truncated_softmax(model_and_llm, case):
    model, llm = model_and_llm
    logits = next_token_logits(model, [PROMPT])[0]
    t, k, p = case["temperature"], case.get("top_k", -1), case.get("top_p", 1.0)
    allowed = allowed_set(logits, t, k, p)
    if k > 0 or p < 1:
        assert 1 < int(allowed.sum()) < len(logits) - 1  # the case really truncates
    tokens = first_tokens(llm, SamplingParams(n=DRAWS, max_tokens=1, temperature=t, top_k=k, top_p=p, seed=7,
                                              ignore_eos=True))
    counts = torch.bincount(tokens, minlength=len(logits)).double()
    assert counts[~allowed].sum() == 0, f"sampled outside the top-k/top-p set: {torch.nonzero(counts * ~allowed)}"
    target = torch.softmax(logits / t, 0) * allowed
    expected = DRAWS * target / target.sum()
    assert chi_square_p_value(counts[allowed], expected[allowed]) > 1e-4


def test_the_chi_square_test_rejects_a_wrong_temperature(model_and_llm):
    """The test above has power: draws at T = 1 do not pass for T = 0.8 (or for the untruncated softmax)."""
    model, llm = model_and_llm
    logits = next_token_logits(model, [PROMPT])[0]
    counts = torch.bincount(first_tokens(llm, SamplingParams(n=DRAWS, max_tokens=1, temperature=1.0, seed=7,
                                                             ignore_eos=True)), minlength=len(logits)).double()
    assert chi_square_p_value(counts, DRAWS * torch.softmax(logits / 0.8, 0)) < 1e-6
    top = allowed_set(logits, 1.0, -1, 0.6)
    assert chi_square_p_value(counts[top], DRAWS * torch.softmax(logits, 0)[top]) < 1e-6 or counts[~top].sum() > 0


def test_greedy_always_takes_the_argmax(model_and_llm):
    model, llm = model_and_llm
    logits = next_token_logits(model, [PROMPT])[0]
    tokens = first_tokens(llm, SamplingParams(n=50, max_tokens=1, temperature=0.0, seed=7, ignore_eos=True))
    assert (tokens == int(logits.argmax())).all()


def test_distinct_branches_exclude_the_roots_token(model_and_llm):
    """Each branch resamples the fork token with the root's token excluded: never equal to it, and distributed
    as the model's softmax at that context renormalised without it."""
    model, llm = model_and_llm
    t = 1.2
    trees = llm.sample_tree([PROMPT], TreeParams(trees=1500, forks=1, branches=1, distinct=True),
                            SamplingParams(max_tokens=2, temperature=t, seed=5, ignore_eos=True))[0]
    roots = {leaf.root: leaf for leaf in trees.leaves if leaf.fork_position is None}
    branches = [leaf for leaf in trees.leaves if leaf.fork_position is not None]
    assert len(branches) == 1500 and all(b.fork_position == 1 for b in branches)
    excluded = torch.tensor([roots[b.root].token_ids[1] for b in branches])
    drawn = torch.tensor([b.token_ids[1] for b in branches])
    assert torch.equal(torch.tensor([b.token_ids[0] for b in branches]),
                       torch.tensor([roots[b.root].token_ids[0] for b in branches]))
    assert not (drawn == excluded).any()
    contexts = sorted({roots[b.root].token_ids[0] for b in branches})
    probs = torch.softmax(next_token_logits(model, [PROMPT + [c] for c in contexts]) / t, -1)
    row = {c: i for i, c in enumerate(contexts)}
    expected = torch.zeros(probs.shape[1], dtype=torch.float64)
    for b, x in zip(branches, excluded.tolist()):
        q = probs[row[b.token_ids[0]]].clone()
        q[x] = 0
        expected += q / q.sum()
    counts = torch.bincount(drawn, minlength=probs.shape[1]).double()
    assert chi_square_p_value(counts, expected) > 1e-4
