"""evaluate() against hand-computed metrics (a scripted engine), and the `python -m ettrl.eval` command."""
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from ettrl.config import EvalConfig  # noqa: E402
from ettrl.data import Problem  # noqa: E402
from ettrl.eval import evaluate  # noqa: E402
from tiny_models import make_tiny_policy  # noqa: E402


class ScriptedLLM:
    """Answers each prompt (a one-token id list naming the problem) with fixed texts."""

    def __init__(self, sampled: dict, greedy: dict):
        self.sampled, self.greedy, self.params = sampled, greedy, []

    def generate(self, prompts, params):
        self.params.append(params)
        table = self.greedy if params.temperature == 0 else self.sampled
        out = []
        for ids in prompts:
            texts = table[ids[0]][: params.n]
            outs = [SimpleNamespace(text=t, token_ids=[0] * 3,
                                    finish_reason="length" if t.startswith("TRUNC") else "stop") for t in texts]
            out.append(SimpleNamespace(outputs=outs))
        return out


def boxed(x):
    return f"so the answer is \\boxed{{{x}}}."


def test_metrics_by_hand():
    problems = [Problem("a", "4"), Problem("b", "1/2"), Problem("c", None)]
    sampled = {0: [boxed(4), boxed(5), boxed(5), boxed(4), boxed(4)],  # 3/5 right, majority 4 right
               1: [boxed("\\frac{1}{2}"), boxed(3), boxed(3), "TRUNC", boxed(3)],  # 1/5 right, majority 3 wrong
               2: [boxed(1)] * 5}
    greedy = {0: [boxed(5)], 1: [boxed("0.5")], 2: [boxed(1)]}
    ecfg = EvalConfig(k=5)
    r = evaluate(ScriptedLLM(sampled, greedy), problems, [[0], [1], [2]], ecfg, [])
    assert r["eval_problems"] == 2  # the problem without ground truth is skipped
    assert r["greedy"] == pytest.approx(0.5)
    assert r["avg@5"] == pytest.approx((3 / 5 + 1 / 5) / 2)
    assert r["maj@5"] == pytest.approx(0.5)
    assert r["pass@5"] == pytest.approx(1.0)
    assert r["eval_tokens"] == 2 * (5 * 3 + 3)


def test_ttrl_grading_and_the_answer_stop():
    """vote=ttrl grades TTRL's answer string of every response (truncated ones vote with their answer phrase) and
    takes maj@k by string: "3" ties the string "\\frac{1}{2}" 2 to 2 and was seen first, where the boxed vote
    puts 0.5, 1/2 and \\frac{1}{2} in one class of 3."""
    problems = [Problem("a", "1/2")]
    sampled = {0: [boxed(3), boxed("0.5"), boxed("\\frac{1}{2}"), "TRUNC the answer is 3", boxed("1/2")]}
    greedy = {0: ["TRUNC the answer is 1/2"]}
    llm = ScriptedLLM(sampled, greedy)
    boxed_vote = evaluate(llm, problems, [[0]], EvalConfig(k=5), [])
    assert (boxed_vote["avg@5"], boxed_vote["maj@5"], boxed_vote["greedy"]) == (3 / 5, 1.0, 0.0)
    assert all(not p.stop_regex for p in llm.params)  # no stop at the answer unless asked
    ttrl = evaluate(llm, problems, [[0]], EvalConfig(k=5), [], vote="ttrl", stop_at_answer=True)
    assert (ttrl["avg@5"], ttrl["maj@5"], ttrl["greedy"]) == (3 / 5, 0.0, 1.0)  # the truncated greedy answer counts
    from ettrl.grading import BOXED_ANSWER_REGEX
    assert [(p.stop_regex, p.include_stop_str_in_output) for p in llm.params[2:]] == [([BOXED_ANSWER_REGEX], True)] * 2


def test_eval_needs_ground_truth():
    with pytest.raises(ValueError, match="answer_field"):
        evaluate(ScriptedLLM({}, {}), [Problem("a")], [[0]], EvalConfig(), [])


def test_eval_command(tmp_path):
    model = make_tiny_policy(tmp_path / "model")
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"q": f"{i}+{i}=", "a": 2 * i}) for i in range(3)))
    out = subprocess.run([sys.executable, "-m", "ettrl.eval", "--model", str(model), "--data", str(data),
                          "--problem-field", "q", "--answer-field", "a", "--k", "2", "--max-tokens", "4",
                          "--prompt", "plain", "--out", str(tmp_path / "r.json")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["eval_problems"] == 3 and 0 <= result["avg@2"] <= result["pass@2"] <= 1
    from ettrl.eval import main

    with pytest.raises(SystemExit, match=r"set --problem-field to one of \['a', 'q'\]"):
        main(["--model", str(model), "--data", str(data)])


def test_curves_and_summary_table(tmp_path):
    from ettrl.plots import plot_curves
    from ettrl.run import format_summary

    rows = [{"type": "eval", "step": 0, "greedy": 0.25, "avg@16": 0.2, "maj@16": 0.3}]
    rows += [{"type": "train", "step": s, "reward": 0.1 * s, "majority_ratio": 0.3 + 0.05 * s, "entropy": 1 / s,
              "rollout_tokens_total": 100 * s} for s in range(1, 5)]
    rows += [{"type": "eval", "step": 4, "greedy": 0.5, "avg@16": 0.45, "maj@16": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    png = plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png", "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_summary({"method": "ttrl", "steps": 4, "rollout_tokens": 400, "wall_s": 12.0,
                            "before": rows[0], "after": rows[-1]})
    assert ["greedy", "25.0%", "50.0%", "+25.0"] in [line.split() for line in table.splitlines()]
    assert "rollout tokens 400" in table
