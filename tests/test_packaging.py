"""Our kernels import as `ettrl_kernels` and live beside Hugging Face's `kernels` (which transformers >= 5.25 needs).

Each check runs in a fresh interpreter from a given working directory, since `sys.path[0]` is that directory: from
the repository root, a `kernels/__init__.py` of ours would shadow Hugging Face's package.
"""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import kernels, transformers, ettrl_kernels, engine, ettrl
from transformers import AutoConfig
from engine import LLM
assert 'ettrl_kernels' in ettrl_kernels.__file__, ettrl_kernels.__file__
assert not kernels.__file__ or 'ettrl_kernels' not in kernels.__file__, kernels.__file__
print(kernels.__file__)
"""


@pytest.mark.parametrize("cwd", [ROOT, ROOT / "tests", Path("/")], ids=["repo-root", "tests", "filesystem-root"])
def test_imports_beside_hugging_face_kernels(cwd):
    result = subprocess.run([sys.executable, "-c", CHECK], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    if importlib.util.find_spec("kernels") is not None:   # Hugging Face's package, installed with transformers >= 5.25
        assert (ROOT / "kernels" / "ettrl_kernels").as_posix() not in result.stdout


def test_kernels_folder_is_not_a_package():
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert (ROOT / "kernels" / "ettrl_kernels" / "__init__.py").exists()
