"""ETTRL rollout engine: paged KV cache, radix-tree prefix sharing, continuous batching, tree sampling."""
from engine.config import EngineConfig
from engine.llm import LLM, CompletionOutput, RequestOutput
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence, SequenceStatus

__all__ = ["LLM", "LLMEngine", "SamplingParams", "EngineConfig", "Sequence", "SequenceStatus",
           "RequestOutput", "CompletionOutput"]
