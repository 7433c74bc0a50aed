import json

import pytest

from ettrl import arithmetic
from ettrl.data import DataError, Problem, load_problems
from ettrl.grading import extract_answer
from ettrl.prompts import FEWSHOT, FEWSHOT_TWO_STEP, build_prompt, fewshot_examples


def test_arithmetic_is_seeded_distinct_and_correct():
    a = arithmetic.generate(200, 1, seed=3)
    assert a == arithmetic.generate(200, 1, seed=3) and a != arithmetic.generate(200, 1, seed=4)
    assert len({p["problem"] for p in a}) == 200
    held_out = arithmetic.generate(100, 1, seed=3, split="eval")
    assert not {p["problem"] for p in a} & {p["problem"] for p in held_out}
    for level in (1, 2, 3):
        for p in arithmetic.generate(50, level, seed=0):
            assert int(p["answer"]) >= 0
    p = next(p for p in a if "gets" in p["problem"])
    nums = [int(w) for w in p["problem"].replace(".", " ").split() if w.isdigit()]
    assert int(p["answer"]) == sum(nums)


def test_two_step_level_uses_small_numbers_and_its_own_examples():
    for p in arithmetic.generate(300, 3, seed=1):
        a, b, c = [int(w) for w in p["problem"].replace(",", " ").split() if w.isdigit()]
        assert 2 <= a <= 10 and 2 <= b <= 10 and 1 <= c < a + b and int(p["answer"]) == a + b - c
    assert fewshot_examples("arithmetic", 3) == FEWSHOT_TWO_STEP
    assert fewshot_examples("arithmetic", 1) == fewshot_examples("data/x.jsonl", 3) == FEWSHOT
    prompt = build_prompt("Ann has 2 cats, gets 3 more and then gives 1 away.", examples=FEWSHOT_TWO_STEP)
    assert "then 12 - 4 = 8" in prompt and prompt.endswith("gives 1 away.\nAnswer:")
    for example in FEWSHOT_TWO_STEP.split("Question: ")[1:3]:  # the examples' own arithmetic and answers
        question, answer = example.split("\nAnswer: ")
        a, b, c = [int(w) for w in question.replace(",", " ").split() if w.isdigit()]
        assert extract_answer(answer) == str(a + b - c)


def test_fewshot_prompt_examples_grade_with_boxed():
    prompt = build_prompt("Ann has 2 cats. Ann gets 1 more. How many cats does Ann have now?")
    assert prompt.endswith("How many cats does Ann have now?\nAnswer:")
    assert extract_answer(prompt.split("Question: Tom")[0]) == "12"


@pytest.mark.parametrize("fmt", ["jsonl", "json", "json-wrapped"])
def test_files_with_custom_fields(tmp_path, fmt):
    rows = [{"question": "1+1?", "gt": 2}, {"question": "2+2?"}]
    path = tmp_path / ("d.jsonl" if fmt == "jsonl" else "d.json")
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    else:
        path.write_text(json.dumps(rows if fmt == "json" else {"data": rows}))
    got = load_problems(str(path), problem_field="question", answer_field="gt")
    assert got == [Problem("1+1?", "2"), Problem("2+2?", None)]


def test_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    pd.DataFrame({"problem": ["a", "b"], "answer": ["1", "2"]}).to_parquet(tmp_path / "d.parquet")
    assert load_problems(str(tmp_path / "d.parquet"), size=1) == [Problem("a", "1")]


def test_bad_field_and_missing_file(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"question": "x"}\n')
    with pytest.raises(DataError, match=r"no field 'problem'; set data.problem_field to one of \['question'\]"):
        load_problems(str(tmp_path / "d.jsonl"))
    with pytest.raises(DataError, match="does not exist"):
        load_problems(str(tmp_path / "nope.jsonl"))


def test_shared_benchmarks_load():
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "math500.jsonl"
    if not path.exists():
        pytest.skip("benchmark data not found")
    problems = load_problems(str(path))
    assert len(problems) == 500 and all(p.answer for p in problems)
