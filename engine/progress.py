"""A progress bar over finished responses for `LLM.generate` and `LLM.sample_tree` (use_tqdm=True).

It shows responses done out of responses asked for and the decode rate in tokens/s from the engine's own
counter; disabled, every call is a no-op, so library users who drive their own loop pay nothing.
"""
from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only
    from engine.llm_engine import LLMEngine


class Progress:
    def __init__(self, engine: LLMEngine, total: int, desc: str, enabled: bool) -> None:
        self.engine, self.bar = engine, None
        if enabled:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, desc=desc, unit="response", leave=False, file=sys.stdout,
                            dynamic_ncols=True)
            self.start, self.tokens0 = time.perf_counter(), engine.num_decode_tokens

    def update(self, finished: int = 1) -> None:
        if self.bar is None or not finished:
            return
        rate = (self.engine.num_decode_tokens - self.tokens0) / max(1e-9, time.perf_counter() - self.start)
        self.bar.set_postfix_str(f"{rate:.0f} tok/s", refresh=False)
        self.bar.update(finished)

    def shrink(self, fewer: int) -> None:
        """The total drops (a root too short for all its fork points has fewer branches)."""
        if self.bar is not None and fewer:
            self.bar.total -= fewer
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
