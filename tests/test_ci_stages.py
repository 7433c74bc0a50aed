"""CI runs the README's test commands: .ci/stages finds every stage of the README's test section."""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def stages(readme: Path) -> list[list[str]]:
    out = subprocess.run([str(ROOT / ".ci" / "stages"), str(readme)], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    return [line.split("\t") for line in out.splitlines()]


def test_the_readme_has_the_main_verl_and_floor_stages():
    found = stages(ROOT / "README.md")
    assert [name for name, _ in found] == ["main", "verl", "floor"]
    assert found[0][1] == 'pip install -e ".[test,deepspeed]" && python -m pytest'
    assert found[1][1].startswith('pip install -e ".[test,verl]" && python -m pytest -m verl ')


def test_the_floor_stage_pins_setup_pys_transformers_floor():
    """The floor stage installs exactly the oldest transformers release that setup.py allows."""
    floor = re.search(r'"transformers>=([0-9.]+)"', (ROOT / "setup.py").read_text()).group(1)
    command = dict(stages(ROOT / "README.md"))["floor"]
    assert command.startswith(f'pip install -e ".[test]" "transformers=={floor}.*" && python -m pytest ')


def test_a_stage_is_the_line_after_its_marker_past_the_code_fence(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("text\n<!-- test-command -->\n```bash\nmake test\n```\n<!-- test-command: gpu -->\n"
                      "```bash\nmake gpu\n```\n<!-- not-a-test-command -->\nmake nothing\n")
    assert stages(readme) == [["main", "make test"], ["gpu", "make gpu"]]
