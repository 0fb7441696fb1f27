"""The baseline, the workspace and each DVC experiment side by side, one row each: the headline test
figures and the params that differ between the rows, read from `dvc exp show --json`, within a
terminal's width (a bare `dvc exp show` lists every param, metric and dependency hash).

`python -m lmforge.evaluate.compare` (`make compare`) prints the table. `make run` saves the default
run as the experiment `baseline` (`dvc exp save -n baseline`), so it is there to compare with;
`dvc exp apply <row>` brings a row's params, dvc.lock and outputs back into the workspace.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge import quiet_env

from lmforge.core import paths
from lmforge.core.errors import LmforgeError
from lmforge.core.numbers import human
from lmforge.core.params import flatten
from lmforge.core.stage import run_stage

BASELINE = "baseline"  # the experiment `make run` saves
WORKSPACE = "workspace"
WIDTH = 120
EVALUATE_METRICS = (paths.REPORTS / "metrics.json").as_posix()
# (column, key in reports/metrics.json): the model's test figures (a task writes some of them) ...
HEADLINE = (("accuracy", "accuracy"), ("macro_f1", "macro_f1"), ("sft_token_f1", "sft_token_f1"),
            ("sft_rouge_l", "sft_rouge_l"), ("val_loss", "val_loss"))
# ... and what they are measured against, shown when the table still fits the width.
BASELINES = (("scratch", "baselines.scratch_accuracy"), ("majority", "baselines.majority_accuracy"),
             ("bag_of_words", "baselines.bag_of_words_accuracy"), ("unigram", "baselines.unigram_entropy"))
BASELINES_NOTE = ("scratch: the same fine-tune from random weights (evaluate.scratch_baseline), majority, "
                  "bag_of_words: their test accuracy; unigram: the val_loss of predicting each token's frequency")
GAP = "  "
MIN_PARAMS_WIDTH = 24  # narrower than this, the baseline columns give way to the params


@dataclass(frozen=True)
class Row:
    """One experiment: its name, params.yaml flattened (`section.key`) and evaluate's figures."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, float] = field(default_factory=dict)


def _row(state: dict[str, Any], name: str) -> Row:
    """A Row from one `dvc exp show --json` entry; a file DVC could not read leaves its part empty."""
    data = state.get("data") or {}
    params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
    metrics = ((data.get("metrics") or {}).get(EVALUATE_METRICS) or {}).get("data") or {}
    if state.get("error"):
        name += " (failed)"
    return Row(name, flatten(params), flatten(metrics))


def experiment_rows(shown: list[dict[str, Any]]) -> list[Row]:
    """The rows of `dvc exp show --json`: the experiment `baseline`, the workspace, the commit when it
    has figures of its own (a clone's commit has no dvc.lock: its figures are nowhere), then every
    other experiment of that commit, newest first (DVC's order)."""
    baseline, rows, experiments = [], [], []
    for state in shown:
        if state.get("rev") == WORKSPACE:
            rows.append(_row(state, WORKSPACE))
            continue
        commit = _row(state, state.get("name") or state["rev"][:7])
        if commit.figures:
            rows.append(commit)
        for exp_range in state.get("experiments") or []:
            for exp in exp_range.get("revs") or []:
                row = _row(exp, exp_range.get("name") or exp.get("name") or exp["rev"][:7])
                (baseline if row.name == BASELINE else experiments).append(row)
    return baseline + rows + experiments


def differing_params(rows: list[Row]) -> list[str]:
    """The param keys whose value is not the same in every row (params.yaml's order)."""
    keys = list(dict.fromkeys(key for row in rows for key in row.params))
    missing = object()
    return [key for key in keys if len({json.dumps(row.params.get(key, missing), default=str) for row in rows}) > 1]


def _value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _column(rows: list[Row], label: str, key: str) -> list[str]:
    return [label] + [human(row.figures[key]) if key in row.figures else "-" for row in rows]


def format_table(rows: list[Row], width: int = WIDTH) -> str:
    """The rows as an aligned text table no wider than `width`: the name, the headline figures any
    row has, the baselines when they fit, and each row's values of the params that differ (wrapped
    onto more lines rather than past the width)."""
    names = ["experiment"] + [row.name for row in rows]
    figures = [_column(rows, label, key) for label, key in HEADLINE if any(key in row.figures for row in rows)]
    baselines = [_column(rows, label, key) for label, key in BASELINES if any(key in row.figures for row in rows)]
    changed = differing_params(rows)
    params = [", ".join(f"{key}={_value(row.params[key])}" for key in changed if key in row.params) for row in rows]

    def fixed(columns: list[list[str]]) -> list[str]:
        """Each line of the name and number columns, padded to the same width."""
        name_width = max(map(len, names))
        widths = [max(map(len, column)) for column in columns]
        return [GAP.join([names[i].ljust(name_width)] + [c[i].rjust(w) for c, w in zip(columns, widths)])
                for i in range(len(names))]

    lines = fixed(figures + baselines)
    if changed and width - len(lines[0]) - len(GAP) < MIN_PARAMS_WIDTH:
        baselines = []
        lines = fixed(figures)
    if not changed:
        table = [line.rstrip() for line in lines]
    else:
        room = max(width - len(lines[0]) - len(GAP), MIN_PARAMS_WIDTH)
        indent = " " * (len(lines[0]) + len(GAP))
        table = []
        for line, text in zip(lines, ["params that differ"] + params):
            wrapped = textwrap.wrap(text, room, break_long_words=True, break_on_hyphens=False) or [""]
            table.append((line + GAP + wrapped[0]).rstrip())
            table += [indent + more for more in wrapped[1:]]
    notes = [BASELINES_NOTE] if baselines else []
    notes.append("A row's params and outputs back in the workspace: dvc exp apply <experiment>")
    return "\n".join(table + [""] + [textwrap.fill(note, width) for note in notes])


def dvc_experiments(root: str | Path = ".") -> list[dict[str, Any]]:
    """`dvc exp show --json` in `root`: the workspace, the commit and the commit's experiments."""
    result = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=root,
                            env=quiet_env(dict(os.environ)), capture_output=True, text=True)
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError:
        raise LmforgeError(f"`dvc exp show --json` in {Path(root).resolve()} failed ({result.returncode}): "
                           f"{(result.stderr or result.stdout).strip()}") from None


def compare(root: str | Path = ".", width: int = WIDTH) -> str:
    """The table for `root`'s baseline, workspace and experiments."""
    rows = experiment_rows(dvc_experiments(root))
    if not any(row.figures for row in rows):
        raise LmforgeError(f"nothing to compare in {Path(root).resolve()}: no row has {EVALUATE_METRICS} "
                           "(run the pipeline first: `make run`)")
    return format_table(rows, width)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lmforge.evaluate.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=WIDTH, help="characters per line at most (default %(default)s)")
    args = parser.parse_args(argv)
    print(compare(".", args.width))


if __name__ == "__main__":
    run_stage("compare", main)
