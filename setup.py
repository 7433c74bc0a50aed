"""Builds the C++ extensions (pybind11) `engine._C` (block allocator, radix tree) and `ettrl_kernels._C` (CPU kernels),
and installs the `engine`, `ettrl_kernels` (from the folder kernels/) and `ettrl` packages.

The extension is compiled with ninja when it is on PATH (parallel, incremental), else with setuptools.
"""
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension
from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
ENGINE_SOURCES = ["csrc/bindings_engine.cpp", "csrc/block_allocator.cpp", "csrc/radix_tree.cpp"]
KERNEL_SOURCES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp")
                        if str(p.relative_to(ROOT)) not in ENGINE_SOURCES)
CXXFLAGS = ["-O3", "-Wall", "-fopenmp"]


class NinjaBuildExt(build_ext):
    """Compile each extension with a generated build.ninja; fall back to setuptools without ninja."""

    def build_extension(self, ext):
        ninja = shutil.which("ninja")
        if ninja is None or os.environ.get("ETTRL_NO_NINJA"):
            return super().build_extension(ext)
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        tmp = Path(self.build_temp).resolve() / ext.name
        tmp.mkdir(parents=True, exist_ok=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        (tmp / "build.ninja").write_text(self._ninja_file(ext, out, tmp))
        subprocess.check_call([ninja, "-C", str(tmp)])

    def _ninja_file(self, ext, out, tmp):
        cxx = os.environ.get("CXX", sysconfig.get_config_var("CXX") or "c++").split()[0]
        includes = [f"-I{d}" for d in ext.include_dirs + [sysconfig.get_paths()["include"]]]
        cflags = ["-fPIC", *includes, *ext.extra_compile_args,
                  *[f"-D{k}={v}" if v is not None else f"-D{k}" for k, v in ext.define_macros]]
        ldflags = ["-shared", *ext.extra_link_args]
        if sys.platform == "darwin":
            ldflags += ["-undefined", "dynamic_lookup"]
        lines = [
            f"cflags = {shlex.join(cflags)}",
            f"ldflags = {shlex.join(ldflags)}",
            f"rule cxx\n  command = {cxx} -MMD -MF $out.d $cflags -c $in -o $out\n  depfile = $out.d\n  deps = gcc",
            f"rule link\n  command = {cxx} $in $ldflags -o $out",
        ]
        objects = []
        for src in ext.sources:
            obj = tmp / (Path(src).stem + ".o")
            objects.append(str(obj))
            lines.append(f"build {obj}: cxx {(ROOT / src).resolve()}")
        lines.append(f"build {out}: link {' '.join(objects)}")
        return "\n".join(lines) + "\n"


extensions = [Pybind11Extension(name, sources, extra_compile_args=CXXFLAGS, extra_link_args=["-fopenmp"], cxx_std=17)
              for name, sources in (("engine._C", ENGINE_SOURCES), ("ettrl_kernels._C", KERNEL_SOURCES))]

setup(
    name="ettrl",
    version="0.1.0",
    description="A tree-sampling rollout engine and thin trainer for test-time RL (TTRL / ETTRL)",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # kernels/ has no __init__.py: from the repository root `import kernels` still finds Hugging Face's package.
    packages=[*find_packages(include=["engine", "engine.*", "ettrl", "ettrl.*"]),
              *find_packages("kernels", include=["ettrl_kernels", "ettrl_kernels.*"])],
    package_dir={"ettrl_kernels": "kernels/ettrl_kernels"},
    ext_modules=extensions,
    cmdclass={"build_ext": NinjaBuildExt},
    install_requires=[
        "torch>=2.4",
        "triton; platform_system == 'Linux'",
        # 5.6: SmolLM2's GGUF tokenizer no longer adds <|im_start|> to every text (older releases do, and the
        # converted default model keeps it); from_pretrained(dtype=) needs 4.56. CI's floor stage tests 5.6
        "transformers>=5.6",
        "accelerate",
        "safetensors",
        "gguf>=0.16",  # GGUFReader fields' contents() (engine/gguf_convert.py)
        "numpy",
        "sympy",
        "math-verify",
        "tqdm",
        "pyyaml",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest", "hypothesis", "fastapi>=0.110", "uvicorn>=0.29", "httpx", "openai>=1.0", "trl>=0.25",
                 "pandas", "pyarrow",  # the parquet loader's tests
                 "ruff",  # tests/test_lint.py
                 "mypy"],  # tests/test_mypy.py
        "mutation": ["mutmut>=3.3"],  # tools/mutation.py (not in CI)
        "deepspeed": ["deepspeed"],
        # the release engine/attention/flashinfer.py was written against, and the apache-tvm-ffi it imports (a
        # --no-deps install lacks it: `import flashinfer` fails on tvm_ffi). Offline GPU machines get the wheels
        # (18 MB + 3.3 MB for cp312, plus nvidia-ml-py and tabulate) installed with
        # `pip install --no-index --no-deps --target DIR *.whl`, DIR on PYTHONPATH, and CUDA_HOME set to the CUDA
        # toolkit for its JIT (flashinfer guesses it from `which nvcc`): docs/engine.md, "Carrying flashinfer".
        "cuda": ["flashinfer-python==0.6.18.post1", "apache-tvm-ffi==0.1.15.post2"],
        "serve": ["fastapi>=0.110", "uvicorn>=0.29"],
        "trl": ["trl>=0.25", "httpx"],
        # ettrl.integrations.verl, the engine as verl's rollout backend (rollout.name=ettrl): the versions it was
        # written and tested against (the plug-in refuses another verl); the rest is what `import verl` needs
        # without vLLM or CUDA, and the HTTP pieces our replica uses
        "verl": ["verl==0.9.1", "ray==2.60.0", "fastapi>=0.110", "uvicorn>=0.29", "httpx", "cachetools", "pyzmq",
                 "msgspec"],
        # bench/peers.py (optional peers; llama-cpp-python builds llama.cpp from source: ~10 min on 2 cores)
        "peers": ["ctranslate2", "onnxruntime-genai", "onnx", "onnx-ir", "llama-cpp-python"],
    },
    entry_points={"console_scripts": ["ettrl-serve=engine.serve.__main__:main"],
                  # every `import verl` (in Ray workers too) imports this module, which registers rollout.name=ettrl
                  "verl.plugins": ["ettrl = ettrl.integrations.verl.plugin"]},
)
