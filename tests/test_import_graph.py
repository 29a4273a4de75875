"""The packages import each other only downwards, in the layers of docs/architecture.md.

Every import of every module counts, also one inside a function or under
TYPE_CHECKING: a cycle that only type checkers see still ties the packages together.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent

# What each package may import besides itself ("flannel_xdp": core/, the base of all).
# lab/ and bench/ are harnesses over the product, and only the CLI starts anything.
ALLOWED: dict[str, set[str]] = {
    "flannel_xdp": set(),
    "bpf": {"flannel_xdp"},
    "maps": {"bpf", "flannel_xdp"},
    "loader": {"maps", "bpf", "flannel_xdp"},
    "metrics": {"maps", "bpf", "flannel_xdp"},
    "registry": {"flannel_xdp"},
    "node": {"registry", "maps", "bpf", "flannel_xdp"},
    "agent": {"registry", "node", "loader", "maps", "metrics", "bpf", "flannel_xdp"},
    "lab": {"registry", "node", "loader", "maps", "bpf", "flannel_xdp"},
    "bench": {"lab", "registry", "node", "loader", "maps", "bpf", "flannel_xdp"},
    "cli": {
        "agent",
        "lab",
        "bench",
        "registry",
        "node",
        "loader",
        "maps",
        "metrics",
        "bpf",
        "flannel_xdp",
    },
}


def package_dirs() -> dict[str, Path]:
    """{package: folder} from pyproject.toml's package-dir, the one statement of it."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        mapping = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    return {name.removeprefix("flannel_xdp."): ROOT / folder for name, folder in mapping.items()}


def imported_packages(path: Path, package: str) -> set[tuple[str, int]]:
    """(package, line) of every flannel_xdp package that the module at path imports."""
    found: set[tuple[str, int]] = set()
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: within the package itself
                continue
            base = node.module or ""
            names = [f"{base}.{a.name}" if base == "flannel_xdp" else base for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] != "flannel_xdp":
                continue
            target = parts[1] if len(parts) > 1 and parts[1] in ALLOWED else "flannel_xdp"
            if target != package:
                found.add((target, node.lineno))
    return found


def test_every_package_has_a_rule():
    assert set(package_dirs()) == set(ALLOWED)


def test_imports_follow_the_layers():
    wrong = []
    for package, folder in package_dirs().items():
        for path in sorted(folder.glob("*.py")):
            for target, line in sorted(imported_packages(path, package)):
                if target not in ALLOWED[package]:
                    wrong.append(f"{path.relative_to(ROOT)}:{line}: {package} imports {target}")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_the_check_sees_a_wrong_import(tmp_path):
    """The checker itself: an upward import, hidden in a function, is found."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from flannel_xdp.agent import agent\n")
    assert imported_packages(module, "maps") == {("agent", 2)}


def test_test_modules_share_helpers_through_support_modules():
    """A test module imports no other: importing one runs its module-level set-up and
    ties its tests to another's, so what two share lives in a tests/*_support.py."""
    wrong = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            if any(n.startswith("tests.test_") for n in names):
                wrong.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not wrong, "test modules imported by others:\n" + "\n".join(wrong)
