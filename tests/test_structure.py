"""The repository's shape, checked from its source text (nothing is imported or run):

- no import cycle in ``madx_fast``, lazy imports (inside functions) included;
- every repository path named in a comment, docstring or doc exists;
- no function (``def``, nested ones and Triton kernels included) in ``madx_fast`` is longer than 80 lines.

Import edges follow what Python executes: ``import a.b`` and ``from a.b import c`` where ``c`` is a submodule
(``a/b/c.py`` or ``a/b/c/__init__.py``) reach the submodule ``a.b.c``; ``from a.b import c`` where ``c`` is
any other name reaches the module ``a.b`` (its ``__init__`` for a package). A parent package's ``__init__``
runs before its submodules, but that is no edge of the importing module: it is an edge only where a name is
taken from it.
"""
from __future__ import annotations

import ast
import io
import re
import subprocess
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "madx_fast"
MAX_FUNCTION_LINES = 80


# --------------------------------------------------------------------------------------------------------
# import graph
# --------------------------------------------------------------------------------------------------------
def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its ``__init__``)."""
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name of ``from <node.module> import ...`` written in ``module``."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def module_edges(module: str, is_package: bool, text: str, modules) -> set[str]:
    """The package modules that the import statements of ``module`` (source ``text``; anywhere in it, lazy
    imports included) reach."""
    out = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve_from(module, is_package, node)
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in modules and t != module}
    return out


def import_edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    return {m: module_edges(m, path.name == "__init__.py", path.read_text(encoding="utf-8"), modules)
            for m, path in modules.items()}


def import_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), each as a sorted list."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
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
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def cycle_edges(edges: dict[str, set[str]], component: list[str]) -> list[str]:
    members = set(component)
    return [f"{a} -> {b}" for a in component for b in sorted(edges[a] & members)]


def test_no_import_cycle():
    edges = import_edges(_modules())
    cycles = import_cycles(edges)
    assert not cycles, "import cycles in madx_fast (edges inside each):\n" + "\n".join(
        "  " + "; ".join(cycle_edges(edges, c)) for c in cycles)


def test_cycle_finder_tells_submodules_from_attributes():
    """The finder itself: ``from . import sub`` reaches the submodule, ``from . import name`` the package."""
    is_package = {"p": True, "p.a": False, "p.b": False}
    text = {"p": "from . import a\n", "p.a": "from . import b\nfrom .b import f\n",
            "p.b": "def f():\n    from . import name\n"}
    edges = {m: module_edges(m, is_package[m], text[m], is_package) for m in is_package}
    assert edges == {"p": {"p.a"}, "p.a": {"p.b"}, "p.b": {"p"}}
    assert import_cycles(edges) == [["p", "p.a", "p.b"]]
    edges["p.b"] = set()
    assert import_cycles(edges) == []


# --------------------------------------------------------------------------------------------------------
# function length
# --------------------------------------------------------------------------------------------------------
def long_functions(limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``path:line name (n lines)`` of every def in the package longer than ``limit`` lines (decorators
    not counted; the body to its last line)."""
    out = []
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_no_long_function():
    assert not long_functions(), f"functions over {MAX_FUNCTION_LINES} lines:\n  " + "\n  ".join(long_functions())


# --------------------------------------------------------------------------------------------------------
# path references
# --------------------------------------------------------------------------------------------------------
# A *path reference* is a token of path characters (letters, digits, ``_ . - /``; cut at anything else, so
# ``ops.py:227`` names ``ops.py``; trailing ``.`` and ``/`` dropped) in a doc, a script, a C/CUDA source, or a
# Python comment or docstring, that is one of:
#   beside    ``./`` or ``../`` and a source or doc suffix: it must exist relative to the file;
#   rooted    its first part is a top-level directory of the repository (``madx_fast/``, ``tests/``, ...):
#             the file or directory must be tracked at that path (in any Python string literal too);
#   relative  a path with a slash ending in a source or doc suffix (``tasks/ner.py``): some tracked file's path
#             must end with it;
#   bare      a file name with a source or doc suffix (``performance.md``, ``test_grouped_ops.py``): some
#             tracked file must have that name;
#   a link    in Markdown, ``[text](target)`` with a relative target: it must exist beside the document.
# Not references: tokens with ``* { } < >`` (patterns, placeholders), after ``$`` or ``}`` (a shell variable's
# directory), absolute paths, URLs, paths that do not start in the repository (``runs/lang-sw``,
# ``data/sw.txt``: a user's), and the files of other projects in EXTERNAL_FILES.
ROOTED = ("madx_fast", "tests", "docs", "scripts", "benchmarks", "csrc", ".ci")
SUFFIXES = (".py", ".md", ".cu", ".cuh", ".cpp", ".h", ".sh", ".toml")
SCANNED = ("README.md", "docs/", "madx_fast/", "scripts/", "benchmarks/", "tests/", "csrc/", ".ci/")
# headers of the CUDA toolkit and of PyTorch that the CUDA backend's sources and notes name
# this file names example paths (its own rules' illustrations), so it is not scanned
SELF = "tests/test_structure.py"
EXTERNAL_FILES = {"cuda_runtime_api.h", "cuda_fp16.h", "CUDAContext.h", "c10/cuda/impl/cuda_cmake_macros.h"}
_TOKEN = re.compile(r"[\w./*{}<>-]+")
_LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [p for p in out.splitlines() if (ROOT / p).exists()]


def _texts(root: Path, path: str) -> list[tuple[str, bool]]:
    """``(text, prose)`` pieces of a file: a Python file's comments and docstrings (prose) and its other string
    literals (where only rooted paths count); any other file whole, as prose."""
    text = (root / path).read_text(encoding="utf-8")
    if not path.endswith(".py"):
        return [(text, True)]
    tree = ast.parse(text)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant) and isinstance(node.body[0].value.value, str)}
    pieces = [(t.string, True) for t in tokenize.generate_tokens(io.StringIO(text).readline)
              if t.type == tokenize.COMMENT]
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            pieces.append((node.value, id(node) in docstrings))
    return pieces


def _problem(token: str, prose: bool, files: set[str], names: set[str], dirs: set[str]) -> bool | None:
    """Whether ``token`` names a missing path (None: it is no path reference)."""
    if "/" in token and token.split("/")[0] in ROOTED:
        return token not in files and token not in dirs
    if not prose or not token.endswith(SUFFIXES) or token in EXTERNAL_FILES:
        return None
    if "/" in token:
        return not any(f.endswith("/" + token) for f in files)
    return token not in names if re.fullmatch(r"[\w.-]+", token) and not token.startswith(".") else None


def path_problems(files: list[str], root: Path = ROOT) -> list[str]:
    """``file: token`` for every path reference in the scanned ``files`` (tracked files of the repository at
    ``root``) that names nothing there."""
    tracked, names = set(files), {Path(p).name for p in files}
    dirs = {str(parent) for p in files for parent in Path(p).parents if str(parent) != "."}
    problems = []
    for path in (p for p in files if p.startswith(SCANNED) and p != SELF):
        for text, prose in _texts(root, path):
            links = _LINK.findall(text) if path.endswith(".md") else []
            problems += [f"{path}: link {target}" for target in links
                         if not target.startswith(("http:", "https:", "mailto:"))
                         and not (root / path).parent.joinpath(target).exists()]
            for m in _TOKEN.finditer(text):
                token = m.group().rstrip("./")
                if (not token or token in links or any(c in token for c in "*{}<>") or token.startswith("/")
                        or text[max(m.start() - 1, 0):m.start()] in ("$", "}")):
                    continue
                if token.startswith(("./", "../")):  # beside the file (a source or doc file; else a user's)
                    missing = prose and token.endswith(SUFFIXES) and not (root / path).parent.joinpath(token).exists()
                else:
                    missing = _problem(token, prose, tracked, names, dirs)
                if missing:
                    problems.append(f"{path}: {token}")
    return sorted(set(problems))


def test_every_path_named_exists():
    problems = path_problems(tracked_files())
    assert not problems, "references to paths that do not exist:\n  " + "\n  ".join(problems)


def test_path_references_are_found(tmp_path):
    """The checker finds what it must: rooted, relative, bare and linked references, not a user's paths."""
    files = ["docs/spec.md", "madx_fast/training/runs.py", "madx_fast/training/tasks/ner.py", "docs/probe.md"]
    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("# runs.py: see spec.md\n" if f.endswith(".py") else "", encoding="utf-8")
    gone = "tests/" + "_parity.py"  # (written in two pieces: this file names no missing path itself)
    (tmp_path / "docs/probe.md").write_text(
        f"see {gone}, madx_fast/training/runs.py, tasks/ner.py, tasks/gone.py, performance.md, spec.md, "
        "[a](../docs/spec.md), [b](missing.md); --output runs/lang-sw data/sw.txt csrc/*.cu madx_fast/ $TMP/x.cu "
        "/usr/include/cuda_fp16.h", encoding="utf-8")
    found = [p.split(": ", 1)[1] for p in path_problems(files, tmp_path)]
    assert found == ["link missing.md", "performance.md", "tasks/gone.py", gone], found
