"""The folders are the architecture: check the layer rules of DESIGN.md mechanically.

Two independent checks. ``lint-imports`` runs the import-linter contracts in pyproject.toml on the
layer packages. The AST scan also covers what import-linter cannot see: top-level modules (only the
composition root ``fleetvisor.py`` may wire layers together) and imports hidden inside functions.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.support.needs import missing, need_module

REPO_ROOT = Path(__file__).resolve().parents[1]
COMPOSITION_ROOT = "fleetvisor.py"

#: What each layer package may import of ours (DESIGN.md, "Layout"), besides itself.
ALLOWED: dict[str, frozenset[str]] = {
    "protocols": frozenset(),
    "hv": frozenset({"protocols"}),
    "agent": frozenset({"hv", "protocols"}),
    "controller": frozenset({"protocols"}),
}
LAYERS = frozenset(ALLOWED)
#: Runtime layers a process is made of; wiring more than one of them together is the root's job.
RUNTIME_LAYERS = frozenset({"hv", "agent", "controller"})


def _lint_imports() -> Path:
    candidate = Path(sys.executable).parent / "lint-imports"
    if not candidate.exists():
        missing(f"lint-imports not found beside {sys.executable}; pip install -e '.[dev]'")
    return candidate


def test_import_linter_contracts_hold() -> None:
    """Pins the import-linter layer contracts in pyproject.toml (lint-imports exits 0)."""
    result = subprocess.run(
        [str(_lint_imports()), "--no-cache"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"lint-imports failed:\n{result.stdout}\n{result.stderr}"
    assert "BROKEN" not in result.stdout


def _layers_imported(path: Path) -> set[str]:
    """Every layer package named by an absolute import anywhere in ``path`` (also inside functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.update(name.split(".")[0] for name in names if name.split(".")[0] in LAYERS)
    return found


def _python_files() -> list[tuple[str | None, Path]]:
    """(owning layer or None for top-level modules, path) for the code the layer rules apply to."""
    files: list[tuple[str | None, Path]] = [(None, p) for p in sorted(REPO_ROOT.glob("*.py"))]
    for layer in sorted(LAYERS):
        package = REPO_ROOT / layer
        if package.is_dir():
            files.extend((layer, p) for p in sorted(package.rglob("*.py")) if "__pycache__" not in p.parts)
    return files


def test_only_the_composition_root_wires_layers_together() -> None:
    """Pins that fleetvisor.py alone imports more than one runtime layer (hv, agent, controller)."""
    offenders = []
    for owner, path in _python_files():
        if path.name == COMPOSITION_ROOT and owner is None:
            continue
        others = (_layers_imported(path) & RUNTIME_LAYERS) - {owner}
        if len(others) > 1:
            offenders.append(f"{path.relative_to(REPO_ROOT)} imports {sorted(others)}")
    assert not offenders, (
        f"only the composition root {COMPOSITION_ROOT} may wire layers together; move this wiring there:\n"
        + "\n".join(offenders)
    )


def test_layer_packages_import_only_what_the_design_allows() -> None:
    """Pins the layer table of DESIGN.md by AST, including imports inside functions."""
    offenders = []
    for owner, path in _python_files():
        if owner is None:
            continue
        forbidden = _layers_imported(path) - ALLOWED[owner] - {owner}
        if forbidden:
            offenders.append(
                f"{path.relative_to(REPO_ROOT)} ({owner}) imports {sorted(forbidden)}; "
                f"{owner} may import only {sorted(ALLOWED[owner]) or 'nothing of ours'}"
            )
    assert not offenders, "layer rule broken (see DESIGN.md, Layout):\n" + "\n".join(offenders)


def test_the_scan_sees_every_kind_of_import(tmp_path: Path) -> None:
    """Pins the AST scanner itself: plain, from and function-local imports count; relative ones do not."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import agent.daemon\n"
        "from controller import fleet\n"
        "from . import hv\n"
        "import msgspec, protocols.codec as codec\n"
        "def later():\n"
        "    import hv.sim\n"
    )
    assert _layers_imported(sample) == {"agent", "controller", "protocols", "hv"}
    assert (REPO_ROOT / COMPOSITION_ROOT).is_file()
    assert any(owner == "protocols" for owner, _ in _python_files())


#: Size limits of production code: a file a reader can hold, a function that fits a screen.
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80
PACKAGES = ("protocols", "hv", "agent", "controller")


def _production_files() -> list[Path]:
    files = [REPO_ROOT / COMPOSITION_ROOT]
    for package in PACKAGES:
        files.extend(sorted((REPO_ROOT / package).rglob("*.py")))
    return files


def test_no_production_file_is_over_the_size_limit() -> None:
    """Every module of the packages (and the composition root) has at most MAX_FILE_LINES lines."""
    over = [
        f"{path.relative_to(REPO_ROOT)}: {n} lines"
        for path in _production_files()
        if (n := len(path.read_text().splitlines())) > MAX_FILE_LINES
    ]
    assert not over, f"over {MAX_FILE_LINES} lines; split by job:\n" + "\n".join(over)


def test_no_function_is_over_the_size_limit() -> None:
    """Every function and method of the packages has at most MAX_FUNCTION_LINES lines."""
    over = []
    for path in _production_files():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    over.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} {node.name}: {length} lines")
    assert not over, f"over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(over)


def test_every_package_says_its_job() -> None:
    """Each folder of the packages has an __init__.py whose docstring says what it is for."""
    missing = []
    for package in PACKAGES:
        for init in sorted((REPO_ROOT / package).rglob("__init__.py")):
            if not ast.get_docstring(ast.parse(init.read_text())):
                missing.append(str(init.relative_to(REPO_ROOT)))
    assert not missing, "packages without a docstring:\n" + "\n".join(missing)


def test_no_import_circle_anywhere() -> None:
    """No module imports, directly or through others, a module that imports it back.

    Imports inside functions and under TYPE_CHECKING count: a circle hidden from Python at run time
    is still a circle in the design.
    """
    grimp = need_module("grimp", "grimp comes with import-linter (pip install -e '.[dev]')")
    graph = grimp.build_graph(*PACKAGES)
    edges = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    circles = [sorted(c) for c in _strongly_connected(edges) if len(c) > 1]
    assert not circles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles)


def _strongly_connected(edges: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative: the strongly connected components of a directed graph."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[set[str]] = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                found.append(component)
    return found
