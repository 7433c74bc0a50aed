"""Pacing a long prompt's prefill beside running decodes (engine/prefill_pacing.py): the credit rule by hand, and in
the engine under a modeled clock: the decodes keep their share of the time, short prompts are never held back, the
long prompt still finishes, and nobody's tokens change."""
from types import SimpleNamespace

import pytest
from test_chunked_prefill import LONG, PARAMS, record_steps, reference, tiny_llm

from engine import SamplingParams
from engine.config import EngineConfig
from engine.prefill_pacing import PrefillPacer, StepKind
from staggered import drive
from tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_tiny_model("llama", path)
    return path


DECODE, PIECE = 0.010, 0.030  # modeled seconds: a step of decodes, and what a long prompt's piece adds to it


def plan(pacer: PrefillPacer, steps: int) -> str:
    """Runs `steps` steps of 4 decodes beside a long prompt: M where a piece went in (DECODE + PIECE), D where not."""
    out = ""
    for _ in range(steps):
        paced = pacer.allow()
        out += "M" if paced else "D"
        pacer.scheduled(StepKind(4, int(paced), paced), long_pending=True)
        pacer.observe(DECODE + PIECE if paced else DECODE)
    return out


def test_credit_rule_by_hand():
    """share 0.5, decodes 10 ms, a paced step 40 ms: it owes 2 x 10 - 40 = -20 ms, repaid by two decode-only
    steps of 10 ms (each earns 10 / 0.5 - 10), so pieces go every third step and the decodes have half the time."""
    pacer = PrefillPacer(0.5)
    pacer.scheduled(StepKind(num_decodes=4), long_pending=False)
    pacer.observe(DECODE)
    assert plan(pacer, 9) == "MDDMDDMDD"
    assert pacer.credit == pytest.approx(0.0)
    pacer.scheduled(StepKind(4), long_pending=False)  # the long prompt is done: nothing carries over
    assert pacer.credit == 0.0 and pacer.allow()


def test_cheap_pieces_bank_nothing_and_short_prefill_still_repays():
    pacer = PrefillPacer(0.5)
    pacer.scheduled(StepKind(2), long_pending=True)
    pacer.observe(DECODE)
    pacer.scheduled(StepKind(2, 1, True), long_pending=True)
    pacer.observe(DECODE + 0.001)  # cheaper than the decodes' share: allowed again, nothing saved
    assert pacer.credit == 0.0 and pacer.allow()
    pacer.scheduled(StepKind(2, 1, True), long_pending=True)
    pacer.observe(DECODE + PIECE)
    assert not pacer.allow()
    pacer.scheduled(StepKind(2, 3, False), long_pending=True)  # short prompts' pieces beside the decodes
    pacer.observe(0.5)
    pacer.scheduled(StepKind(2, 3, False), long_pending=True)
    pacer.observe(0.5)
    assert pacer.allow()  # repaid at the decodes' rate, whatever the short prompts cost


def test_a_pause_between_steps_does_not_switch_pacing_off():
    """A decode-only cycle that spans a pause (the caller stopped stepping) would let every later piece through;
    a paced cycle shorter than it shows it stale, and the next step measures the decodes alone again."""
    pacer = PrefillPacer(0.5)
    pacer.scheduled(StepKind(2), long_pending=True)
    pacer.observe(60.0)
    assert plan(pacer, 6) == "MDMDDM"


def test_first_paced_step_without_a_decode_measurement_waits_one_step():
    pacer = PrefillPacer(0.5)
    pacer.scheduled(StepKind(3, 1, True), long_pending=True)
    pacer.observe(1.0)
    assert not pacer.allow()
    pacer.scheduled(StepKind(3), long_pending=True)
    pacer.observe(DECODE)
    assert pacer.allow()


@pytest.mark.parametrize("share", [-0.1, 1.0, float("nan")])
def test_share_is_checked(share):
    with pytest.raises(ValueError, match="decode_share"):
        EngineConfig(model="m", device="cpu", decode_share=share)


class ModeledClock:
    """time.perf_counter for the engine, read once at the start of each step: the step before it lasted DECODE,
    plus PIECE when it computed a piece of LONG."""

    def __init__(self, steps: list) -> None:
        self.now, self.steps, self.seen = 0.0, steps, 0

    def perf_counter(self) -> float:
        if len(self.steps) > self.seen:
            self.seen = len(self.steps)
            self.now += DECODE + PIECE * any(length == len(LONG) and not decode
                                             for _, _, _, decode, length in self.steps[-1])
        return self.now


def paced_run(model_dir, monkeypatch, share: float):
    llm = tiny_llm(model_dir, max_num_batched_tokens=40, long_prefill_token_threshold=8, decode_share=share)
    steps = record_steps(llm)
    monkeypatch.setattr("engine.llm_engine.time", SimpleNamespace(perf_counter=ModeledClock(steps).perf_counter))
    arrivals = [(0, [1, 2, 3], SamplingParams(n=3, max_tokens=90, seed=1, ignore_eos=True)), (2, LONG, PARAMS),
                (6, [5, 6, 7, 8], SamplingParams(max_tokens=3, seed=4))]
    return drive(llm, arrivals), steps


def long_steps(steps) -> list[int]:
    return [i for i, step in enumerate(steps) if any(n and length == len(LONG) and not decode
                                                     for _, _, n, decode, length in step)]


def test_engine_spaces_long_pieces_and_keeps_tokens(model_dir, monkeypatch):
    """3 decodes run, a 150-token prompt (longer than the 40-token budget) arrives at step 2 and a short prompt at
    step 6. Paced at 0.5 the long prompt's pieces go every third step and the decodes keep half the modeled time;
    unpaced they go every step. The short prompt prefills in the step it arrives, and every request gets the
    tokens it gets alone."""
    paced, paced_steps = paced_run(model_dir, monkeypatch, 0.5)
    unpaced, unpaced_steps = paced_run(model_dir, monkeypatch, 0.0)
    first = long_steps(paced_steps)
    assert len(first) == len(LONG) // 8 + 1 == len(long_steps(unpaced_steps))
    assert all(b - a == 3 for a, b in zip(first, first[1:]))
    window = range(first[0], first[-1])
    decode_time = DECODE * len(window)
    assert decode_time / (decode_time + PIECE * len(first[:-1])) >= 0.5 - 1e-9
    unpaced_first = long_steps(unpaced_steps)
    assert unpaced_first == list(range(unpaced_first[0], unpaced_first[-1] + 1))
    short = [i for i, step in enumerate(paced_steps) if any(length == 4 and not decode for *_, decode, length in step)]
    assert short[0] == 6
    assert paced == unpaced
    alone = reference(model_dir, [(0, [1, 2, 3], SamplingParams(n=3, max_tokens=90, seed=1, ignore_eos=True)),
                                  (0, LONG, PARAMS), (0, [5, 6, 7, 8], SamplingParams(max_tokens=3, seed=4))])
    assert paced == alone
