"""`truncation_thresholds` on tiny hand-made logits: the logit of the last token the top-k / top-p set keeps
(-inf where a row is not cut), checked against values worked out by hand or by a float64 brute force."""
import math

import pytest
import torch

from ettrl_kernels.sampling_common import row_params, truncation_thresholds

INF = float("inf")


def thresholds(rows, temperature=1.0, top_k=0, top_p=1.0, exclude=None, lse=None):
    logits = torch.tensor(rows, dtype=torch.float32)
    params = row_params(logits, temperature, top_k, top_p, 0, None, 0, exclude)
    if lse is None:
        lse = torch.logsumexp(logits * params.inv_temp[:, None], 1)
    return truncation_thresholds(logits, lse, params).tolist()


def brute_threshold(row, top_k=0, top_p=1.0, exclude=-1):
    """float64 reference: the smallest top-k prefix (of the tokens left after `exclude`) whose share of the
    kept mass reaches top_p; returns the logit of its last token."""
    probs = [math.exp(x) for x in row]
    order = sorted((i for i in range(len(row)) if i != exclude), key=lambda i: -row[i])
    if top_k:
        order = order[:top_k]
    mass = sum(probs[i] for i in order)
    total = 0.0
    for i in order:
        total += probs[i]
        if total >= top_p * mass:
            return row[i]
    return row[order[-1]]


def test_only_sampled_rows_with_top_k_or_top_p_get_a_threshold():
    rows = [[0.0, 2.0, 1.0, -1.0]] * 4
    got = thresholds(rows, temperature=torch.tensor([1.0, 1.0, 0.0, 1.0]), top_k=torch.tensor([2, 0, 2, 0]),
                     top_p=torch.tensor([1.0, 1.0, 0.5, 0.5]))
    # row 0: top-2 of (2, 1, 0, -1) ends at 1; row 1: nothing cut; row 2: greedy, nothing cut;
    # row 3: p(2) = e^2 / (e^2 + e + 1 + e^-1) = 0.64 >= 0.5, so only the best token
    assert got == [1.0, -INF, -INF, 2.0]


def test_a_batch_with_a_single_truncated_row():
    got = thresholds([[0.0, 2.0, 1.0, -1.0], [3.0, 0.0, 1.0, 2.0]], top_k=torch.tensor([0, 3]))
    assert got == [-INF, 1.0]


def test_top_k_one_keeps_only_the_best_token():
    assert thresholds([[0.5, 2.0, 1.0, 1.5]], top_k=1) == [2.0]


def test_excluding_token_zero_with_top_k():
    # token 0 is the best logit but excluded, so the top-1 set is token 3
    assert thresholds([[3.0, 1.0, 0.0, 2.0]], top_k=1, exclude=0) == [2.0]


def test_excluding_token_zero_with_top_p_renormalises_over_the_rest():
    row = [2.0, 1.0, 0.5, 0.0]
    # without token 0: shares e / (e + e^0.5 + 1) = 0.51, then 0.82 >= 0.6, so tokens 1 and 2 are kept
    assert brute_threshold(row, top_p=0.6, exclude=0) == 0.5
    assert thresholds([row], top_p=0.6, exclude=0) == [0.5]
    # the same shares at any offset of the logits (the excluded token holds 0.58 of the mass; lse = -47.4)
    assert thresholds([[x - 50 for x in row]], top_p=0.6, exclude=0) == [0.5 - 50]


def test_excluding_another_token_with_top_p():
    row = [1.0, 2.0, 0.5, 0.0]
    assert brute_threshold(row, top_p=0.6, exclude=1) == 0.5
    assert thresholds([row], top_p=0.6, exclude=1) == [0.5]


def test_prefix_mass_exactly_at_top_p_stops_there():
    # the two best logits differ by 1e-8, below float32 resolution after subtracting lse, so both get the
    # same probability c and the top-2 mass is exactly 2c: token 0 alone has exactly half of it, which meets
    # top_p = 0.5 (in float64 it has a little more than half)
    row = [0.0, -1e-8, -3.0, -3.0]
    assert brute_threshold(row, top_k=2, top_p=0.5) == 0.0
    assert thresholds([row], top_k=2, top_p=0.5) == [0.0]


def test_top_k_larger_than_the_first_window():
    # 100 of 128 distinct logits; at temperature 1e8 every scaled logit rounds to 0, so with lse = 0 every
    # probability is exactly 1 and the sums are exact: the threshold is the 100th largest logit
    row = [i / 128 for i in range(128)]
    got = thresholds([row], temperature=1e8, top_k=100, lse=torch.zeros(1))
    assert got == [torch.tensor(row).sort(descending=True).values[99].item()]


def test_flat_top_p_row_widens_past_the_first_window():
    row = [-i / 256 for i in range(256)]
    expected = brute_threshold(row, top_p=0.9)
    assert expected < -0.8  # more than 64 tokens are needed
    assert thresholds([row], top_p=0.9) == [pytest.approx(expected, abs=1 / 256 / 2)]


def test_peaked_row_is_not_fully_sorted(monkeypatch):
    vocab = 1024
    row = [-10.0] * vocab
    row[7], row[500] = 5.0, 4.0
    widths = []
    sort, topk = torch.Tensor.sort, torch.Tensor.topk

    def recording_sort(self, *args, **kwargs):
        widths.append(self.shape[-1])
        return sort(self, *args, **kwargs)

    def recording_topk(self, k, *args, **kwargs):
        widths.append(k)
        return topk(self, k, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "sort", recording_sort)
    monkeypatch.setattr(torch.Tensor, "topk", recording_topk)
    assert thresholds([row], top_p=0.9) == [4.0]
    assert widths and max(widths) < vocab


def test_top_k_alone_keeps_a_tail_too_small_for_the_float32_sum():
    """Top-k without top-p is the k-th logit, even when the float32 running sum already equals the total before
    it (exp(-30) is below the sum's ulp): a threshold from the cumulative mass cut the third token."""
    assert thresholds([[0.0, -1.0, -30.0, -40.0]], top_k=3) == [-30.0]
    assert thresholds([[0.0, -1.0, -30.0, -40.0, -50.0]], top_k=4) == [-40.0]


def test_top_p_after_excluding_a_token_that_holds_nearly_all_the_mass():
    # the excluded token leaves the others ~1.5e-5 of the mass, less than the float32 lse's rounding at 44 (an ulp
    # is 3.8e-6): 1 - p(excluded) gave the rest a mass 25% off and top-p 0.8 kept one token instead of two
    row = [40.0, 30.0, 29.0, 28.0] + [0.0] * 12
    row[1:4] = [30.0, 28.5, 27.0]
    for temperature in (0.9, 1.0):
        scaled = [x / temperature for x in row]
        want = brute_threshold(scaled, top_p=0.8, exclude=0) * temperature
        assert thresholds([row], temperature=temperature, top_p=0.8, exclude=0) == pytest.approx([want])


def test_top_k_with_a_binding_top_p_ends_at_the_last_token_it_needs():
    # top-3 renormalised: 0.665, 0.245, 0.090; reaching 0.99 takes all three
    assert thresholds([[3.0, 2.0, 1.0, 0.0, -1.0]], top_k=3, top_p=0.99) == [1.0]


def test_top_k_with_top_p_within_rounding_of_one_stays_inside_the_top_k():
    # top_p = 0.99999994 (the float32 below 1): for this row the float32 running sum of the top 50 ends below
    # top_p times their sum, so the top-p count runs past k; the cut must still be the 50th logit
    logits = torch.randn(1, 200, generator=torch.Generator().manual_seed(158))
    want = logits.sort(descending=True).values[0, 49].item()
    assert thresholds(logits.tolist(), top_k=50, top_p=0.99999994) == [want]


def test_a_top_p_the_float32_sum_never_reaches_keeps_the_whole_row():
    # an lse 0.01 too large (the sampler's float32 lse is off by rounding, less so) makes the probabilities sum
    # to 0.99 < top_p: after the full sort nothing is cut
    row = [float(x) for x in torch.linspace(2.0, -2.0, 100)]
    lse = torch.logsumexp(torch.tensor([row]), 1) + 0.01
    assert thresholds([row], top_p=0.995, lse=lse) == [row[-1]]
