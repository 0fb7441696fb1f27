"""The layering ARCHITECTURE.md draws, held against the imports (top level and inside functions):
core imports no other lmforge package; model knows nothing of training, tracking or distribution;
train does not import track; data does not import model or train; no import cycle anywhere."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from conftest import REPO

PACKAGES = ("core", "data", "model", "train", "finetune", "evaluate", "track")
# package -> the lmforge packages it must never import
NEVER = {
    "core": set(PACKAGES) - {"core"},
    "model": {"train", "track", "finetune", "evaluate"},
    "train": {"track", "finetune", "evaluate"},
    "data": {"model", "train", "finetune", "evaluate", "track"},
}


def _sources() -> list[Path]:
    return sorted(p for top in ("lmforge", "stages", "flows") for p in (REPO / top).rglob("*.py"))


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, *, entry_points: bool = True) -> list[tuple[int, str]]:
    """(line, module) of every import of ours in `path`; `entry_points=False` leaves out what an
    `if __name__ == "__main__":` block imports (running the file, not importing it)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped: set[int] = set()
    if not entry_points:
        for node in tree.body:
            if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
                skipped.update(id(n) for n in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return [(line, name) for line, name in found if name.split(".")[0] in ("lmforge", "stages", "flows")]


@pytest.mark.parametrize("package", sorted(NEVER))
def test_a_package_imports_only_what_the_layering_allows(package):
    broken = []
    for path in sorted((REPO / "lmforge" / package).rglob("*.py")):
        for line, name in _imports(path):
            parts = name.split(".")
            if parts[0] == "lmforge" and len(parts) > 1 and parts[1] in NEVER[package]:
                broken.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    assert not broken, f"lmforge/{package} must not import {sorted(NEVER[package])}:\n" + "\n".join(broken)


def test_the_model_knows_nothing_of_distribution():
    broken = [f"{p.relative_to(REPO)}:{line} imports {name}"
              for p in sorted((REPO / "lmforge" / "model").rglob("*.py"))
              for line, name in _imports(p) if name.startswith("torch.distributed")]
    tree = [f"{p.relative_to(REPO)}" for p in sorted((REPO / "lmforge" / "model").rglob("*.py"))
            if "torch.distributed" in p.read_text(encoding="utf-8")]
    assert not broken and not tree, broken or tree


def test_no_import_cycle_anywhere():
    modules = {_module(p): p for p in _sources()}
    graph = {name: {m for _, m in _imports(path, entry_points=False) if m in modules and m != name}
             for name, path in modules.items()}
    cycles, done, stack = [], set(), []

    def visit(node: str) -> None:
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in done:
            return
        stack.append(node)
        for nxt in sorted(graph[node]):
            if not nxt.startswith(node + "."):  # a package's face handing on its modules is no cycle
                visit(nxt)
        stack.pop()
        done.add(node)

    for name in sorted(graph):
        visit(name)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_layering_check_sees_a_forbidden_import(tmp_path):
    """The check itself: an import the rules forbid is found, inside a function too."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from lmforge.track.runs import stage_run\n", encoding="utf-8")
    assert (2, "lmforge.track.runs") in _imports(probe)


def _line_count(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def test_every_stage_module_is_at_most_80_lines():
    fat = [f"{p.relative_to(REPO)}: {_line_count(p)} lines" for p in sorted((REPO / "stages").glob("*.py"))
           if _line_count(p) > 80]
    assert not fat, "a stage parses params, calls the library and says what it did (move the rest into lmforge/):\n" \
        + "\n".join(fat)


def test_no_library_or_flow_module_is_over_400_lines():
    modules = [*(REPO / "lmforge").rglob("*.py"), *(REPO / "flows").rglob("*.py")]
    fat = [f"{p.relative_to(REPO)}: {_line_count(p)} lines" for p in sorted(modules) if _line_count(p) > 400]
    assert not fat, "split these by concern:\n" + "\n".join(fat)


def _top_level_names(root: Path) -> list[tuple[str, str]]:
    """(name, module path) of every top-level function, class and UPPERCASE constant under `root`."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                found.append((node.name, path.relative_to(REPO).as_posix()))
            elif isinstance(node, ast.Assign):
                found += [(t.id, path.relative_to(REPO).as_posix()) for t in node.targets
                          if isinstance(t, ast.Name) and t.id.isupper()]
    return found


def test_each_manifest_function_and_format_version_is_named_for_what_it_describes():
    pattern = re.compile(r"^(read|write)_\w*manifest$|FORMAT|VERSION")
    where: dict[str, list[str]] = {}
    for name, module in _top_level_names(REPO / "lmforge"):
        if pattern.search(name):
            where.setdefault(name, []).append(module)
    shared = {name: modules for name, modules in where.items() if len(modules) > 1}
    assert not shared, f"one name, several formats (name each for the format it reads, writes or versions): {shared}"


def test_the_data_stages_publish_through_one_function():
    publishers = [f"{module}: {name}" for name, module in _top_level_names(REPO / "lmforge" / "data")
                  if name.startswith("publish")]
    assert publishers == ["lmforge/data/partitions.py: publish"], publishers
