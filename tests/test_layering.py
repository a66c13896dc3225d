"""The layering rule of ARCHITECTURE.md, checked by parsing every module's imports."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "safetypatch"

TIERS = {
    "errors": 0,
    "utils": 1, "registry": 1, "config": 1,
    "data": 2, "weights": 2,
    "models": 3,
    "patch": 4,
    "train": 5, "restoration": 5, "analysis": 5, "eval": 5,
    "report": 6,
    "api": 7,
    "cli": 8,
}
UI_ONLY = {"rich", "typer"}


def _unit(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_every_unit_has_a_tier():
    units = {_unit(p) for p in SRC.rglob("*.py") if p.name != "__init__.py" or p.parent != SRC}
    assert units <= set(TIERS), f"units without a tier in tests/test_layering.py: {units - set(TIERS)}"


def test_modules_import_only_lower_tiers():
    problems = []
    for path in SRC.rglob("*.py"):
        if path.parent == SRC and path.name == "__init__.py":
            continue
        unit = _unit(path)
        for name in _imports(path):
            top = name.split(".")[0]
            if top in UI_ONLY and unit != "cli":
                problems.append(f"{path.relative_to(SRC)} imports {top} (only cli may)")
            if top != "safetypatch" or name == "safetypatch":
                continue
            other = name.split(".")[1]
            if other != unit and TIERS[other] >= TIERS[unit]:
                problems.append(f"{path.relative_to(SRC)} ({unit}, tier {TIERS[unit]}) imports {name} "
                                f"(tier {TIERS[other]})")
    assert not problems, "\n".join(problems)


def test_importing_the_package_is_cheap():
    heavy = "('torch', 'transformers', 'trl', 'matplotlib')"
    code = f"import sys, safetypatch; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
