"""The first run on a lent GPU machine (no network, only torch and transformers installed), in one command from
the repository root:

    python tools/gpu_device_run.py CARRY_DIR [--out DIR] [--budget 290] [--only STEP ...] [--dry-run]

CARRY_DIR holds what the machine cannot download (docs/engine.md, "The first run on a lent GPU"): the wheels
(flashinfer-python, apache-tvm-ffi for the machine's Python, nvidia-ml-py, tabulate, pytest, ...) and optionally
aot/<module>/<module>.so, flashinfer modules built ahead by tools/flashinfer_aot.py. Everything goes under --out
(default: $OUT), never into the work tree; the one exception is engine._C, built in place as a checkout builds it.

Steps, the most telling first, each under its own timeout and all under --budget seconds (the first run ends in
5 minutes and leaves device time for a rerun; a step the budget cannot start is recorded as skipped):
  versions  nvidia-smi, Python, torch, Triton, transformers, nvcc and CUDA_HOME, the carried files
  install   the wheels into a folder outside the tree (pip install --no-index --no-deps --target), the carried
            flashinfer modules into its flashinfer/data/aot (loaded there before anything is compiled)
  build     engine._C in place (bench/gpu_check.py --build-extension: one compiler call)
  imports   engine, ettrl_kernels, flashinfer: does it import, is it usable, which attention the engine picks
  checks    bench/gpu_check.py's correctness sections -> OUT/checks/results.{json,md}
  tests     pytest -m cuda (tests marked `cuda`) -> OUT/tests.log
  speed     bench/gpu_check.py's other sections (throughput, trees, trainer) -> OUT/speed/results.{json,md}
--only STEP reruns some (install runs first whenever its folder is missing). OUT/steps.json sums up each step.
--dry-run runs the same on the CPU (gpu_check --dry-run, the Triton interpreter): how CI checks this script.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = Path(tempfile.gettempdir()) / "ettrl_device_run"  # default --work: outside the tree, kept while warm
CHECKS = ["env", "sampling", "invariance", "attention", "greedy_bf16", "memory", "sleep"]
SPEED = ["greedy_fp32", "token_stats", "sample_tree", "throughput", "trainer", "flashinfer_build"]
LIMITS = {"versions": 30, "install": 60, "build": 90, "imports": 60, "checks": 150, "tests": 90, "speed": 180}

VERSIONS = r"""
import importlib.metadata as md, os, platform, shutil, sys
print("python", sys.version.split()[0], sys.executable, platform.platform())
for dist in ("torch", "triton", "transformers", "flashinfer-python", "apache-tvm-ffi", "nvidia-ml-py", "tabulate",
             "einops", "ninja", "pybind11", "pytest", "hypothesis", "safetensors", "tokenizers", "pyyaml",
             "math-verify"):
    try:
        print(f"{dist:20s}", md.version(dist))
    except md.PackageNotFoundError:
        print(f"{dist:20s}", "ABSENT")
import torch
print("torch cuda", torch.version.cuda, "available", torch.cuda.is_available(), "devices", torch.cuda.device_count())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info(0)
    print("gpu", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", f"{total / 2**30:.1f} GiB",
          f"free {free / 2**30:.1f} GiB")
for tool in ("nvcc", "ninja", "c++", "g++"):
    print(f"{tool:6s}", shutil.which(tool))
print("CUDA_HOME", os.environ.get("CUDA_HOME"))
"""

IMPORTS = r"""
import torch, engine._C, ettrl_kernels, engine.llm
from engine.attention import flashinfer as fi
from engine.attention.registry import select_backend
print("flashinfer", fi.installed_version(), "usable:", fi.flashinfer_usable("cuda", torch.bfloat16))
if torch.cuda.is_available():
    print("attention for bf16 on cuda:", select_backend("auto", torch.device("cuda"), torch.bfloat16).__name__)
"""


def cuda_home() -> str | None:
    """The CUDA toolkit for flashinfer's JIT: CUDA_HOME, else the folder above `which nvcc` when it holds the
    headers (flashinfer's own guess, which a wrapper script in /usr/local/bin defeats), else /usr/local/cuda."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    candidates = [Path(os.path.realpath(nvcc)).parents[1]] if nvcc else []
    for home in [*candidates, Path("/usr/local/cuda")]:
        if (home / "include" / "cuda_runtime.h").exists():
            return str(home)
    return None


def step_env(work: Path, dry_run: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(work / "site"), str(ROOT), str(ROOT / "kernels")]),
           "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false",
           "FLASHINFER_WORKSPACE_BASE": str(work),
           "PATH": os.pathsep.join([str(work / "site" / "bin"), str(Path(sys.executable).parent),  # ninja
                                    os.environ.get("PATH", "")])}
    env["TRITON_INTERPRET"] = "1" if dry_run else "0"
    home = cuda_home()
    if home:
        env["CUDA_HOME"] = home
    return env


def install(carry: Path, site: Path) -> int:
    """The carried wheels into `site`, the carried flashinfer modules into its flashinfer/data/aot."""
    wheels = sorted(carry.glob("*.whl"))
    print("wheels:", [w.name for w in wheels] or "none")
    site.mkdir(parents=True, exist_ok=True)
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--upgrade", "--target", str(site), *map(str, wheels)], check=True)
    modules = sorted(carry.glob("aot/*/*.so"))
    if modules and not (site / "flashinfer").is_dir():
        print("flashinfer modules carried but no flashinfer wheel installed: they are not used")
    elif modules:
        aot = site / "flashinfer" / "data" / "aot"
        for module in modules:
            (aot / module.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy2(module, aot / module.parent.name / module.name)
        print("flashinfer modules:", [m.parent.name for m in modules], "->", aot)
    (site / ".installed").write_text(json.dumps([w.name for w in wheels] + [m.name for m in modules]))
    return 0


def commands(args) -> dict[str, list[str]]:
    py, check = sys.executable, str(ROOT / "bench" / "gpu_check.py")
    dry = ["--dry-run"] if args.dry_run else []
    me = [py, str(Path(__file__).resolve())]
    return {
        "versions": [*me, "--internal", "versions", str(args.carry)],
        "install": [*me, "--internal", "install", "--work", str(args.work), str(args.carry)],
        "build": [py, check, "--build-extension"],
        "imports": [py, "-c", IMPORTS],
        "checks": [py, check, *dry, "--out", str(args.out / "checks"), "--warmup-timeout", "60", "--only", *CHECKS],
        "tests": [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", str(ROOT / "tests")],
        "speed": [py, check, *dry, "--out", str(args.out / "speed"), "--warmup-timeout", "60", "--only", *SPEED],
    }


def run_step(name: str, command: list[str], limit: float, out: Path, env: dict) -> dict:
    """One step under its timeout, its output in OUT/<name>.log; the whole process group ends with it."""
    t0 = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                   start_new_session=True)
        try:
            rc, timed_out = process.wait(timeout=limit), False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            rc, timed_out = process.wait(), True
    return {"step": name, "rc": rc, "timed_out": timed_out, "seconds": round(time.perf_counter() - t0, 1),
            "limit_s": round(limit, 1)}


def internal(what: str, carry: Path, work: Path) -> int:
    if what == "install":
        return install(carry, work / "site")
    if shutil.which("nvidia-smi"):
        subprocess.run(["nvidia-smi"], check=False)
    else:
        print("nvidia-smi: not found")
    print("carried:", sorted(str(p.relative_to(carry)) for p in carry.rglob("*") if p.is_file()))
    print("CUDA_HOME for flashinfer:", cuda_home())
    return subprocess.run([sys.executable, "-c", VERSIONS], check=False).returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("carry", type=Path, help="folder with the carried wheels (and aot/ modules)")
    ap.add_argument("--out", type=Path, default=os.environ.get("OUT"), help="results folder (default: $OUT)")
    ap.add_argument("--budget", type=float, default=290.0, help="seconds for all steps together")
    ap.add_argument("--only", nargs="+", choices=list(LIMITS), help="run only these steps")
    ap.add_argument("--dry-run", action="store_true", help="on the CPU: gpu_check --dry-run, the Triton interpreter")
    ap.add_argument("--work", type=Path, default=WORK, help="installed wheels and flashinfer's JIT cache")
    ap.add_argument("--internal", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.internal:
        return internal(args.internal, args.carry, args.work)
    if args.out is None:
        sys.exit("name the results folder: --out DIR or $OUT")
    args.out = args.out.resolve()
    if args.out == ROOT or ROOT in args.out.parents:
        sys.exit(f"--out {args.out} is inside the work tree; results go elsewhere (e.g. $OUT)")
    if not args.carry.is_dir():
        sys.exit(f"{args.carry} is not a folder: name the folder that holds the carried wheels")
    args.carry = args.carry.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    steps = list(args.only or LIMITS)
    if "install" not in steps and not (args.work / "site" / ".installed").exists():
        steps.insert(0, "install")
    env, deadline, done = step_env(args.work, args.dry_run), time.perf_counter() + args.budget, []
    for name in sorted(steps, key=list(LIMITS).index):
        left = deadline - time.perf_counter()
        if left < 5:
            done.append({"step": name, "rc": None, "skipped": f"the budget of {args.budget:.0f} s is spent"})
        else:
            done.append(run_step(name, commands(args)[name], min(LIMITS[name], left), args.out, env))
        (args.out / "steps.json").write_text(json.dumps(done, indent=1))
        print(json.dumps(done[-1]), flush=True)
    failed = [d["step"] for d in done if d["rc"] != 0]
    print(f"results under {args.out}; steps not passed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
