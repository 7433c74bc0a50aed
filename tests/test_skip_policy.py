"""tests/conftest.py: every skip reason is printed, and a reason not on tests/skip_allowlist.txt fails the run;
each failing test reports its seed."""
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent

INNER = '''
import pytest, torch

def test_allowed():
    pytest.skip("no CUDA: nothing to run here")

def test_passes():
    assert True

def test_disallowed():
    pytest.skip("could not import 'pandas'")

def test_fails():
    assert torch.rand(1).item() < 0
'''


def run_inner(tmp_path, body: str):
    for name in ("conftest.py", "skip_allowlist.txt"):
        shutil.copy(HERE / name, tmp_path / name)
    (tmp_path / "test_inner.py").write_text(body)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_inner.py"],
                          check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_allowed_skips_pass_and_are_listed(tmp_path):
    body = INNER.split("def test_disallowed")[0]
    result = run_inner(tmp_path, body)
    assert result.returncode == 0, result.stdout
    assert "skip reasons" in result.stdout and "no CUDA: nothing to run here" in result.stdout


def test_a_skip_off_the_allowlist_fails_the_run_and_a_failure_prints_its_seed(tmp_path):
    result = run_inner(tmp_path, INNER)
    assert result.returncode == 1, result.stdout
    assert "skips not on tests/skip_allowlist.txt" in result.stdout
    assert "test_inner.py::test_disallowed: could not import 'pandas'" in result.stdout
    assert "test seed" in result.stdout and "ETTRL_TEST_SEED=0" in result.stdout
