"""The package layers: ettrl_kernels -> engine -> ettrl -> bench, each importing only the layers below it, and no
import cycle anywhere, function-level imports included (they hide a cycle from Python but not from a reader).

Read from the source with `ast`, so nothing is imported and every `import` statement counts, wherever it sits,
except those under `if TYPE_CHECKING:` (never run: annotations only)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"ettrl_kernels": ROOT / "kernels" / "ettrl_kernels", "engine": ROOT / "engine", "ettrl": ROOT / "ettrl"}
LAYERS = ["ettrl_kernels", "engine", "ettrl", "bench"]  # each may import only the ones before it


def module_files() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of our packages and every bench script."""
    modules = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    for path in sorted((ROOT / "bench").glob("*.py")):
        modules[f"bench.{path.stem}"] = path
    return modules


def imported_names(module: str, path: Path, is_module=lambda name: False) -> set[str]:
    """Every module name an import statement of this file names (absolute, relative ones resolved). `from X import
    Y` names X.Y where that is a module (`is_module`), else X: importing a submodule runs its package's
    __init__ only if that is not already running, which it is for every module inside the package."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    type_only = {id(n) for block in ast.walk(tree) if _is_type_checking_block(block)
                 for stmt in block.body for n in ast.walk(stmt)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[:len(module.split(".")) - node.level + is_package]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                name = f"{base}.{alias.name}"
                names.add(name if is_module(name) else base)
    return names


def _is_type_checking_block(node) -> bool:
    """`if TYPE_CHECKING:` (or typing.TYPE_CHECKING): imports for annotations only, never run."""
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (getattr(test, "id", None) == "TYPE_CHECKING"
                                         or getattr(test, "attr", None) == "TYPE_CHECKING")


def is_compiled(module: str) -> bool:
    """A C++ extension module of ours (engine._C, ettrl_kernels._C), built or not."""
    return module.rsplit(".", 1)[-1] == "_C" and module.split(".")[0] in PACKAGES


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of ours (Python source) it imports."""
    modules = module_files()
    is_module = lambda name: name in modules or is_compiled(name)  # noqa: E731
    return {m: {n for n in imported_names(m, path, is_module) if n in modules and n != m}
            for m, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


def test_graph_sees_the_packages():
    graph = import_graph()
    assert {"engine.llm", "engine.models.llama", "ettrl_kernels.sampling", "ettrl.trainer"} <= set(graph)
    assert "ettrl_kernels.sampling" in graph["engine.llm_engine"] or "ettrl_kernels" in graph["engine.llm_engine"]


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles (module-level and function-level imports alike):\n" + "\n".join(
        " <-> ".join(c) for c in found)


def test_layers_import_only_downwards():
    graph = import_graph()
    upward = sorted(f"{m} imports {n}" for m, deps in graph.items() for n in deps if layer(n) > layer(m))
    assert not upward, f"layers are {' -> '.join(LAYERS)} (each imports only those before it):\n" + "\n".join(upward)


PATH_EDITS_ALLOWED = {("gpu_check.py", "bootstrap")}  # runs from a bare clone on a lent GPU: nothing installed


def test_bench_does_not_edit_sys_path():
    """bench/ scripts import the installed packages (`pip install -e .`), never a path they add themselves; the one
    exception is gpu_check.py's bootstrap, which must start where nothing is installed."""
    edits = []
    for path in sorted((ROOT / "bench").glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        allowed = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                   and (path.name, f.name) in PATH_EDITS_ALLOWED for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", None) == "sys" \
                    and id(node) not in allowed:
                edits.append(f"{path.name}:{node.lineno}")
    assert not edits, f"sys.path used in bench/: {edits}"


def test_cycle_finder_on_a_known_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_relative_imports_resolve(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text("from . import sibling\nfrom ..top import thing\ndef f():\n    import engine.llm\n"
                      "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import engine.tree\n")
    modules = {"pkg.sub.sibling", "pkg.top"}
    assert imported_names("pkg.sub.mod", source, modules.__contains__) == {"pkg.sub.sibling", "pkg.top", "typing",
                                                                            "engine.llm"}


def environment_reads(path: Path) -> list[int]:
    """Lines of `path` that read the environment (os.environ, os.getenv)."""
    tree = ast.parse(path.read_text(), str(path))
    return sorted({node.lineno for node in ast.walk(tree)
                   if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv")
                   and getattr(node.value, "id", None) == "os"})


def test_the_engine_reads_the_environment_in_one_module():
    """engine/env.py documents and reads every variable; the kernels read only Triton's TRITON_INTERPRET."""
    allowed = {"engine.env", "ettrl_kernels.backend"}
    readers = {m: environment_reads(path) for m, path in module_files().items()
               if m.split(".")[0] in ("engine", "ettrl_kernels") and m not in allowed}
    assert not {m: lines for m, lines in readers.items() if lines}, "read the environment in engine/env.py"


def test_env_module_names_every_switch_the_extension_reads():
    import re

    from engine import env

    read_by_cpp = set()
    for path in (ROOT / "csrc").glob("*.[ch]*"):
        read_by_cpp.update(re.findall(r'env_flag\("(\w+)"\)', path.read_text()))
    assert read_by_cpp == set(env.CPU_KERNEL_SWITCHES)
    for name in read_by_cpp:
        assert name in env.__doc__
