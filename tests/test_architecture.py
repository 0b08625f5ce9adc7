"""The house keeps its shape (docs/architecture.rst): one-way package imports, small modules,
a core without Twisted, private Twisted names in one module, imports through package faces."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "blyanproxy"
MODULES = sorted(PACKAGE.rglob("*.py"))
#: About 400 lines is the sign to split a module.
MAX_LINES = 420


def _part(path: Path) -> str:
    """The part a module belongs to: its subpackage, or the top-level module's own name."""
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def _imports(path: Path, typing_only: bool = True) -> list[ast.ImportFrom | ast.Import]:
    """Every import of a module; without ``typing_only``, those under ``if TYPE_CHECKING:`` are left out."""
    tree = ast.parse(path.read_text())
    if not typing_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
                node.body = []
    return [node for node in ast.walk(tree) if isinstance(node, (ast.ImportFrom, ast.Import))]


def _project_parts(node: ast.ImportFrom | ast.Import) -> set[str]:
    if isinstance(node, ast.Import):
        return {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("blyanproxy.")}
    if node.module == "blyanproxy":
        return {alias.name for alias in node.names}
    if node.module and node.module.startswith("blyanproxy."):
        return {node.module.split(".")[1]}
    return set()


def _graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for path in MODULES:
        part = _part(path)
        for node in _imports(path):
            edges[part] |= _project_parts(node) - {part}
    return edges


def test_package_imports_point_one_way():
    edges = _graph()
    seen: dict[str, str] = {}

    def visit(part: str, trail: tuple[str, ...]) -> None:
        if seen.get(part) == "done":
            return
        assert seen.get(part) != "open", "import cycle: " + " -> ".join((*trail, part))
        seen[part] = "open"
        for other in sorted(edges.get(part, ())):
            visit(other, (*trail, part))
        seen[part] = "done"

    for part in sorted(edges):
        visit(part, ())


def test_core_imports_nothing_of_the_project_outside_core_and_no_twisted():
    """At run time, that is: a Twisted type named for mypy only is allowed."""
    for path in sorted((PACKAGE / "core").glob("*.py")):
        for node in _imports(path, typing_only=False):
            assert _project_parts(node) <= {"core"}, f"{path.name} imports {_project_parts(node)}"
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            assert not any(name.split(".")[0] in ("twisted", "treq", "klein") for name in names), path.name


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_over_about_400_lines(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def test_private_twisted_names_are_imported_only_in_twistedinternals():
    for path in MODULES:
        if path.name == "twistedinternals.py":
            continue
        for node in _imports(path):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("twisted"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private and "._" not in (node.module or ""), f"{path}: {node.module} {private}"


def test_other_parts_import_a_package_only_through_its_face():
    packages = {path.parent.name for path in PACKAGE.glob("*/__init__.py")}
    for path in MODULES:
        for node in _imports(path):
            if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("blyanproxy."):
                continue
            target = node.module.split(".")
            # a module inside another package: only the face may be named
            inner = target[1] in packages and target[1] != _part(path) and len(target) > 2
            assert not inner, f"{path.relative_to(PACKAGE)} imports {node.module}"
