"""How a problem becomes a prompt.

`fewshot` (default): two worked examples ending "The answer is \\boxed{N}." then the question; small base and
instruct models follow this format far better than a chat template.  `plain`: the question and an
instruction.  `chat`: the tokenizer's chat template with the usual "reason step by step, \\boxed{}" instruction
(for instruct / math models such as Qwen2.5-Math).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ettrl.data import Problem

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

FEWSHOT = (
    "Question: Lily has 7 pencils. Lily gets 5 more. How many pencils does Lily have now?\n"
    "Answer: Lily has 7 + 5 = 12 pencils. The answer is \\boxed{12}.\n\n"
    "Question: Tom has 15 apples and gives 6 of them away. How many apples does Tom have left?\n"
    "Answer: Tom has 15 - 6 = 9 apples left. The answer is \\boxed{9}.\n\n"
    "Question: {problem}\n"
    "Answer:"
)

# Level 3 of the built-in task is two steps: its examples write the intermediate result.
FEWSHOT_TWO_STEP = (
    "Question: Lily has 7 pencils, gets 5 more and then gives 4 away. How many pencils does Lily have left?\n"
    "Answer: Lily has 7 + 5 = 12 pencils, then 12 - 4 = 8 pencils left. The answer is \\boxed{8}.\n\n"
    "Question: Tom has 6 apples, gets 9 more and then gives 10 away. How many apples does Tom have left?\n"
    "Answer: Tom has 6 + 9 = 15 apples, then 15 - 10 = 5 apples left. The answer is \\boxed{5}.\n\n"
    "Question: {problem}\n"
    "Answer:"
)


def fewshot_examples(source: str, difficulty: int) -> str:
    """The few-shot template for a data source: the built-in task's two-step level has its own."""
    return FEWSHOT_TWO_STEP if source == "arithmetic" and difficulty == 3 else FEWSHOT


# Generation stops when a few-shot response starts the next question.
STOP = {"fewshot": ["\nQuestion:", "\n\n\n"], "plain": [], "chat": []}


def build_prompt(problem: str, style: str = "fewshot", tokenizer: PreTrainedTokenizerBase | None = None,
                 examples: str = FEWSHOT) -> str:
    """`examples`: the few-shot template (style fewshot), with `{problem}` where the question goes."""
    if style == "fewshot":
        return examples.replace("{problem}", problem.strip())
    if style == "plain":
        return f"{problem.strip()}\n{INSTRUCTION}\n"
    if style == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("data.prompt=chat needs a tokenizer with a chat template; use data.prompt=fewshot")
        messages = [{"role": "user", "content": f"{problem.strip()}\n{INSTRUCTION}"}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise ValueError(f"unknown prompt style {style!r}: use fewshot, plain or chat")


def stop_strings(style: str) -> list[str]:
    return list(STOP[style])


def encode_prompts(tokenizer: PreTrainedTokenizerBase, problems: Sequence[Problem], style: str = "fewshot",
                   examples: str = FEWSHOT) -> list[list[int]]:
    """Token ids of each problem's prompt (a chat template already holds its special tokens)."""
    texts = [build_prompt(p.text, style, tokenizer, examples) for p in problems]
    return [tokenizer(t, add_special_tokens=style != "chat").input_ids for t in texts]
