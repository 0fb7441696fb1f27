"""Champion and challenger on a real MLflow registry (SQLite store in a temp dir, no mocks): the
decision, the aliases and tags it leaves, rollback through the flow's CLI, the promote stage without
tracking, re-scoring a registered champion, and the pipeline end to end (`dvc repro` through promote)."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from lmforge.core import paths
from lmforge.core.errors import LmforgeError
from lmforge.track.store import LOGGING_FAILED_MARKER
from lmforge.core.paths import WEIGHTS_TAG
from lmforge.track.promotion import (
    DECISION_TAG, PREVIOUS_CHAMPION_TAG, RESTORED_TAG, ROLLED_BACK_TAG, TEST_SET_TAG, aliases, decide, promote,
    rollback,
)

from conftest import REPO, registered_versions, run, tool_env, write_params

NAME = paths.FINETUNED_MODEL
KNOBS = {"task": "classify"}


# ------------------------------------------------------------------------------------ the decision


def test_the_first_model_wins_without_a_champion():
    assert decide("macro_f1", 0.4, None, 0.01)[0] is True


def test_a_gain_of_exactly_min_delta_promotes_despite_float_rounding():
    promoted, delta, _ = decide("accuracy", 0.30, 0.29, 0.01)  # 0.30 - 0.29 is 0.00999...98 in floats
    assert promoted and delta == pytest.approx(0.01)


def test_a_smaller_gain_or_a_loss_keeps_the_champion_and_says_why():
    promoted, delta, reason = decide("macro_f1", 0.805, 0.80, 0.01)
    assert not promoted and delta == pytest.approx(0.005)
    assert reason.startswith("champion stays") and "min_delta 0.01" in reason
    assert decide("macro_f1", 0.7, 0.8, 0.0)[0] is False


def test_loss_like_metrics_improve_downwards():
    promoted, delta, _ = decide("sft_loss", 1.5, 2.0, 0.1)
    assert promoted and delta == 0.5
    assert decide("sft_perplexity", 9.0, 8.0, 0.0)[0] is False


# ------------------------------------------------------------------------------------ the registry


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite store holding lmforge-finetune and no version (made once: creating the schema takes seconds)."""
    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").create_registered_model(NAME)
    return db


@pytest.fixture
def client(empty_store: Path, tmp_path: Path) -> MlflowClient:
    """A real registry of this test's own, with versions made by `new_version`."""
    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    return MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")


def new_version(client: MlflowClient, tmp_path: Path, lineage: str, weights: str | None = None) -> str:
    """A registered version (its files a stand-in: these tests give scores, not models), with the
    md5 of its weights (`WEIGHTS_TAG`, as training registers it): its lineage unless given."""
    source = tmp_path / f"model-{lineage}"
    source.mkdir(exist_ok=True)
    version = client.create_model_version(NAME, source.as_uri()).version
    client.set_model_version_tag(NAME, version, "lineage.data.raw", lineage)
    client.set_model_version_tag(NAME, version, WEIGHTS_TAG, weights or f"md5-{lineage}")
    return str(version)


def promote_with(client: MlflowClient, version: str, score: float, champion_scores: dict[str, float],
                 test_set: str = "t1", min_delta: float = 0.01):
    """promote() whose re-scoring looks scores up (and counts the calls)."""
    rescored: list[str] = []

    def rescore(v: str) -> float:
        rescored.append(v)
        return champion_scores[v]

    decision = promote(client, NAME, version, score, "macro_f1", min_delta, test_set, KNOBS, rescore, run_id="r")
    return decision, rescored


def test_first_model_becomes_champion(client, tmp_path):
    v1 = new_version(client, tmp_path, "raw-1")
    decision, rescored = promote_with(client, v1, 0.6, {})
    assert decision.decided and decision.promoted and rescored == []
    assert aliases(client, NAME)[paths.CHAMPION_ALIAS] == v1
    tags = client.get_model_version(NAME, v1).tags
    assert tags["promote.score.macro_f1"] == "0.6" and tags[TEST_SET_TAG] == "t1"
    assert PREVIOUS_CHAMPION_TAG not in tags
    assert decision.numbers() == {"decided": 1, "promoted": 1, "challenger_score": 0.6, "min_delta": 0.01,
                                  "challenger_version": int(v1)}


def test_worse_challenger_keeps_the_champion_and_both_versions_record_why(client, tmp_path):
    v1, v2 = new_version(client, tmp_path, "raw-1"), new_version(client, tmp_path, "raw-2")
    promote_with(client, v1, 0.6, {})
    decision, rescored = promote_with(client, v2, 0.55, {})
    assert decision.decided and not decision.promoted
    assert rescored == []  # the champion's score on the same test set was recorded: reused
    assert aliases(client, NAME) == {paths.CHAMPION_ALIAS: v1, paths.CHALLENGER_ALIAS: v2}
    for version in (v1, v2):
        record = json.loads(client.get_model_version(NAME, version).tags[DECISION_TAG])
        assert record["reason"].startswith("champion stays: macro_f1 0.55 vs champion's 0.6")
        assert record["champion"]["score"] == 0.6 and record["challenger"]["score"] == 0.55
        assert record["delta"] == pytest.approx(-0.05) and record["test_set_md5"] == "t1"
        assert record["champion"]["lineage"]["data.raw"] == "raw-1"
        assert record["challenger"]["lineage"]["data.raw"] == "raw-2"


def test_better_challenger_replaces_the_champion_rescored_on_a_new_test_set(client, tmp_path):
    v1, v2 = new_version(client, tmp_path, "raw-1"), new_version(client, tmp_path, "raw-2")
    promote_with(client, v1, 0.6, {})
    decision, rescored = promote_with(client, v2, 0.7, {v1: 0.62}, test_set="t2")
    assert rescored == [v1]  # another test set: the champion is scored again, its old figure is not used
    assert decision.promoted and decision.champion.score == 0.62 and decision.delta == pytest.approx(0.08)
    assert aliases(client, NAME)[paths.CHAMPION_ALIAS] == v2
    assert client.get_model_version(NAME, v2).tags[PREVIOUS_CHAMPION_TAG] == v1
    assert client.get_model_version(NAME, v1).tags[TEST_SET_TAG] == "t2"  # its new score is recorded


def test_a_champion_that_cannot_be_scored_is_replaced_with_the_reason(client, tmp_path):
    v1, v2 = new_version(client, tmp_path, "raw-1"), new_version(client, tmp_path, "raw-2")
    promote_with(client, v1, 0.6, {})

    def cannot(version: str) -> float:
        raise LmforgeError("labels differ")

    decision = promote(client, NAME, v2, 0.5, "macro_f1", 0.01, "t2", KNOBS, cannot)
    assert decision.promoted and "cannot be scored on this test set: labels differ" in decision.reason


def test_the_champion_itself_as_challenger_changes_nothing(client, tmp_path):
    """promote runs on every `dvc repro`: re-running it on the champion keeps the record of why it won."""
    v1 = new_version(client, tmp_path, "raw-1")
    promote_with(client, v1, 0.6, {})
    tags = client.get_model_version(NAME, v1).tags
    decision, _ = promote_with(client, v1, 0.6, {})
    assert decision.decided and not decision.promoted and "already the champion" in decision.reason
    assert aliases(client, NAME) == {paths.CHAMPION_ALIAS: v1}
    assert client.get_model_version(NAME, v1).tags == tags


def test_a_stored_score_that_is_not_a_finite_number_is_not_reused(client, tmp_path):
    v1, v2 = new_version(client, tmp_path, "raw-1"), new_version(client, tmp_path, "raw-2")
    promote_with(client, v1, 0.6, {})
    client.set_model_version_tag(NAME, v1, "promote.score.macro_f1", "nan")  # as a NaN challenger left it
    decision, rescored = promote_with(client, v2, 0.7, {v1: 0.62})
    assert rescored == [v1] and decision.champion.score == 0.62 and decision.promoted


def test_a_champion_registered_without_exported_files_is_kept_undecided(client, tmp_path):
    """Registered by an older lmforge: nothing can say the challenger is better, so a person must."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from lmforge.track.promotion import exported_files

    v1, v2 = new_version(client, tmp_path, "raw-1"), new_version(client, tmp_path, "raw-2")
    (tmp_path / "model-raw-1" / "MLmodel").write_text("flavors: {}\n")  # a model, without extra_files/
    promote_with(client, v1, 0.9, {})
    with _use_tracking_uri(client.tracking_uri):
        decision = promote(client, NAME, v2, 0.3, "macro_f1", 0.01, "t2", KNOBS,
                           lambda v: exported_files(NAME, v, tmp_path / "download"))
    assert not decision.decided and not decision.promoted
    assert "registered without its exported files" in decision.reason
    assert f"python -m flows.pipeline promote --version {v2}" in decision.reason
    assert aliases(client, NAME) == {paths.CHAMPION_ALIAS: v1}
    assert json.loads(client.get_model_version(NAME, v1).tags[DECISION_TAG])["decided"] is False


def _flow_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = tool_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db", USER="alice", LOGNAME="alice",
                   PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "flows.pipeline", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def _rollback_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return _flow_cli(tmp_path, "rollback", *args)


def test_rollback_restores_the_previous_champion_and_records_who_and_why(client, tmp_path):
    v1, v2 = new_version(client, tmp_path, "raw-1"), new_version(client, tmp_path, "raw-2")
    promote_with(client, v1, 0.6, {})
    promote_with(client, v2, 0.7, {})
    result = _rollback_cli(tmp_path, "--reason", "v2 mislabels refunds")
    assert result.returncode == 0, result.stderr
    assert f"moved from version {v2} back to version {v1}" in result.stdout
    assert aliases(client, NAME)[paths.CHAMPION_ALIAS] == v1
    left = json.loads(client.get_model_version(NAME, v2).tags[ROLLED_BACK_TAG])
    assert left["by"] == "alice" and left["reason"] == "v2 mislabels refunds" and left["to"] == v1
    assert json.loads(client.get_model_version(NAME, v1).tags[RESTORED_TAG])["from"] == v2
    with pytest.raises(LmforgeError, match=f"version {v1} was the first champion: there is no previous champion"):
        rollback(client, NAME, "alice", "again", "now")


def test_rollback_without_a_champion_is_a_clear_error_line(client, tmp_path):
    result = _rollback_cli(tmp_path)
    assert result.returncode == 2 and "has no `champion` alias: nothing to roll back" in result.stderr
    assert "Traceback" not in result.stderr


def _rolled_back(client: MlflowClient, tmp_path: Path) -> tuple[str, str]:
    """v1 champion, then v2, then v2 rolled back to v1: (v1, v2)."""
    v1, v2 = new_version(client, tmp_path, "raw-1"), new_version(client, tmp_path, "raw-2")
    promote_with(client, v1, 0.6, {})
    promote_with(client, v2, 0.7, {})
    rollback(client, NAME, "alice", "v2 mislabels refunds", "2026-01-02T03:04:05+00:00")
    return v1, v2


def test_a_rolled_back_version_is_never_promoted_again(client, tmp_path):
    v1, v2 = _rolled_back(client, tmp_path)
    decision, rescored = promote_with(client, v2, 0.9, {v1: 0.6})  # the next promote: still v2's weights
    assert decision.decided and not decision.promoted and rescored == []
    assert aliases(client, NAME) == {paths.CHAMPION_ALIAS: v1, paths.CHALLENGER_ALIAS: v2}
    assert decision.reason.startswith(f"v{v2} was rolled back (by alice at 2026-01-02T03:04:05+00:00: "
                                      "v2 mislabels refunds): stays challenger")
    assert f"python -m flows.pipeline promote --version {v2}" in decision.reason


def test_a_new_version_with_rolled_back_weights_stays_challenger(client, tmp_path):
    v1, v2 = _rolled_back(client, tmp_path)
    v3 = new_version(client, tmp_path, "raw-3", weights="md5-raw-2")  # `dvc repro -f`: the same weights again
    decision, _ = promote_with(client, v3, 0.9, {v1: 0.6})
    assert not decision.promoted
    assert aliases(client, NAME) == {paths.CHAMPION_ALIAS: v1, paths.CHALLENGER_ALIAS: v3}
    assert decision.reason.startswith(f"v{v3} has the weights of rolled-back v{v2} (by alice")
    assert json.loads(client.get_model_version(NAME, v3).tags[DECISION_TAG])["reason"] == decision.reason


def test_a_person_can_promote_rolled_back_weights_by_hand_which_lifts_the_block(client, tmp_path):
    v1, v2 = _rolled_back(client, tmp_path)
    v3 = new_version(client, tmp_path, "raw-3", weights="md5-raw-2")
    result = _flow_cli(tmp_path, "promote", "--version", v3, "--reason", "refunds fixed upstream")
    assert result.returncode == 0, result.stderr
    assert f"`champion` moved from version {v1} to version {v3} (refunds fixed upstream)" in result.stdout
    assert aliases(client, NAME)[paths.CHAMPION_ALIAS] == v3
    tags = client.get_model_version(NAME, v3).tags
    assert tags[PREVIOUS_CHAMPION_TAG] == v1  # rollback goes back from a hand-made champion too
    assert json.loads(tags["lmforge.promoted_by_hand"])["by"] == "alice"
    v4 = new_version(client, tmp_path, "raw-4", weights="md5-raw-2")
    decision, _ = promote_with(client, v4, 0.95, {v3: 0.7})  # compared like any other version again
    assert decision.promoted


def test_promoting_an_unknown_version_by_hand_is_a_clear_error(client, tmp_path):
    from lmforge.track.promotion import promote_by_hand

    with pytest.raises(LmforgeError, match=f"{NAME} has no version 9"):
        promote_by_hand(client, NAME, "9", "alice", "why", "now")
    assert aliases(client, NAME) == {}


# ------------------------------------------------------------------------------------- lineage


def test_a_dataset_source_is_its_object_in_the_default_dvc_remote(tmp_path):
    from lmforge.track.lineage import dataset_source, dvc_remote_url

    run(["dvc", "init", "--no-scm", "-q"], tmp_path)
    assert dvc_remote_url(tmp_path) is None
    assert dataset_source("data/shards", "ab12.dir", None, tmp_path) == (tmp_path / "data/shards").as_uri()
    run(["dvc", "remote", "add", "-d", "team", "s3://lmforge-bucket/dvc/"], tmp_path)
    remote = dvc_remote_url(tmp_path)
    assert remote == "s3://lmforge-bucket/dvc"
    # DVC 3's layout: files/md5/<first 2 hex>/<the rest>, `.dir` kept for a directory's listing
    assert dataset_source("data/shards", "ab12cd.dir", remote, tmp_path) == "s3://lmforge-bucket/dvc/files/md5/ab/12cd.dir"


# ------------------------------------------------------------------------- the stage, the pipeline


def _copy(tiny_repo: Path, tmp_path: Path) -> Path:
    """A private copy, checkpoints included (a missing persist output would rerun its stage)."""
    root = tmp_path / "repo"
    shutil.copytree(tiny_repo, root, symlinks=True)
    return root


def test_the_pipeline_makes_its_first_model_champion_with_its_lineage(tiny_repo):
    numbers = json.loads((tiny_repo / paths.PROMOTION).read_text())
    assert numbers["decided"] == 1 and numbers["promoted"] == 1
    assert all(isinstance(value, (int, float)) for value in numbers.values())  # a DVC metric: numbers only
    client = MlflowClient(f"sqlite:///{tiny_repo}/mlflow.db")
    champion = client.get_model_version_by_alias(NAME, paths.CHAMPION_ALIAS)
    assert int(champion.version) == numbers["challenger_version"]
    lock = (tiny_repo / "dvc.lock").read_text()
    for name in ("raw", "clean", "tokenizer", "shards"):
        assert champion.tags[f"lineage.data.{name}"] in lock  # DVC's own hash of that output
    assert champion.tags["lineage.git_commit"] not in ("", "unknown")
    run = client.get_run(champion.run_id)
    inputs = {d.dataset.name: d.dataset for d in run.inputs.dataset_inputs}
    assert inputs["shards"].digest == champion.tags["lineage.data.shards"]
    assert "data/shards" in inputs["shards"].source  # no DVC remote here: the workspace path
    decision = json.loads((tiny_repo / paths.PROMOTION_DECISION).read_text())
    assert decision["metric"] == "macro_f1" and decision["reason"] == "first model: it becomes champion"
    shown = run_dvc_metrics(tiny_repo)
    assert "reports/promotion.json" in shown


def run_dvc_metrics(root: Path) -> str:
    return run(["dvc", "metrics", "show", "--json"], root).stdout


def test_the_champion_rescored_from_the_registry_matches_evaluate(tiny_repo, monkeypatch):
    """Re-scoring downloads the version's exported files and scores them as evaluate did."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from lmforge.core.params import load_params
    from lmforge.track.scoring import score_version

    monkeypatch.chdir(tiny_repo)
    version = MlflowClient(f"sqlite:///{tiny_repo}/mlflow.db").get_model_version_by_alias(NAME, paths.CHAMPION_ALIAS)
    with _use_tracking_uri(f"sqlite:///{tiny_repo}/mlflow.db"):
        score = score_version(load_params(), "macro_f1", version.version)
    assert score == json.loads((tiny_repo / "reports/metrics.json").read_text())["macro_f1"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_promote_without_tracking_decides_nothing_and_does_not_fail(tiny_repo, tmp_path):
    root = _copy(tiny_repo, tmp_path)
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = run(["python", "-m", "stages.promote"], root, MLFLOW_TRACKING_URI=down)
    numbers = json.loads((root / paths.PROMOTION).read_text())
    assert numbers["decided"] == 0 and numbers["promoted"] == 0
    warnings = [line for line in result.stderr.splitlines() if line.startswith(LOGGING_FAILED_MARKER)]
    assert len(warnings) == 1 and down in warnings[0]  # once, naming the store
    assert "tracking is down" in json.loads((root / paths.PROMOTION_DECISION).read_text())["reason"]


def test_unreachable_champion_is_kept_and_stage_fails(tiny_repo, tmp_path):
    """The artifact store lost the champion's files (restarted empty, deleted) and the test set
    changed, so its stored score does not apply: nothing can be decided, and the stage says so."""
    from urllib.parse import urlparse

    root = _copy(tiny_repo, tmp_path)
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    challenger = client.get_model_version_by_alias(NAME, paths.CHAMPION_ALIAS)
    # A champion registered from its own copy of the model files (the fixture's stay untouched) ...
    files = tmp_path / "champion-artifacts"
    shutil.copytree(urlparse(client.get_model_version_download_uri(NAME, challenger.version)).path, files)
    champion = str(client.create_model_version(NAME, files.as_uri()).version)
    for key in (TEST_SET_TAG, "promote.scored_with"):
        client.set_model_version_tag(NAME, champion, key, challenger.tags[key])
    client.set_model_version_tag(NAME, champion, "promote.score.macro_f1", "1.0")
    client.set_registered_model_alias(NAME, paths.CHAMPION_ALIAS, champion)
    # ... whose files are then lost, while the test set changes
    shutil.rmtree(files)
    with (root / "data/labeled/test.jsonl").open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"id": "new", "text": "River stone light.", "label": "nature"}) + "\n")
    result = run(["python", "-m", "stages.promote"], root, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("[promote] error:")]
    assert len(errors) == 1 and files.as_uri() in errors[0] and "artifacts" in errors[0]
    assert "older lmforge" not in errors[0]
    assert aliases(client, NAME)[paths.CHAMPION_ALIAS] == champion
    record = json.loads((root / paths.PROMOTION_DECISION).read_text())
    assert record["decided"] is False and record["promoted"] is False and files.as_uri() in record["reason"]
    assert json.loads((root / paths.PROMOTION).read_text())["decided"] == 0


@pytest.mark.parametrize("metrics, problem", [
    ('{"macro_f1": NaN}', "NaN"),
    ('{"macro_f1": Infinity}', "Infinity"),
    ('{"macro_f1": null}', "null"),
    (None, "is missing"),
    ('{"macro_f1": 1.5}', "outside [0, 1]"),
], ids=["nan", "infinity", "null", "missing", "out-of-range"])
def test_a_bad_decision_metric_is_one_error_line_and_the_registry_is_untouched(client, tmp_path, monkeypatch,
                                                                              capsys, metrics, problem):
    from lmforge.core.stage import run_stage
    from stages.promote import main

    v1 = new_version(client, tmp_path, "raw-1")
    promote_with(client, v1, 0.6, {})
    before = client.get_model_version(NAME, v1).tags, aliases(client, NAME)
    write_params(tmp_path)
    if metrics is not None:
        (tmp_path / "reports").mkdir()
        (tmp_path / "reports/metrics.json").write_text(metrics)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", client.tracking_uri)
    with pytest.raises(SystemExit) as exited:
        run_stage("promote", main)
    assert exited.value.code == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("[promote] error: reports/metrics.json")
    assert "macro_f1" in errors[0] and problem in errors[0]
    assert (client.get_model_version(NAME, v1).tags, aliases(client, NAME)) == before
    assert not (tmp_path / paths.PROMOTION).exists()


def test_an_unchanged_pipeline_reruns_only_promote_and_registers_nothing(tiny_repo, tmp_path):
    """(A retrained model decided against the champion: tests/test_upstream_rerun.py.)"""
    root = _copy(tiny_repo, tmp_path)
    before = registered_versions(root)
    unchanged = run(["dvc", "repro"], root).stdout
    assert re.findall(r"Running stage '(\w+)'", unchanged) == ["promote"]  # always_changed: it reads the registry
    assert registered_versions(root) == before  # no new model version
    assert json.loads((root / paths.PROMOTION).read_text())["decided"] == 1


def test_the_flow_summary_shows_the_decision_in_one_line(client, tmp_path):
    from flows.summary import mlflow_links, promotion_line, summary_markdown

    v1, v2 = new_version(client, tmp_path, "raw-1"), new_version(client, tmp_path, "raw-2")
    promote_with(client, v1, 0.6, {})
    decision, _ = promote_with(client, v2, 0.9, {})
    ran = [{"stage": "promote", "status": "ran", "seconds": 1.0}]
    assert promotion_line(tmp_path, ran) is None  # no decision file yet
    (tmp_path / paths.PROMOTION_DECISION).parent.mkdir(parents=True)
    (tmp_path / paths.PROMOTION_DECISION).write_text(json.dumps(decision.record()))
    line = promotion_line(tmp_path, ran)
    assert line.startswith(f"v{v2} promoted to `champion`: challenger wins: macro_f1 0.9 vs champion's 0.6")
    links = mlflow_links("0123abcd", "7", "http://127.0.0.1:5000", tmp_path)
    assert f"**Promotion:** {line}" in summary_markdown([], {}, links, [], "succeeded", None, line)


def test_the_decision_states_the_aliases_as_they_are_after_it(client, tmp_path):
    v1, v2 = new_version(client, tmp_path, "raw-1"), new_version(client, tmp_path, "raw-2")
    client.set_registered_model_alias(NAME, paths.CANDIDATE_ALIAS, v1)
    promote_with(client, v1, 0.6, {})
    client.set_registered_model_alias(NAME, paths.CANDIDATE_ALIAS, v2)  # evaluate scored v2
    decision, _ = promote_with(client, v2, 0.55, {})
    assert decision.aliases == aliases(client, NAME) == {"champion": v1, "challenger": v2, "candidate": v2}
    assert decision.line().endswith(f"(aliases now: champion → v{v1}, challenger → v{v2}, candidate → v{v2})")
    assert decision.record()["at"]  # when, for a reader of reports/promotion_decision.json later


def test_a_flow_where_promote_did_not_run_says_the_decision_is_an_earlier_runs(client, tmp_path):
    from flows.summary import promotion_line

    decision, _ = promote_with(client, new_version(client, tmp_path, "raw-1"), 0.6, {})
    (tmp_path / paths.PROMOTION_DECISION).parent.mkdir(parents=True)
    (tmp_path / paths.PROMOTION_DECISION).write_text(json.dumps(decision.record()))
    cached = [{"stage": name, "status": "skipped (cache hit)", "seconds": 0.1} for name in ("evaluate", "promote")]
    line = promotion_line(tmp_path, cached)
    assert line.startswith(f"not decided in this flow; an earlier run's (promote run `r`, at {decision.at}): ")
    assert line.endswith(decision.line())


def test_a_training_run_logs_system_metrics(tmp_path, monkeypatch):
    """What training_run asks of stage_run (MLflow samples every 10 s by default; faster here)."""
    import time

    from lmforge.track.runs import stage_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    client, sampled = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db"), {"system/cpu_utilization_percentage",
                                                                         "system/system_memory_usage_megabytes"}
    with stage_run("pretrain", {}, inputs=[], root=tmp_path, system_metrics=True) as handle:
        deadline = time.monotonic() + 60  # open until the first samples are in the store, not a fixed while
        while not sampled <= set(client.get_run(handle.run_id).data.metrics) and time.monotonic() < deadline:
            time.sleep(0.1)
    assert sampled <= set(client.get_run(handle.run_id).data.metrics)
