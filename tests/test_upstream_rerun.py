"""An upstream param changes, `dvc repro` reruns the stages below it, then the param goes back and
`dvc repro` restores them from DVC's run cache: each run names the bytes it read, and the promotion
report always describes what the registry holds. Real DVC and MLflow on a copy of `tiny_repo`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml
from mlflow.tracking import MlflowClient

from lmforge.core import paths
from lmforge.core.digests import content_hash
from lmforge.track.promotion import DECISION_TAG, aliases

from conftest import LIGHT_EVALUATE, copy_repo, registered_versions, run, write_params

INPUT_TAG = "lmforge.input."
CHANGED = {"finetune": {"method": "frozen"}}  # the tiny params train all weights: finetune and after rerun


class Rerun(NamedTuple):
    root: Path
    runs: list  # the MLflow runs the rerun made
    outs: dict[str, str]  # path -> md5 of every output in dvc.lock after the rerun
    before: dict[str, str]  # the same before it
    on_disk: dict[str, str]  # path -> content_hash after the rerun, for every input the runs tagged
    versions: tuple[list[int], list[int]]  # the registered fine-tuned model's versions before and after it
    promotion: dict  # reports/promotion.json after it
    champion: str  # the champion alias after it


def _client(root: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{root}/mlflow.db")


def _runs(root: Path) -> list:
    client = _client(root)
    return client.search_runs([client.get_experiment_by_name("lmforge").experiment_id], max_results=1000)


def _lock_outs(root: Path) -> dict[str, str]:
    lock = yaml.safe_load((root / "dvc.lock").read_text(encoding="utf-8"))
    return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])}


@pytest.fixture(scope="module")
def rerun(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Rerun:
    """A private copy of `tiny_repo` where finetune's params changed and `dvc repro` ran again (evaluate
    without its harness and from-scratch fine-tune, which no test here reads)."""
    root = tmp_path_factory.mktemp("rerun") / "repo"
    copy_repo(tiny_repo, root)  # its store made its own: MLflow's artifact paths are absolute
    before_ids = {r.info.run_id for r in _runs(root)}
    before, versions = _lock_outs(root), registered_versions(root)
    write_params(root, **CHANGED, evaluate=LIGHT_EVALUATE)  # evaluate reruns light: no test reads harness/scratch
    run(["dvc", "repro"], root)
    runs = [r for r in _runs(root) if r.info.run_id not in before_ids]
    tagged = {key[len(INPUT_TAG):] for r in runs for key in r.data.tags if key.startswith(INPUT_TAG)}
    return Rerun(root, runs, _lock_outs(root), before, {path: content_hash(root / path) for path in tagged},
                 (versions, registered_versions(root)), json.loads((root / paths.PROMOTION).read_text(encoding="utf-8")),
                 aliases(_client(root), paths.FINETUNED_MODEL)[paths.CHAMPION_ALIAS])


def test_a_retrained_model_is_registered_and_decided_against_the_champion(rerun):
    before, after = rerun.versions
    assert after == before + [before[-1] + 1]  # one new version: the retrained model
    numbers = rerun.promotion
    assert numbers["decided"] == 1 and numbers["champion_version"] == before[-1]
    assert numbers["challenger_version"] == after[-1]
    assert rerun.champion == str(numbers["challenger_version"] if numbers["promoted"] else numbers["champion_version"])


def test_runs_after_an_upstream_rerun_name_the_inputs_they_read(rerun):
    stages = {r.data.tags["lmforge.stage"] for r in rerun.runs}
    assert {"finetune", "evaluate", "promote"} <= stages
    for path in ("models/finetune", "reports/metrics.json"):
        assert rerun.outs[path] != rerun.before[path]  # the rerun made new ones
    for r in rerun.runs:
        inputs = {key[len(INPUT_TAG):]: md5 for key, md5 in r.data.tags.items() if key.startswith(INPUT_TAG)}
        for path, md5 in inputs.items():
            stage = r.data.tags["lmforge.stage"]
            assert md5 == rerun.on_disk[path], (stage, path)  # the bytes the stage read
            if path in rerun.outs:  # and the producing stage's output as dvc.lock records it
                assert md5 == rerun.outs[path], (stage, path)
    (promote,) = [r for r in rerun.runs if r.data.tags["lmforge.stage"] == "promote"]
    assert promote.data.tags[f"{INPUT_TAG}reports/metrics.json"] == rerun.outs["reports/metrics.json"]


def test_after_a_revert_from_the_run_cache_the_decision_file_is_the_registrys(rerun):
    """Params back as they were: DVC restores finetune and evaluate from its run cache, and promote runs
    anyway (it changes the registry), so its report is the decision the registry now reflects."""
    root = rerun.root
    before_ids = {r.info.run_id for r in _runs(root)}
    write_params(root)  # the tiny params again, byte for byte
    output = run(["dvc", "repro"], root).stdout
    assert "Stage 'finetune' is cached - skipping run" in output  # restored, not retrained
    decision = json.loads((root / paths.PROMOTION_DECISION).read_text(encoding="utf-8"))
    assert decision["decided"] and decision["run_id"] not in before_ids  # promote ran now
    client = _client(root)
    challenger = decision["challenger"]["version"]
    recorded = json.loads(client.get_model_version(paths.FINETUNED_MODEL, challenger).tags[DECISION_TAG])
    if decision["reason"].endswith("is already the champion"):  # nothing compared: its tag keeps why it won
        assert recorded["run_id"] in before_ids and recorded != decision
    else:
        assert recorded == decision  # the registry records the very decision the file reports
    champion = aliases(client, paths.FINETUNED_MODEL)[paths.CHAMPION_ALIAS]
    stays = decision["champion"]["version"] if decision["champion"] and not decision["promoted"] else challenger
    assert champion == stays
    numbers = json.loads((root / paths.PROMOTION).read_text(encoding="utf-8"))
    assert numbers["challenger_version"] == int(challenger) and numbers["promoted"] == int(decision["promoted"])
