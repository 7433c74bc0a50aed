"""bench/gpu_check.py --dry-run (CPU, tiny shapes, Triton interpreter): every section runs and reports, so the
prepared GPU check is known to start and to write its tables before it ever meets a GPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ["env", "sampling", "token_stats", "greedy_fp32", "attention", "greedy_bf16", "sample_tree", "throughput",
            "trainer", "flashinfer_build"]


def test_gpu_check_dry_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--out",
                             str(tmp_path)], check=False, capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env=env)
    report = json.loads((tmp_path / "results.json").read_text())
    statuses = {s["name"]: (s["status"], s.get("error", "")) for s in report["sections"]}
    assert result.returncode == 0, (statuses, result.stdout[-3000:], result.stderr[-3000:])
    assert [s["name"] for s in report["sections"]] == SECTIONS
    assert all(status == "ok" for status, _ in statuses.values()), statuses
    rows = {s["name"]: s["rows"] for s in report["sections"]}
    assert all(r["same_tokens_as_cpu"] for r in rows["sampling"] if "same_tokens_as_cpu" in r)
    assert all(r["sequences_equal"] == "2/2" for r in rows["greedy_fp32"])
    assert all(r["freed_MiB"] > 0 for r in rows["trainer"])  # the engine slept through each update
    assert "| step | loss |" in (tmp_path / "results.md").read_text()
