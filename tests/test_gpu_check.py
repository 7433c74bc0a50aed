"""bench/gpu_check.py --dry-run (CPU, tiny shapes, Triton interpreter) from a bare copy of the repository: it puts the
copy on its own path, builds engine._C in place with one compiler call, and every section runs and reports, so the
prepared GPU check is known to start and to write its tables before it ever meets a GPU."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ["env", "sampling", "invariance", "attention", "greedy_bf16", "memory", "sleep", "greedy_fp32",
            "token_stats", "sample_tree", "throughput", "trainer", "flashinfer_build"]
BUILD_PRODUCTS = shutil.ignore_patterns("*.so", "build", "__pycache__", ".git", ".venv", "runs", ".hypothesis",
                                        ".pytest_cache", "*.egg-info", "*.tmp")


def bare_copy(tmp_path: Path) -> Path:
    """The repository's sources without built extensions, outside any path Python searches."""
    clone = tmp_path / "clone"
    shutil.copytree(ROOT, clone, ignore=BUILD_PRODUCTS)
    return clone


def bare_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="C++ extension not built: no compiler")
def test_gpu_check_dry_run_from_a_bare_copy(tmp_path):
    clone = bare_copy(tmp_path)
    assert not list((clone / "engine").glob("_C*"))
    result = subprocess.run([sys.executable, str(clone / "bench" / "gpu_check.py"), "--dry-run", "--out",
                             str(tmp_path / "out")], check=False, capture_output=True, text=True, timeout=900,
                            cwd=tmp_path, env=bare_env())
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    statuses = {s["name"]: (s["status"], s.get("error", "")) for s in report["sections"]}
    assert result.returncode == 0, (statuses, result.stdout[-3000:], result.stderr[-3000:])
    assert "built engine/_C" in result.stdout and list((clone / "engine").glob("_C*.so"))
    assert [s["name"] for s in report["sections"]] == SECTIONS
    assert all(status == "ok" for status, _ in statuses.values()), statuses
    rows = {s["name"]: s["rows"] for s in report["sections"]}
    assert all(r["same_tokens_as_cpu"] for r in rows["sampling"] if "same_tokens_as_cpu" in r)
    assert {r["rows"] for r in rows["sampling"]} == {"T=0.6", "mixed rows"}
    assert all(r["bitwise_equal"] == "6/6" for r in rows["invariance"] if r["piece"].startswith("sampler"))
    assert {r["head_dim"] for r in rows["attention"] if "head_dim" in r} == {64, 128}
    assert all(r["sequences_equal"] == "2/2" for r in rows["greedy_fp32"])
    assert all(r["same_tokens_after_wake_up"] for r in rows["sleep"])
    assert all(r["freed_MiB"] > 0 for r in rows["trainer"])  # the engine slept through each update
    assert "| step | loss |" in (tmp_path / "out" / "results.md").read_text()


def test_gpu_check_says_in_one_line_why_it_cannot_build_the_extension(tmp_path):
    clone = bare_copy(tmp_path)
    result = subprocess.run([sys.executable, str(clone / "bench" / "gpu_check.py"), "--build-extension"],
                            check=False, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env={**bare_env(), "CXX": "no-such-compiler"})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "gpu_check: engine._C is not built and `no-such-compiler` could not build it ([Errno 2] No such file or "
        "directory: 'no-such-compiler'): build it with `python setup.py build_ext --inplace`"]


def test_device_run_command_on_the_cpu(tmp_path):
    """tools/gpu_device_run.py --dry-run: its steps run in order, each logged under --out (outside the tree), the
    CUDA-marked tests are collected (and skip: no CUDA here), and steps.json sums them up."""
    carry, out, work = tmp_path / "carry", tmp_path / "out", tmp_path / "work"
    carry.mkdir()
    command = [sys.executable, str(ROOT / "tools" / "gpu_device_run.py"), str(carry), "--dry-run", "--out", str(out),
               "--work", str(work)]
    result = subprocess.run([*command, "--only", "versions", "build", "imports", "tests"], check=False,
                            capture_output=True, text=True, timeout=600, env=bare_env())
    steps = json.loads((out / "steps.json").read_text())
    assert [s["step"] for s in steps] == ["versions", "install", "build", "imports", "tests"], result.stdout
    assert all(s["rc"] == 0 for s in steps), (steps, result.stdout[-2000:])
    assert "torch" in (out / "versions.log").read_text() and (work / "site" / ".installed").exists()
    assert "flashinfer None usable: (False" in (out / "imports.log").read_text()
    assert "skipped" in (out / "tests.log").read_text() and "no CUDA" in (out / "tests.log").read_text()
    budget = subprocess.run([*command, "--budget", "1"], check=False, capture_output=True, text=True, timeout=60,
                            env=bare_env())
    assert budget.returncode == 1 and all("budget" in s.get("skipped", "")
                                          for s in json.loads((out / "steps.json").read_text()))
    inside = subprocess.run([*command[:4], "--out", str(ROOT / "device_out")], check=False, capture_output=True,
                            text=True, timeout=60, env=bare_env())
    assert inside.returncode == 1 and "inside the work tree" in inside.stderr
    assert not (ROOT / "device_out").exists()
