"""The torch path's routes, each against the float64 reference of test_sampling_backends.py, with a spy that proves
the route ran: pruned winners (noise drawn only for the blocks that can still win; taken when the logits are
peaked, as a language model's are), dense winners, and batches split into several chunks of rows. Plus the bound
the pruning rests on, on every backend: a token with the largest possible noise wins from GUMBEL_MAX below the top.
"""
import pytest
import torch
from test_sampling_backends import BACKENDS, check, sample

from ettrl_kernels import sampling_torch
from ettrl_kernels.noise import GUMBEL_MAX, gumbel, row_keys


def peaked(batch, vocab, seed):
    """Logits spread like a language model's: a bulk around 0 and a few tokens 20-30 nats above it, so most
    32-token blocks cannot win."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=g) * 3
    spikes = torch.randint(0, vocab, (batch, 4), generator=g)
    return logits.scatter_(1, spikes, torch.rand(batch, 4, generator=g) * 10 + 20)


@pytest.fixture
def routes(monkeypatch):
    """Counts the rows each winner route answered for."""
    seen = {"pruned": 0, "dense": 0}
    pruned, dense = sampling_torch._pruned_winners, sampling_torch._dense_winners

    def spy_pruned(x, *args):
        out = pruned(x, *args)
        seen["pruned"] += 0 if out is None else x.shape[0]
        return out

    def spy_dense(x, *args):
        seen["dense"] += x.shape[0]
        return dense(x, *args)

    monkeypatch.setattr(sampling_torch, "_pruned_winners", spy_pruned)
    monkeypatch.setattr(sampling_torch, "_dense_winners", spy_dense)
    return seen


TEMPERATURES = torch.tensor([1.0, 0.7, 0.0, 1.0, 0.5, 1.0, 0.9, 1.0])
EXCLUDE = torch.tensor([-1, 0, -1, 3, -1, -1, 0, -1])  # token 0 too: the first id is a token like any other
CASES = [dict(), dict(top_k=5), dict(top_p=0.7), dict(top_k=40, top_p=0.9), dict(exclude=EXCLUDE),
         dict(top_p=0.8, exclude=EXCLUDE)]


@pytest.mark.parametrize("kwargs", CASES, ids=["plain", "top_k", "top_p", "top_k_top_p", "exclude", "top_p_exclude"])
def test_pruned_winners_against_float64(kwargs, routes):
    logits = peaked(8, 1024, 5)
    logits[[1, 6], 0] = 40.0  # token 0 is the top of the rows that exclude it
    check("torch", logits, temperature=TEMPERATURES, seeds=11, positions=3, **kwargs)
    assert routes == {"pruned": 8, "dense": 0}


@pytest.mark.parametrize("vocab,route", [(1024, "pruned"), (1000, "dense")])  # 1000: not a multiple of 32
@pytest.mark.parametrize("kwargs", [dict(), dict(top_p=0.8, exclude=EXCLUDE)], ids=["plain", "top_p_exclude"])
def test_rows_in_several_chunks_against_float64(vocab, route, kwargs, routes, monkeypatch):
    """Chunks of 3, 3 and 2 rows (the chunk size shrunk from about a million logits to three rows)."""
    monkeypatch.setattr(sampling_torch, "CHUNK_ELEMENTS", 3 * vocab)
    monkeypatch.setattr(sampling_torch, "CHUNK_ELEMENTS_THREADED", 3 * vocab)
    logits = peaked(8, vocab, 6)
    logits[[1, 6], 0] = 40.0
    check("torch", logits, temperature=TEMPERATURES, seeds=12, positions=1, **kwargs)
    assert routes[route] == 8


# noise.py gives the pair (seed 5402, token 46) at seq_id 0, position 0 the largest u, 1 - 2**-24 (found by a
# search over 2**20 seeds); token 65's noise is below that of token 2 (a block index taken for a token id
# would raise the bound)
SEED, LUCKY, TOP = 5402, 46, 65


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_token_with_the_largest_noise_wins_from_gumbel_max_below_the_top(backend):
    """The top token scores x_top + g_top; a token GUMBEL_MAX - 5e-4 below that scores 5e-4 more when its noise
    is the largest possible, so it must win: the pruning margin may cover rounding, never more."""
    noise = gumbel(row_keys(torch.tensor([SEED]), torch.tensor([0]), torch.tensor([0]))[:, None],
                   torch.arange(256)[None, :])[0].double()
    assert noise[LUCKY] == torch.tensor(GUMBEL_MAX, dtype=torch.float32).double()
    assert noise[TOP // 32] > noise[TOP] + 0.5
    logits = torch.full((1, 256), -40.0)
    logits[0, TOP] = 0.0
    logits[0, LUCKY] = float(noise[TOP]) - GUMBEL_MAX + 5e-4
    tokens = sample(backend, logits, temperature=1.0, seeds=SEED, seq_ids=torch.tensor([0]))[0]
    assert tokens.tolist() == [LUCKY]
    logits[0, LUCKY] -= 2e-3  # and it loses when it is further below
    tokens = sample(backend, logits, temperature=1.0, seeds=SEED, seq_ids=torch.tensor([0]))[0]
    assert tokens.tolist() == [TOP]
