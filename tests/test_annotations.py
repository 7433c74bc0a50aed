"""Every public function and method of the checked packages has annotations on each parameter (self and cls aside)
and on its return, so what crosses a file says what it is.

Public: a name not starting with "_", in a module whose name does not start with "_", at module level or in a public
class (nested classes too); functions inside functions are private to them. Functions compiled by `@triton.jit` are
left out: Triton reads their annotations as types and constexpr markers. Read with `ast`: nothing is imported.
Add a package path to CHECKED (relative to the repository root) to bring it under the rule; EXCLUDED holds
paths under a checked one that are not yet under it."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKED = ["engine", "ettrl", "kernels/ettrl_kernels"]
EXCLUDED: list[str] = []


def checked_files() -> list[Path]:
    files = []
    for folder in CHECKED:
        path = ROOT / folder
        for file in sorted(path.rglob("*.py") if path.is_dir() else [path]):
            relative = file.relative_to(ROOT).as_posix()
            if any(relative == e or relative.startswith(e + "/") for e in EXCLUDED):
                continue
            if file.name != "__init__.py" and file.name.startswith("_"):
                continue
            files.append(file)
    return files


def public_functions(tree: ast.Module) -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """(qualified name, node) of the public functions at module level and of the methods of public classes."""
    found = []

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_") \
                    and not any(_is_triton_jit(d) for d in node.decorator_list):
                found.append((prefix + node.name, node))
            elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                visit(node.body, f"{prefix}{node.name}.")

    visit(tree.body, "")
    return found


def _is_triton_jit(decorator: ast.expr) -> bool:
    """@triton.jit, @triton.jit(...) or @jit."""
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return getattr(target, "attr", getattr(target, "id", None)) == "jit"


def missing_annotations(node: ast.FunctionDef | ast.AsyncFunctionDef, is_method: bool) -> list[str]:
    """The names of the unannotated parameters, and "return" if the return is not annotated."""
    args = node.args
    positional = [*args.posonlyargs, *args.args]
    static = any(getattr(d, "id", None) == "staticmethod" for d in node.decorator_list)
    if is_method and not static and positional and positional[0].arg in ("self", "cls"):
        positional = positional[1:]
    params = [*positional, *args.kwonlyargs, *([args.vararg] if args.vararg else []),
              *([args.kwarg] if args.kwarg else [])]
    missing = [a.arg for a in params if a.annotation is None]
    return missing + (["return"] if node.returns is None else [])


def unannotated() -> list[str]:
    problems = []
    for file in checked_files():
        tree = ast.parse(file.read_text(), str(file))
        for name, node in public_functions(tree):
            missing = missing_annotations(node, is_method="." in name)
            if missing:
                problems.append(f"{file.relative_to(ROOT)}:{node.lineno} {name}: {', '.join(missing)}")
    return problems


def test_public_functions_are_annotated():
    problems = unannotated()
    assert not problems, "annotate these parameters and returns:\n" + "\n".join(problems)


def test_the_check_sees_what_it_should(tmp_path):
    source = ast.parse(
        "def f(a, b: int) -> int: ...\n"
        "def _private(a): ...\n"
        "def g(*args: int, key, **kw: str): ...\n"
        "class C:\n"
        "    def m(self, x) -> None: ...\n"
        "    @classmethod\n"
        "    def k(cls) -> None: ...\n"
        "    @staticmethod\n"
        "    def s(self): ...\n"
        "    def _hidden(self, y): ...\n"
        "    class Inner:\n"
        "        def n(self) -> None: ...\n"
        "class _Private:\n"
        "    def m(self, x): ...\n"
        "def outer() -> None:\n"
        "    def inner(z): ...\n"
        "@triton.jit\n"
        "def kernel(x, BLOCK: tl.constexpr): ...\n")
    found = {name: missing_annotations(node, "." in name) for name, node in public_functions(source)}
    assert found == {"f": ["a"], "g": ["key", "return"], "C.m": ["x"], "C.k": [], "C.s": ["self", "return"],
                     "C.Inner.n": [], "outer": []}


def test_the_checked_paths_exist():
    assert all((ROOT / p).exists() for p in CHECKED), "a CHECKED path was moved: update the list"
    assert all((ROOT / p).exists() for p in EXCLUDED), "an EXCLUDED path was moved (to engine/layers?): drop it"
    assert len(checked_files()) > 40
