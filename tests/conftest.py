import importlib.util
import os
import random
import zlib
from pathlib import Path

import pytest

# The Triton interpreter must be chosen before triton/kernels are imported; tests run the kernels on the CPU.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

try:  # randomised tests are reproducible: hypothesis draws the same examples every run, no database in the tree
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("repo", derandomize=True, database=None, print_blob=True)
    _hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repo"))
except ImportError:
    pass

SKIP_ALLOWLIST = Path(__file__).with_name("skip_allowlist.txt")

# The tests of ettrl.integrations.verl (marker `verl`) need verl, which pins transformers below the newest release
# the rest runs on: they run in their own CI stage and venv (README's test section, .ci/run), and are not collected
# where verl is not installed. That stage selects them with -m verl, so an empty selection fails it (exit code 5).
collect_ignore_glob = [] if importlib.util.find_spec("verl") else ["test_verl*.py"]
if not collect_ignore_glob:
    # Ray and gloo on loopback, no auth token, set before any test module imports Ray (which reads
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER on import: 0 makes it take 127.0.0.1 as the node address on Linux too)
    os.environ.update(RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", GLOO_SOCKET_IFNAME="lo",
                      RAY_DEDUP_LOGS="0")


def allowed_skip_phrases() -> list[str]:
    lines = SKIP_ALLOWLIST.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def seed_of(nodeid: str) -> int:
    """Each test's seed: a hash of its id plus ETTRL_TEST_SEED (default 0), so a failure reruns exactly."""
    return (zlib.crc32(nodeid.encode()) + int(os.environ.get("ETTRL_TEST_SEED", "0"))) % 2**32


@pytest.fixture(autouse=True)
def _seeded(request):
    """torch, random and numpy start every test from its own seed (tests that seed themselves still do)."""
    seed = seed_of(request.node.nodeid)
    request.node.ettrl_seed = seed
    random.seed(seed)
    try:
        import numpy
        numpy.random.seed(seed)
    except ImportError:
        pass
    import torch
    torch.manual_seed(seed)
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seed = getattr(item, "ettrl_seed", None)
    if report.failed and seed is not None:
        base = os.environ.get("ETTRL_TEST_SEED", "0")
        message = (f"test seed {seed} (crc32 of the test id + ETTRL_TEST_SEED={base}); "
                   "hypothesis is derandomised (profile 'repo')")
        report.sections.append(("seed", message))


_skips: list[tuple[str, str]] = []


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skips.append((report.nodeid, reason.removeprefix("Skipped: ")))


def _disallowed_skips() -> list[tuple[str, str]]:
    phrases = allowed_skip_phrases()
    return [(nodeid, reason) for nodeid, reason in _skips if not any(reason.startswith(p) for p in phrases)]


def pytest_sessionfinish(session, exitstatus):
    """Skips cannot hide: a skip whose reason starts with no phrase of tests/skip_allowlist.txt fails the run."""
    if _disallowed_skips() and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if not _skips:
        return
    counts: dict[str, int] = {}
    for _, reason in _skips:
        counts[reason] = counts.get(reason, 0) + 1
    terminalreporter.section("skip reasons")
    for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        terminalreporter.line(f"{n:5d}  {reason}")
    bad = _disallowed_skips()
    if bad:
        terminalreporter.section("skips not on tests/skip_allowlist.txt (the run fails)", red=True)
        for nodeid, reason in bad:
            terminalreporter.line(f"{nodeid}: {reason}", red=True)
