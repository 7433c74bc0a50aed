"""Requests that arrive while others run: the test driver shared by the chunked-prefill and seed-under-load tests."""
from __future__ import annotations

from collections.abc import Callable

from engine import LLM, SamplingParams

Arrival = tuple[int, list[int], SamplingParams]  # (the step it arrives at, prompt token ids, its parameters)


def drive(llm: LLM, arrivals: list[Arrival], check: Callable[[], None] | None = None
          ) -> list[list[tuple[list[int], list[float]]]]:
    """Adds each request at its arrival step, runs to the end checking integrity (and `check`) after every step;
    returns each request's [(tokens, logprobs)] per sample."""
    engine = llm.engine
    pending, submitted, step = sorted(range(len(arrivals)), key=lambda i: arrivals[i][0]), {}, 0
    while pending or engine.has_unfinished():
        while pending and arrivals[pending[0]][0] <= step:
            i = pending.pop(0)
            submitted[i] = engine.make_sequences(arrivals[i][1], arrivals[i][2])
            engine.add_sequence(submitted[i][0])
        for seq in engine.step():
            engine.free(seq)
        llm.check_integrity()
        if check is not None:
            check()
        step += 1
    return [[(s.completion_token_ids, s.logprobs) for s in submitted[i]] for i in range(len(arrivals))]
