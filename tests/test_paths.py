"""Each stage path is declared once, in lmforge.core.paths; dvc.yaml restates them for DVC and must agree."""

from __future__ import annotations

from pathlib import Path

import yaml

from lmforge.core import paths

from conftest import REPO

DECLARED = {value.as_posix() for value in vars(paths).values() if isinstance(value, Path)}


def _entries(items) -> list[str]:
    return [next(iter(item)) if isinstance(item, dict) else item for item in items or []]


def test_every_data_path_in_dvc_yaml_is_one_lmforge_paths_declares():
    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))
    stages = dvc_yaml["stages"]
    used = set(_entries(dvc_yaml.get("metrics")))  # top-level: files inside a stage's directory out
    for stage in stages.values():
        for key in ("outs", "metrics", "plots", "deps"):
            used.update(p for p in _entries(stage.get(key)) if not p.endswith(".py") and "${" not in p)
    stray = sorted(p for p in used if not any(p == d or p.startswith(d + "/") for d in DECLARED))
    assert not stray, f"dvc.yaml names paths lmforge/core/paths.py does not declare: {stray}"


def test_no_stage_module_declares_a_path_of_its_own():
    for module in (REPO / "stages").glob("*.py"):
        text = module.read_text(encoding="utf-8")
        assert 'Path("data/' not in text and 'Path("models/' not in text and 'Path("reports' not in text, module


def test_the_promote_stage_writes_the_files_lmforge_paths_names():
    promote = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]["promote"]
    assert _entries(promote["metrics"]) == [paths.PROMOTION.as_posix()]
    assert _entries(promote["outs"]) == [paths.PROMOTION_DECISION.as_posix()]
