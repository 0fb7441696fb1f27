"""docs/guides/what-reruns.md's table holds: each row's example, applied to the tiny pipeline's
params.yaml, makes exactly the stages of its `stale` column stale (real `dvc status`, no repro), and
its `then reruns` column is what lies downstream of them in dvc.yaml's graph. The rows are parsed
from the page, so the page and the test cannot drift apart."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import REPO

PAGE = REPO / "docs/guides/what-reruns.md"
DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))
ALWAYS = "promote"  # always_changed: stale on every `dvc status`, so in no row


def table_rows() -> list[tuple[str, str, object, set[str], set[str]]]:
    """(change, key, value, stale, then) for each row of the page's table."""
    rows = []
    for line in PAGE.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[1].startswith("`") or cells[0] == "you change":
            continue
        ((key, value),) = yaml.safe_load(cells[1].strip("`")).items()
        stages = [{s.strip() for s in cell.split(",")} - {"nothing"} for cell in cells[2:]]
        rows.append((cells[0], key, value, stages[0], stages[1]))
    return rows


ROWS = table_rows()


def downstream(stages: set[str]) -> set[str]:
    """The stages whose deps lie under the outs of `stages`, transitively (paths resolved with the
    repository's params.yaml, as `${...}` in dvc.yaml is)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))

    def resolve(path: object) -> str:
        def value(match: re.Match) -> str:
            node = params
            for part in match.group(1).split("."):
                node = node[part]
            return str(node)
        return re.sub(r"\$\{([\w.]+)\}", value, str(next(iter(path)) if isinstance(path, dict) else path))

    outs = {name: [resolve(o) for o in spec.get("outs", []) + spec.get("metrics", [])] for name, spec in DVC_YAML["stages"].items()}
    deps = {name: [resolve(d) for d in spec.get("deps", [])] for name, spec in DVC_YAML["stages"].items()}
    found, todo = set(), list(stages)
    while todo:
        upstream = todo.pop()
        for name in DVC_YAML["stages"]:
            if name not in found and any(d == o or d.startswith(f"{o}/") for d in deps[name] for o in outs[upstream]):
                found.add(name)
                todo.append(name)
    return found


@pytest.fixture(scope="module")
def repo(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of tiny_repo (its pipeline run, nothing stale but promote)."""
    root = tmp_path_factory.mktemp("reruns") / "repo"
    shutil.copytree(tiny_repo, root, symlinks=True, ignore=shutil.ignore_patterns("mlruns", "mlflow.db", "checkpoints"))
    assert stale(root) == set(), "tiny_repo has stale stages before any edit"
    return root


def stale(root: Path) -> set[str]:
    from dvc.repo import Repo

    with Repo(str(root)) as dvc:
        return {name.rpartition(":")[2] for name in dvc.status()} - {ALWAYS}  # "dvc.yaml:clean" from elsewhere


def set_key(params: dict, key: str, value: object) -> None:
    *sections, last = key.split(".")
    node = params
    for section in sections:
        node = node[section]
    assert last in node, f"{key} is no key of params.yaml: fix the row of {PAGE.name}"
    node[last] = value


@pytest.mark.parametrize(("change", "key", "value", "expected", "then"), ROWS, ids=[row[1] for row in ROWS])
def test_a_change_makes_exactly_the_stages_of_its_row_stale(repo, change, key, value, expected, then):
    path = repo / "params.yaml"
    original = path.read_text(encoding="utf-8")
    params = yaml.safe_load(original)
    set_key(params, key, value)
    try:
        path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
        found = stale(repo)
        assert found == expected, f"{change} ({key}) makes {sorted(found) or 'nothing'} stale: fix the row's `stale` column"
    finally:
        path.write_text(original, encoding="utf-8")


@pytest.mark.parametrize(("change", "key", "value", "expected", "then"), ROWS, ids=[row[1] for row in ROWS])
def test_the_rows_then_column_is_what_lies_downstream(change, key, value, expected, then):
    assert then == downstream(expected) - expected - {ALWAYS}, f"{change} ({key}): fix the row's `then reruns` column"


def test_the_table_is_there():
    assert len(ROWS) >= 10 and any(key.startswith("runtime.") for _, key, *_ in ROWS)
