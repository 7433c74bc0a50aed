"""The built-in offline task: arithmetic word problems generated from a seed, at three difficulty levels.

Level 1: one step, + or - on numbers up to 10.  Level 2: one step, + - * / on numbers up to 30.
Level 3: two steps, a + b - c with a, b <= 10 (its few-shot examples write the intermediate result:
ettrl/prompts.py).  Train and held-out sets come from separate random streams and never share a problem.
"""
from __future__ import annotations

import random

NAMES = ["Ava", "Ben", "Carla", "Dev", "Emma", "Finn", "Grace", "Hugo", "Iris", "Jack", "Kim", "Leo",
         "Maya", "Noah", "Olga", "Paul", "Rosa", "Sam", "Tara", "Omar"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "coins", "stamps", "shells", "cards"]


def _add(rng, top):
    a, b = rng.randint(1, top), rng.randint(1, top)
    return "{n} has {a} {i}. {n} gets {b} more. How many {i} does {n} have now?", a, b, a + b


def _sub(rng, top):
    a = rng.randint(3, top)
    b = rng.randint(1, a - 1)
    return "{n} has {a} {i} and gives {b} of them away. How many {i} does {n} have left?", a, b, a - b


def _mul(rng, top):
    a, b = rng.randint(2, 9), rng.randint(2, max(2, top // 6))
    return "{n} has {a} boxes with {b} {i} in each box. How many {i} does {n} have in total?", a, b, a * b


def _div(rng, top):
    b, q = rng.randint(2, 6), rng.randint(2, max(2, top // 6))
    return "{n} shares {a} {i} equally among {b} friends. How many {i} does each friend get?", b * q, b, q


ONE_STEP = {1: (_add, _sub), 2: (_add, _sub, _mul, _div)}
TOP = {1: 10, 2: 30}


def make_problem(rng: random.Random, difficulty: int) -> dict:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    if difficulty in ONE_STEP:
        template, a, b, answer = rng.choice(ONE_STEP[difficulty])(rng, TOP[difficulty])
        return {"problem": template.format(n=name, i=item, a=a, b=b), "answer": str(answer)}
    a, b = rng.randint(2, 10), rng.randint(2, 10)
    c = rng.randint(1, a + b - 1)
    text = f"{name} has {a} {item}, gets {b} more and then gives {c} away. How many {item} does {name} have left?"
    return {"problem": text, "answer": str(a + b - c)}


def generate(n: int, difficulty: int = 1, seed: int = 0, split: str = "train") -> list[dict]:
    """`n` distinct problems; the "eval" split never repeats a problem of the "train" split (same seed, level)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if difficulty not in (1, 2, 3):
        raise ValueError(f"difficulty must be 1, 2 or 3, got {difficulty}")
    taken = set()
    if split == "eval":
        taken = {p["problem"] for p in _draw(n_train_reserved(), difficulty, random.Random(f"{seed}-train"), set())}
    return _draw(n, difficulty, random.Random(f"{seed}-{split}"), taken)


def n_train_reserved() -> int:
    return 4096  # the held-out set avoids the first 4096 train problems, more than any train set uses


def _draw(n: int, difficulty: int, rng: random.Random, taken: set) -> list[dict]:
    out: list[dict] = []
    seen = set(taken)
    for _ in range(100 * n + 1000):
        if len(out) == n:
            return out
        p = make_problem(rng, difficulty)
        if p["problem"] not in seen:
            seen.add(p["problem"])
            out.append(p)
    raise ValueError(f"cannot draw {n} distinct level-{difficulty} problems; ask for fewer")
