"""Per-request sampling settings."""
import math
from dataclasses import dataclass, field

from engine.stop_regex import StopPatterns, compile_stop_patterns

LOGPROBS_MODES = ("processed_logprobs", "raw_logprobs")
MIN_TEMPERATURE = 1e-6  # below it (but above 0) logits / T can overflow float32: give 0 for greedy
INT64_LIMIT = 2**63


@dataclass
class SamplingParams:
    """temperature=0 is greedy. top_k=-1 and top_p=1 disable truncation. seed=None draws a random seed per request.

    Sample j of a request draws its noise from the key (seed, j, position), so its tokens do not depend on
    the rest of the batch.
    """
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 16
    stop: list[str] | str | None = None
    stop_regex: list[str] | str | None = None  # regular expressions matched against the generated text (SGLang's
                                               # name; dialect in engine/stop_regex.py): the first match to end stops
    include_stop_str_in_output: bool = False   # the text keeps the matched stop string / regex match (vLLM's name)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: int | None = None        # also record the top-k alternatives of each sampled token (0: only its own)
    logprobs_mode: str = "processed_logprobs"  # their distribution, as vLLM's: "raw_logprobs" = softmax(logits),
                                               # "processed_logprobs" = softmax(logits / T) (T = 1 for greedy)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if isinstance(self.stop_regex, str):
            self.stop_regex = [self.stop_regex]
        self.stop_regex = list(self.stop_regex or [])
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if not (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature < math.inf):
            raise ValueError(f"SamplingParams.temperature must be 0 (greedy) or a finite value >= {MIN_TEMPERATURE}, "
                             f"got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or not -1 <= self.top_k < INT64_LIMIT:
            raise ValueError(f"SamplingParams.top_k must be -1 (off) or in [1, vocabulary size], got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be >= 1, got {self.max_tokens}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"SamplingParams.stop must be non-empty strings, got {self.stop!r}")
        if any(not isinstance(s, str) or not s for s in self.stop_regex):
            raise ValueError(f"SamplingParams.stop_regex must be non-empty strings, got {self.stop_regex!r}")
        try:
            compile_stop_patterns(tuple(self.stop), tuple(self.stop_regex))
        except ValueError as e:
            raise ValueError(f"SamplingParams.stop_regex: {e}") from None
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"SamplingParams.logprobs must be >= 0 (alternatives per token), got {self.logprobs}")
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"SamplingParams.logprobs_mode must be one of {LOGPROBS_MODES}, "
                             f"got {self.logprobs_mode!r}")
        if self.seed is not None and not 0 <= self.seed < INT64_LIMIT:
            raise ValueError(f"SamplingParams.seed must be in [0, 2**63), got {self.seed}")

    @property
    def stop_patterns(self) -> StopPatterns | None:
        """stop and stop_regex compiled (cached across requests with the same patterns); None if neither is set."""
        return compile_stop_patterns(tuple(self.stop or ()), tuple(self.stop_regex or ()))  # lists by __post_init__

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
