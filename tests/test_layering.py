"""The library's dependencies point one way, read from the code's own imports:

    tools / CLIs -> training -> eval -> (checkpoint, logging, parallel, inference) -> (models, data) -> contracts

Every `import` and `from ... import` in a module counts, at module level or inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "janus_train"

# Package -> the janus_train packages it may import (besides itself).
ALLOWED: dict[str, set[str]] = {
    "contracts": set(),
    "data": {"contracts"},
    "models": {"contracts"},
    "parallel": {"models", "contracts"},
    "inference": {"models", "contracts"},
    "checkpoint": {"parallel", "models", "contracts"},
    "logging": {"inference", "models", "contracts"},
    "eval": {"checkpoint", "parallel", "inference", "models", "data", "contracts"},
    "training": {"eval", "checkpoint", "logging", "parallel", "inference", "models", "data", "contracts"},
}
# The top: command-line tools may use anything in the library.
TOP = {"tools", "cli"}
# The library's packages (every one must have a rule, so a new one cannot slip past this test).
PACKAGES = set(ALLOWED) | {"tools"}


def _package(path: Path) -> str:
    rel = path.relative_to(LIB).parts
    return rel[0] if len(rel) > 1 else "cli"  # janus_train/convert.py etc. are entry points


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return out


def _modules():
    return sorted(p for p in LIB.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_package_has_a_rule():
    found = {p.name for p in LIB.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert found <= PACKAGES, f"packages without a layering rule: {sorted(found - PACKAGES)}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path):
    pkg = _package(path)
    bad = []
    for line, module in _imports(path):
        parts = module.split(".")
        if parts[0] in ("bench", "tests"):
            bad.append(f"line {line}: {module} (the library never imports {parts[0]}/)")
        elif parts[0] == "data_pipelines" and pkg not in TOP:
            bad.append(f"line {line}: {module} (only tools may use the shard tools)")
        elif parts[0] == "janus_train" and len(parts) > 1 and pkg not in TOP:
            target = parts[1]
            if target in PACKAGES and target != pkg and target not in ALLOWED[pkg]:
                bad.append(f"line {line}: {module} ({pkg} -> {target} points up or sideways)")
            elif target not in PACKAGES and target != pkg:
                bad.append(f"line {line}: {module} ({pkg} imports a command-line entry point)")
    assert not bad, f"{path.relative_to(ROOT)}:\n  " + "\n  ".join(bad)


def test_tests_do_not_import_bench():
    offenders = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for line, module in _imports(path):
            if module.split(".")[0] == "bench":
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {module}")
    assert not offenders, "\n".join(offenders)


def test_the_rule_catches_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a models module importing training is reported."""
    fake = LIB / "models" / "_layering_probe.py"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: "from janus_train.training.config import load_config\n")
    with pytest.raises(AssertionError, match="models -> training points up"):
        test_imports_point_down(fake)
