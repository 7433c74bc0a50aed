"""Unlabeled problems: the built-in arithmetic task, a JSONL/JSON/Parquet file, or a Hugging Face dataset.

Every source becomes a list of `Problem(text, answer)`; `answer` is None when the data has no ground
truth (it is only ever logged, never trained on).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ettrl import arithmetic

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class Problem:
    text: str
    answer: str | None = None


class DataError(ValueError):
    """Data that cannot be used; the message says what to change."""


def source_kind(source: str) -> str:
    if source == "arithmetic":
        return "arithmetic"
    if source.endswith(FILE_SUFFIXES) or Path(source).exists():
        return "file"
    return "hf"


def check_source(source: str, key: str) -> None:
    """Fail fast (before any model loads) on a data file that is not there."""
    if source_kind(source) == "file" and not Path(source).is_file():
        raise DataError(f"{key}: data file {source} does not exist; give a path to a .jsonl/.json/.parquet file, "
                        f"a Hugging Face dataset name, or 'arithmetic' for the built-in task")


def load_problems(source: str, *, split: str = "train", problem_field: str = "problem", answer_field: str = "answer",
                  size: int = 0, difficulty: int = 1, seed: int = 0, key: str = "data") -> list[Problem]:
    kind = source_kind(source)
    if kind == "arithmetic":
        records = arithmetic.generate(size or 256, difficulty, seed, "eval" if split != "train" else "train")
        return [Problem(r["problem"], r["answer"]) for r in records]
    check_source(source, key)
    records = _read_file(Path(source)) if kind == "file" else _read_hf(source, split, key)
    problems = to_problems(records, problem_field, answer_field, f"{key} ({source})")
    return problems[:size] if size else problems


def to_problems(records: list[dict], problem_field: str, answer_field: str, where: str) -> list[Problem]:
    if not records:
        raise DataError(f"{where} holds no records")
    first = records[0]
    if not isinstance(first, dict):
        raise DataError(f"{where}: records must be objects with a {problem_field!r} field, got {type(first).__name__}")
    if problem_field not in first:
        raise DataError(f"{where}: no field {problem_field!r}; set data.problem_field to one of {sorted(first)}")
    out = []
    for i, r in enumerate(records):
        text = r.get(problem_field)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: record {i} has no text in field {problem_field!r}")
        answer = r.get(answer_field)
        out.append(Problem(text, None if answer is None else str(answer)))
    return out


def _read_file(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pandas as pd  # parquet needs pandas + pyarrow

        return pd.read_parquet(path).to_dict("records")
    text = path.read_text()
    if path.suffix == ".jsonl":
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON Lines ({e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if isinstance(data, dict):  # {"data": [...]} or similar: take the single list inside
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON list of records (or an object holding one list)")
        data = lists[0]
    return data


def _read_hf(name: str, split: str, key: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{key}={name!r} is not a file and the `datasets` package is not installed; "
                        f"give a .jsonl/.json/.parquet file or `pip install datasets`") from None
    try:
        return list(datasets.load_dataset(name, split=split))
    except Exception as e:  # network, unknown name, unknown split
        raise DataError(f"{key}: could not load Hugging Face dataset {name!r} split {split!r}: {e}") from None
