"""The package's layering (README "Layout", ../shared/STYLE.md): dependencies point one
way, nothing imports the CLI, and the torch-free modules stay torch-free.

Every import in every module is read with ``ast``, function-level imports included
(they are real edges, only deferred), and mapped to the layer it lands in.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = "easyanimate_rt"
SRC = Path(__file__).resolve().parents[1] / "src" / PACKAGE

BASE = {"errors", "tolerances", "fileio", "media"}
#: layer -> the layers it may import (besides itself and the base modules)
ALLOWED: dict[str, set[str]] = {
    "base": set(),
    "reference": set(),
    "data": {"reference"},
    "shapes": {"reference", "data"},
    "train": {"reference", "shapes", "data"},
    "export": {"reference"},
    "engines": {"export", "reference"},
    "runtime": {"engines", "export", "reference"},
    "validate": {"runtime", "engines", "export", "reference"},
}
#: modules that may import anything: the root CLI, ``python -m`` and the lazy public API
ANYTHING = {"cli", "__main__", "__init__"}


def layer_of(parts: tuple[str, ...]) -> str:
    """Layer of a module path inside the package, e.g. ("export", "spec") -> "export"."""
    head = parts[0] if parts else "__init__"
    return "base" if head in BASE else head


def imported_modules(source: str, module: tuple[str, ...], is_package: bool) -> list[tuple[int, tuple[str, ...]]]:
    """(line, module path inside the package) of every package import in ``source``;
    ``module`` is the importing module's path inside the package."""
    found = []
    package = module if is_package else module[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                target = base + tuple(node.module.split(".") if node.module else ())
                # ``from . import x`` imports the submodule x
                names = [".".join((PACKAGE,) + target + ((a.name,) if not node.module else ()))
                         for a in node.names]
            else:
                names = [node.module or ""]
                if node.module == PACKAGE:
                    names = [f"{PACKAGE}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                found.append((node.lineno, tuple(name.split(".")[1:])))
    return found


def violations(source: str, module: tuple[str, ...], is_package: bool = False) -> list[str]:
    """The forbidden edges of one module, as readable lines."""
    own = layer_of(module)
    bad = []
    for line, target in imported_modules(source, module, is_package):
        if not target:
            if module[0] not in ANYTHING:
                bad.append(f"line {line}: imports the package root (its lazy public API)")
            continue
        if target[0] == "cli" and module[0] != "__main__":
            bad.append(f"line {line}: imports the CLI")
            continue
        if module[0] in ANYTHING:
            continue
        theirs = layer_of(target)
        if theirs in ("base", own) or theirs in ALLOWED.get(own, set()):
            continue
        bad.append(f"line {line}: {own} imports {'.'.join(target)} ({theirs})")
    return bad


def package_modules():
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("")
        parts = tuple(rel.parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1] or ("__init__",)
        yield path, parts, is_package


def test_every_layer_is_known():
    layers = {layer_of(parts) for _, parts, _ in package_modules()} - ANYTHING
    assert layers <= set(ALLOWED), sorted(layers - set(ALLOWED))


def test_dependencies_point_one_way():
    problems = []
    for path, parts, is_package in package_modules():
        for line in violations(path.read_text(), parts, is_package):
            problems.append(f"{path.relative_to(SRC.parent)}: {line}")
    assert not problems, "forbidden imports:\n" + "\n".join(problems)


@pytest.mark.parametrize("source, module, expected", [
    ("from ..engines import tensorrt_rtx", ("export", "cli"), "export imports engines (engines)"),
    ("from easyanimate_rt.train.common import EMA", ("reference", "weights"), "reference imports train.common"),
    ("def f():\n    from ..cli import main", ("runtime", "pipeline"), "imports the CLI"),
    ("from ..data import manifest", ("reference", "text"), "reference imports data (data)"),
    ("from . import tensorrt", ("engines",), None),  # own layer, from a package __init__
    ("from ..fileio import atomic_path", ("reference", "weights"), None),
    ("from easyanimate_rt import media", ("data", "split"), None),
])
def test_the_checker_flags_forbidden_edges(source, module, expected):
    found = violations(source, module, is_package=len(module) == 1)
    if expected is None:
        assert found == []
    else:
        assert len(found) == 1 and expected in found[0], found


@pytest.mark.parametrize("module", [
    "easyanimate_rt", "easyanimate_rt.errors", "easyanimate_rt.tolerances", "easyanimate_rt.fileio",
    "easyanimate_rt.media", "easyanimate_rt.export.spec", "easyanimate_rt.export.index",
    "easyanimate_rt.reference.config", "easyanimate_rt.cli", "easyanimate_rt.runtime.step_cache",
])
def test_torch_free_modules_do_not_import_torch(module):
    """The contract engines and the runtime read (specs, export index), media, the
    tolerance table and the CLI's parser load without torch: start-up time."""
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"{module} imports {out.strip()}"
