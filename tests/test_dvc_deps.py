"""dvc.yaml lists every source file a stage runs, so `dvc repro` reruns a stage whenever code it
imports changes. The deps are derived from the imports: this test walks each stage module's
`lmforge`/`stages` imports transitively (lazy imports inside functions too) and fails naming the
lines dvc.yaml lacks, or lists that no stage imports."""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest
import yaml

from conftest import REPO

OURS = ("lmforge", "stages")


def module_file(module: str) -> Path | None:
    """The file of `module` in this repository (package __init__s excluded: they hold no logic)."""
    base = REPO.joinpath(*module.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


@functools.cache
def parsed(path: Path) -> ast.Module:
    """`path`'s syntax tree, parsed once for all the tests here."""
    return ast.parse(path.read_text(encoding="utf-8"))


def imported_modules(path: Path) -> set[str]:
    """Every module of ours that `path` imports, at top level or inside a function."""
    found: set[str] = set()
    for node in ast.walk(parsed(path)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] in OURS)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in OURS:
            found.add(node.module)
            # `from lmforge.data import sources` imports a module, not a name
            found.update(f"{node.module}.{alias.name}" for alias in node.names if module_file(f"{node.module}.{alias.name}"))
    return found


def code_deps(module: str) -> set[str]:
    """Repository-relative files `module` runs: itself and what it imports, transitively."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        path = module_file(todo.pop())
        if path is None or path in seen:
            continue
        seen.add(path)
        todo.extend(imported_modules(path))
    return {p.relative_to(REPO).as_posix() for p in seen}


def stage_modules(cmd: str) -> list[str]:
    return re.findall(r"(?:-m\s+|\s)((?:stages|lmforge)\.[\w.]+)", f" {cmd}")


STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_dvc_yaml_lists_every_code_dep_of_the_stage(name):
    stage = STAGES[name]
    needed = set().union(*(code_deps(m) for m in stage_modules(stage["cmd"])))
    assert needed, f"no module found in the cmd of {name}"
    listed = {d for d in stage.get("deps", []) if d.endswith(".py")}
    missing, extra = sorted(needed - listed), sorted(listed - needed)
    assert not missing, f"dvc.yaml stage {name} lacks deps (add them):\n" + "\n".join(f"      - {m}" for m in missing)
    assert not extra, f"dvc.yaml stage {name} lists code it does not import (remove): {extra}"


def test_the_walk_follows_lazy_and_transitive_imports():
    deps = code_deps("stages.evaluate")
    assert "lmforge/model/export.py" in deps  # imported by stages.evaluate
    assert "lmforge/model/decoder.py" in deps  # through lmforge.model.export
    assert "lmforge/core/errors.py" in deps


def _used_names(path: Path) -> set[str]:
    """The names `path`'s code uses (its imports aside: an import alone is no use)."""
    names: set[str] = set()
    for top in parsed(path).body:
        if not isinstance(top, (ast.Import, ast.ImportFrom)):
            names |= {node.id for node in ast.walk(top) if isinstance(node, ast.Name)}
            names |= {node.attr for node in ast.walk(top) if isinstance(node, ast.Attribute)}
    return names


def test_a_stages_code_deps_hold_no_code_that_only_tests_and_benchmarks_use():
    """A function in a module a stage imports is a DVC dep: editing it reruns the stage. One that only
    tests or benchmarks call belongs in a module no stage imports (lmforge/data/sequential.py)."""
    deps = sorted({REPO / dep for stage in STAGES.values() for module in stage_modules(stage["cmd"])
                   for dep in code_deps(module)})
    used = set().union(*(_used_names(path) for top in ("lmforge", "stages", "flows") for path in (REPO / top).rglob("*.py")
                         if path != REPO / "lmforge/data/sequential.py"))  # its users are the tests and benchmarks
    unused = [f"{path.relative_to(REPO)}: {node.name}" for path in deps
              for node in parsed(path).body
              if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name not in used]
    assert not unused, "only tests or benchmarks (or nothing) use these; move them out of the stages' deps:\n" + \
        "\n".join(unused)
