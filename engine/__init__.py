"""ETTRL rollout engine: paged KV cache, radix-tree prefix sharing, continuous batching, tree sampling."""
from engine.config import EngineConfig
from engine.llm import LLM, CompletionOutput, RequestOutput
from engine.llm_engine import LLMEngine
from engine.model_files import resolve_model
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence, SequenceStatus
from engine.tree import TreeParams

__all__ = ["LLM", "LLMEngine", "SamplingParams", "EngineConfig", "Sequence", "SequenceStatus",
           "RequestOutput", "CompletionOutput", "TreeParams", "resolve_model"]
