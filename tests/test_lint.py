"""`ruff check` over the repository with pyproject.toml's rules (line length 120; pycodestyle, pyflakes, isort)."""
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_check_passes():
    ruff = pytest.importorskip("ruff.__main__", reason="ruff is not installed: pip install -e '.[test]'")
    result = subprocess.run([ruff.find_ruff_bin(), "check", "--no-cache", "--output-format", "concise", "."],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"ruff check found problems (`ruff check --fix` fixes those marked [*]):\n" \
                                   f"{result.stdout[-6000:]}{result.stderr[-2000:]}"
