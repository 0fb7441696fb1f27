"""`make compare` (lmforge.evaluate.compare): the baseline `make run` saves, the workspace and each DVC
experiment, one row each, the params that differ and the headline figures within 120 characters;
and every viewing command the README and the docs give fits a terminal too. Formatting is held on a
recorded `dvc exp show --json`; the rest on a copy of the tiny pipeline with one real experiment."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from lmforge.evaluate.compare import Row, experiment_rows, format_table

from conftest import REPO, copy_repo, make_repo, run, tool_env

WIDTH = 120
# `dvc exp show --json` (dvc 3.67) after `make run` and `dvc exp run -S finetune.method=frozen` on the
# tiny pipeline, dependency and output hashes left out; its commit has no dvc.lock (a fresh clone's).
RECORDED = Path(__file__).parent / "data" / "dvc_exp_show.json"


def _widest(text: str) -> int:
    return max((len(line) for line in text.splitlines()), default=0)


def test_rows_are_baseline_workspace_then_experiments_with_the_params_that_differ():
    rows = experiment_rows(json.loads(RECORDED.read_text(encoding="utf-8")))
    assert [row.name for row in rows] == ["baseline", "workspace", "peart-obit"]  # the commit has no figures
    table = format_table(rows)
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["experiment", "accuracy", "macro_f1", "val_loss"]
    assert re.match(r"baseline +0\.65 +0\.6011 +4\.848 .*finetune\.method=full$", lines[1]), table
    assert re.match(r"workspace +0\.5 +0\.3333 +4\.848 .*finetune\.method=frozen$", lines[2]), table
    assert "majority" in lines[0] and "bag_of_words" in lines[0]  # they fit: the baselines are shown
    assert _widest(table) <= WIDTH, table


def test_many_differing_params_wrap_within_the_width():
    params = {f"finetune.knob_{i}": i for i in range(30)}
    rows = [Row("baseline", params, {"accuracy": 0.5, "baselines.majority_accuracy": 0.25}),
            Row("workspace", {key: value + 1 for key, value in params.items()}, {"accuracy": 0.75})]
    table = format_table(rows, WIDTH)
    assert _widest(table) <= WIDTH, table
    assert all(f"finetune.knob_{i}={i + 1}" in table for i in range(30)), table


def test_nothing_to_compare_is_one_clear_error(tmp_path):
    root = make_repo(tmp_path / "repo", n_docs=5)  # no pipeline run: no figures anywhere
    result = run(["python", "-m", "lmforge.evaluate.compare"], root, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().startswith("[compare] error: nothing to compare") and "make run" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def compared(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny pipeline (`make run`: the baseline saved) and one experiment that reruns
    promote alone (the cheapest real one)."""
    root = copy_repo(tiny_repo, tmp_path_factory.mktemp("compared") / "repo")
    run(["dvc", "exp", "run", "-n", "stricter", "-S", "promote.min_delta=0.02"], root)
    return root


def test_make_compare_shows_the_saved_baseline_beside_an_experiment(compared):
    table = run(["python", "-m", "lmforge.evaluate.compare"], compared).stdout
    rows = [line.split()[0] for line in table.splitlines()[1:4]]
    assert rows == ["baseline", "workspace", "stricter"], table
    assert table.splitlines()[1].endswith("promote.min_delta=0.01"), table
    assert table.splitlines()[3].endswith("promote.min_delta=0.02"), table
    assert _widest(table) <= WIDTH, table


# The commands that show results: each one the README and the docs give in a shell block must fit a
# terminal (or write to a file and print where).
VIEWING = ("dvc metrics", "dvc params", "dvc exp show", "dvc plots", "dvc exp list", "make compare",
           "python -m lmforge.evaluate.compare")
BLOCK = re.compile(r"^```(?:bash|sh)[^\n]*\n(.*?)^```", re.M | re.S)


def documented_viewing_commands() -> list[tuple[str, str]]:
    """(page, command) for every viewing command in a shell block of the README and the docs pages."""
    found = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]:
        for block in BLOCK.findall(page.read_text(encoding="utf-8")):
            for command in block.replace("\\\n", " ").splitlines():
                command = re.sub(r"\s+#.*$", "", command).strip()
                if command.startswith(VIEWING):
                    found.append((str(page.relative_to(REPO)), command))
    return found


def test_documented_viewing_commands_fit_120_columns(compared):
    commands = documented_viewing_commands()
    assert any(page == "README.md" for page, _ in commands), "the README gives no viewing command"
    assert "$(BIN)/python -m lmforge.evaluate.compare" in (REPO / "Makefile").read_text()  # make compare's recipe
    pages: dict[str, list[str]] = {}  # each command run once, however many pages give it
    for page, command in commands:
        pages.setdefault(command.replace("make compare", "python -m lmforge.evaluate.compare"), []).append(page)  # the recipe
    too_wide = []
    for command, given in pages.items():
        page = ", ".join(sorted(set(given)))
        result = subprocess.run(["bash", "-c", command], cwd=compared, env=tool_env(), capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, f"{page}: `{command}` failed:\n{result.stdout}\n{result.stderr}"
        if _widest(result.stdout + result.stderr) > WIDTH:
            too_wide.append(f"{page}: `{command}`: {_widest(result.stdout + result.stderr)} characters wide, "
                            f"{len(result.stdout)} bytes")
    assert not too_wide, "\n".join(too_wide)
