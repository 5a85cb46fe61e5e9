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

import pytest

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
        pytest.skip(f"lint-imports not found beside {sys.executable}; pip install -e '.[dev]'")
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
