"""The package's shape, read from its sources: no import circle, no private name borrowed across packages, and the
README's layout table naming every package folder.

The import graph counts every import a module makes (module level and inside functions, since a lazy import that
closes a circle is still a circle), except those under ``if TYPE_CHECKING:``.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"ipiqa": "ipiqa", "ipiqa.export": "export", "ipiqa.runtime": "runtime", "ipiqa.training": "training"}


def _modules(root: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package's __init__), for every installed package folder under ``root``."""
    found: dict[str, tuple[Path, bool]] = {}
    for package, folder in PACKAGES.items():
        for f in sorted((root / folder).rglob("*.py")):
            parts = list(f.relative_to(root / folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            found[".".join([package] + (parts[:-1] if is_package else parts))] = (f, is_package)
    return found


def _statements(tree: ast.AST) -> Iterator[ast.stmt]:
    """Every import statement of a module, at any depth, outside ``if TYPE_CHECKING:`` blocks."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _statements(node)


def _imported(name: str, file: Path, is_package: bool, modules: dict) -> Iterator[tuple[str, str]]:
    """(module, imported name or '') pairs, relative imports resolved, names resolved to submodules where they are."""
    base = name.split(".") if is_package else name.split(".")[:-1]
    for node in _statements(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            yield from ((a.name, "") for a in node.names)
            continue
        module = node.module or ""
        if node.level:
            module = ".".join(base[: len(base) - node.level + 1] + ([module] if module else []))
        for alias in node.names:
            sub = f"{module}.{alias.name}"
            yield (sub, "") if sub in modules else (module, alias.name)


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the package modules it imports (an import of ``a.b.c`` where only ``a.b`` is ours counts as ``a.b``)."""
    modules = _modules(root)
    graph: dict[str, set[str]] = {}
    for name, (file, is_package) in modules.items():
        edges = set()
        for module, _ in _imported(name, file, is_package, modules):
            while module and module not in modules:
                module = module.rpartition(".")[0]
            if module and module != name:
                edges.add(module)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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


def _write(root: Path, files: dict[str, str]) -> None:
    for folder in PACKAGES.values():
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "__init__.py").touch()
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_a_lazy_import_that_closes_a_circle_is_found(tmp_path):
    _write(tmp_path, {"export/checks.py": "def decode():\n    from .parity import Result\n",
                      "export/parity.py": "from .checks import decode\n",
                      "export/alone.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .checks import x\n"})
    assert cycles(import_graph(tmp_path)) == [["ipiqa.export.checks", "ipiqa.export.parity"]]


def test_an_import_of_a_package_that_imports_back_is_a_circle(tmp_path):
    _write(tmp_path, {"runtime/io/__init__.py": "from .sources import RowSource\n",
                      "runtime/io/sources.py": "from ..io import RowSource\n",
                      "runtime/io/shards.py": "X = 1\n"})
    assert cycles(import_graph(tmp_path)) == [["ipiqa.runtime.io", "ipiqa.runtime.io.sources"]]


def _private_borrowings(root: Path) -> list[str]:
    modules = _modules(root)
    top = {m: next(p for p in sorted(PACKAGES, key=len, reverse=True) if m == p or m.startswith(p + ".")) for m in modules}
    found = []
    for name, (file, is_package) in modules.items():
        for module, imported in _imported(name, file, is_package, modules):
            owner = module
            while owner and owner not in modules:
                owner = owner.rpartition(".")[0]
            if owner in modules and top[owner] != top[name] and imported.startswith("_") \
                    and not imported.startswith("__"):
                found.append(f"{name} imports {module}.{imported}")
    return found


def test_no_module_borrows_a_private_name_of_another_package():
    assert _private_borrowings(ROOT) == []


def test_a_private_name_borrowed_across_packages_is_found(tmp_path):
    _write(tmp_path, {"ipiqa/preprocess.py": "def _load():\n    pass\n",
                      "runtime/thumbs.py": "from ipiqa.preprocess import _load\n",
                      "ipiqa/console.py": "from .preprocess import _load\n"})
    assert _private_borrowings(tmp_path) == ["ipiqa.runtime.thumbs imports ipiqa.preprocess._load"]


def _layout_rows(readme: str) -> set[str]:
    """The folders the README's layout table names (first cell of each row under the 'Layout' heading)."""
    section = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    return {m.group(1).strip("/") for m in re.finditer(r"^\|\s*`([^`]+)`", section, re.M)}


def test_the_readme_layout_table_names_every_package_folder():
    folders = {str(p.parent.relative_to(ROOT)) for folder in PACKAGES.values()
               for p in (ROOT / folder).rglob("__init__.py")}
    named = _layout_rows((ROOT / "README.md").read_text())
    assert sorted(folders - named) == [], "folders missing from README's layout table"
    assert sorted(f for f in named if not (ROOT / f).is_dir()) == [], "rows naming folders that do not exist"
