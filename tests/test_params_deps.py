"""dvc.yaml's `params:` of each stage are exactly the params it reads, so DVC reruns a stage when a
knob it uses changes and never for one it ignores. The reads are recorded, not guessed: the tiny
pipeline's `dvc repro` (the `tiny_repo` fixture) runs with LMFORGE_PARAMS_TRACE set, and every stage
process appends the dotted keys it read (lmforge.core.params.write_trace). This test fails naming the
lines to add to or remove from dvc.yaml."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from conftest import PARAMS_TRACE, REPO

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
# Sections no stage lists, by design: how stages run (`runtime`), and where the data stages compute (`engine`).
UNTRACKED = ("runtime", "engine")
# Keys a stage reads only on a branch the tiny pipeline (task classify, method full, no champion yet)
# does not take: declared, but absent from its trace. Each with the branch that reads it.
OTHER_BRANCHES = {
    ("promote", "evaluate.sft_max_examples"): "finetune.task sft",
    ("promote", "evaluate.sft_max_new_tokens"): "finetune.task sft",
    ("promote", "generate.seed"): "finetune.task sft",
}


def declared(stage: str) -> list[str]:
    """The stage's `params:` entries from params.yaml (whole sections, `clean`, or keys, `data.val_fraction`)
    and the keys its paths interpolate (`${finetune.train_file}`: a new value is a new dep, so DVC reruns)."""
    spec = STAGES[stage]
    entries: list[str] = []
    for entry in spec.get("params", []):
        entries.extend([entry] if isinstance(entry, str) else [key for keys in entry.values() for key in keys])
    paths = [spec["cmd"], *spec.get("deps", []), *(str(out) for out in spec.get("outs", []))]
    return entries + sorted({key for path in paths for key in re.findall(r"\$\{([\w.]+)\}", path)})


def covers(entry: str, key: str) -> bool:
    return key == entry or key.startswith(f"{entry}.")


@pytest.fixture(scope="module")
def reads(tiny_repo: Path) -> dict[str, set[str]]:
    """stage -> the params keys its processes read during tiny_repo's `dvc repro`."""
    found: dict[str, set[str]] = {}
    for line in (tiny_repo / PARAMS_TRACE).read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        found.setdefault(record["stage"], set()).update(record["keys"])
    return found


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_dvc_yaml_declares_exactly_the_params_the_stage_reads(stage, reads):
    assert stage in reads, f"stage {stage} recorded no params reads (does its module end in run_stage({stage!r}, ...)?)"
    used = {key for key in reads[stage] if not key.startswith(tuple(f"{s}." for s in UNTRACKED))}
    entries = declared(stage)
    missing = sorted(key for key in used if not any(covers(entry, key) for entry in entries))
    unread = sorted(entry for entry in entries
                    if not any(covers(entry, key) for key in used) and (stage, entry) not in OTHER_BRANCHES)
    problems = []
    if missing:
        problems.append(f"dvc.yaml stage {stage} reads params it does not declare: add under its `params:`\n"
                        + "\n".join(f"      - {key}" for key in missing))
    if unread:
        problems.append(f"dvc.yaml stage {stage} declares params it never reads: remove from its `params:`\n"
                        + "\n".join(f"      - {entry}" for entry in unread))
    assert not problems, "\n".join(problems)


def test_no_stage_declares_a_section_that_changes_nothing_it_computes():
    listed = {entry.split(".")[0] for stage in STAGES for entry in declared(stage)}
    assert not listed & set(UNTRACKED), f"dvc.yaml tracks {sorted(listed & set(UNTRACKED))}: run-time knobs rerun nothing"


def test_every_other_branch_exemption_is_declared_and_unread_here(reads):
    """The exemptions above stay true: each names a line dvc.yaml has and the tiny pipeline does not read."""
    for (stage, key), branch in OTHER_BRANCHES.items():
        assert key in declared(stage), f"{stage} no longer declares {key}: drop it from OTHER_BRANCHES"
        assert key not in reads[stage], f"{stage} reads {key} on the tiny pipeline: drop it from OTHER_BRANCHES ({branch})"
