"""mypy on engine/, ettrl/ and the kernels: the packages in CHECKED, less EXCLUDED, type-check with pyproject.toml's
[tool.mypy] (imports followed silently, third-party packages without types as Any, the cache in .mypy_cache), and
every `type: ignore` in them names its error code and says why.

A cold cache takes about a minute on a busy 2-core machine (13 s of CPU), a warm one a few seconds."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKED = ["engine", "ettrl", "kernels/ettrl_kernels"]  # folders or files
EXCLUDED: list[str] = []  # folders or files
IGNORE = re.compile(r"#\s*type:\s*ignore(?P<rest>.*)")
GOOD_IGNORE = re.compile(r"\[[a-z-]+(, *[a-z-]+)*\]  # \S")  # [code] and a reason: "# type: ignore[code]  # why"


def checked_files() -> list[Path]:
    paths = [ROOT / p for p in CHECKED]
    files = [f for path in paths for f in (sorted(path.rglob("*.py")) if path.is_dir() else [path])]
    return [f for f in files if not any(_under(f.relative_to(ROOT).as_posix(), e) for e in EXCLUDED)]


def _under(relative: str, excluded: str) -> bool:
    return relative == excluded or relative.startswith(excluded + "/")


def test_mypy_passes_on_the_seams():
    exclude = ["--exclude", "|".join(f"^{re.escape(e)}(/|$)" for e in EXCLUDED)] if EXCLUDED else []
    result = subprocess.run([sys.executable, "-m", "mypy", *exclude, *CHECKED], cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert "No module named mypy" not in result.stderr, "pip install mypy (the test extra has it)"
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_type_ignore_names_its_code_and_reason():
    bare = [f"{f.relative_to(ROOT)}:{i}" for f in checked_files()
            for i, line in enumerate(f.read_text().splitlines(), 1)
            if (m := IGNORE.search(line)) and not GOOD_IGNORE.match(m["rest"])]
    assert not bare, f"write '# type: ignore[code]  # reason' at: {bare}"


def test_the_ignore_rule_reads_as_meant():
    def ok(line: str) -> bool:
        m = IGNORE.search(line)
        return m is None or GOOD_IGNORE.match(m["rest"]) is not None

    assert ok("x = 1")
    assert ok("from a import _C  # type: ignore[attr-defined]  # compiled, no stub")
    assert ok("f(x)  # type: ignore[arg-type, union-attr]  # why")
    assert not ok("f(x)  # type: ignore")
    assert not ok("f(x)  # type: ignore[arg-type]")
    assert not ok("f(x)  # type:ignore  # reason")
