"""MLflow as a person sees it after the tiny pipeline (tiny_repo, read only): every link opens the
runs view, runs are told apart by name, scoring runs carry the params of the model they score, the
report logged to MLflow shows its figures, and the report states no alias as a current fact."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import REPRO_LOG
from lmforge.track.ui import RUNS_VIEW, changed_params, run_name, ui_page

# A link into MLflow's UI: absolute, or UI-relative (a run description's).
UI_LINK = re.compile(r"(?:https?://[^\s)\]>`'\"]*)?#/experiments/[^\s)\]>`'\"]*")
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")


def _client(repo: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{repo}/mlflow.db")


def _runs(repo: Path) -> dict[str, object]:
    """stage -> its one run in tiny_repo's store."""
    client = _client(repo)
    experiment = client.get_experiment_by_name("lmforge")
    return {run.data.tags["lmforge.stage"]: run for run in client.search_runs([experiment.experiment_id])}


# The stages whose runs the tracking agent writes once they end (lmforge.track.deferred).
DEFERRED = {"ingest", "clean", "tokenize", "finetune_data"}
LIVE = {"pretrain", "finetune"}


def _logged_report(repo: Path, run_id: str, tmp_path: Path) -> str:
    return Path(_client(repo).download_artifacts(run_id, "reports/report.md", str(tmp_path))).read_text()


def test_every_link_the_pipeline_prints_or_writes_opens_the_runs_view(tiny_repo, tmp_path):
    from flows.summary import mlflow_run_links, parent_description, read_metrics, summary_markdown

    runs = _runs(tiny_repo)
    experiment_id = runs["evaluate"].info.experiment_id
    log = (tiny_repo / REPRO_LOG).read_text()
    metrics = read_metrics(tiny_repo, {"evaluate": ["reports/metrics.json"]})
    links = mlflow_run_links("0123abcd", experiment_id, tiny_repo)
    texts = {
        "dvc repro's output": log,
        "report.md": (tiny_repo / "reports/report.md").read_text(),
        "report.md in MLflow": _logged_report(tiny_repo, runs["evaluate"].info.run_id, tmp_path),
        "flow summary": summary_markdown([], metrics, links, [], "succeeded", None),
        "parent run description": parent_description(list(runs), [], {s: r.info.run_id for s, r in runs.items()},
                                                     metrics, experiment_id, "succeeded"),
        **{f"{stage} run description": run.data.tags.get("mlflow.note.content", "") for stage, run in runs.items()},
    }
    found = {where: UI_LINK.findall(text) for where, text in texts.items()}
    assert found["flow summary"] and found["parent run description"]
    wrong = {where: [link for link in found_links if RUNS_VIEW not in link] for where, found_links in found.items()}
    assert not any(wrong.values()), wrong
    for stage, run in runs.items():  # each stage prints its own run's page, not only the table's
        if stage in DEFERRED:  # written by the tracking agent after the stage: the flow's summary links it
            assert f"[{stage}] INFO MLflow run {run.info.run_name}: written by the workspace's tracking agent" in log
        elif stage in LIVE:  # written by the agent while it trains: linked once the agent opened it
            assert (ui_page(experiment_id, run.info.run_id) in log or
                    f"[{stage}] INFO MLflow run {run.info.run_name}: written by the workspace's tracking agent (" in log)
        else:
            assert ui_page(experiment_id, run.info.run_id) in log, f"{stage} printed no link to its run"


def test_runs_are_named_by_stage_and_the_model_they_concern(tiny_repo):
    names = {stage: run.info.run_name for stage, run in _runs(tiny_repo).items()}
    assert names["pretrain"] == "pretrain · preset=tiny"
    for stage in ("finetune", "evaluate", "promote"):
        assert names[stage] == f"{stage} · method=full"
    assert names["ingest"] == "ingest"  # nothing changed since the commit: the stage alone


def test_scoring_runs_log_the_params_that_define_the_model_they_score(tiny_repo):
    params = yaml.safe_load((tiny_repo / "params.yaml").read_text())
    runs = _runs(tiny_repo)
    for stage in ("evaluate", "promote"):
        logged = runs[stage].data.params
        assert logged["finetune.method"] == params["finetune"]["method"] == runs["finetune"].data.params["finetune.method"]
        assert logged["finetune.task"] == params["finetune"]["task"]
        assert logged["model.preset"] == params["model"]["preset"] == runs["pretrain"].data.params["model.preset"]
        assert logged["finetune.lr"] == runs["finetune"].data.params["finetune.lr"]


def test_the_report_in_mlflow_shows_its_figures_from_the_runs_artifacts(tiny_repo, tmp_path):
    run = _runs(tiny_repo)["evaluate"]
    on_disk = IMAGE.findall((tiny_repo / "reports/report.md").read_text())
    logged = IMAGE.findall(_logged_report(tiny_repo, run.info.run_id, tmp_path))
    assert len(logged) == len(on_disk) >= 3  # confusion matrix, pretraining and fine-tuning loss
    client = _client(tiny_repo)
    for url in logged:
        # MLflow's markdown viewer shows an image only from an absolute http(s) URL.
        parts = urlsplit(url)
        assert parts.scheme == "http" and parts.path == "/get-artifact", url
        query = parse_qs(parts.query)
        assert query["run_uuid"] == [run.info.run_id]
        folder, _, name = query["path"][0].rpartition("/")
        assert name in {Path(f.path).name for f in client.list_artifacts(run.info.run_id, folder)}, url
    for path in on_disk:  # the file in the workspace keeps paths relative to reports/
        assert (tiny_repo / "reports" / path).is_file()


def test_the_report_names_the_version_scored_and_where_the_aliases_after_promote_are(tiny_repo):
    model_line = next(line for line in (tiny_repo / "reports/report.md").read_text().splitlines()
                      if line.startswith("| model |"))
    assert "version 1, scored here and given the alias `candidate`" in model_line
    assert "(alias `candidate`)" not in model_line  # stated as a fact, it is wrong once promote moves aliases
    assert "reports/promotion_decision.json" in model_line


def test_a_run_name_says_what_changed_since_the_baseline_and_the_dvc_experiment(tmp_path, monkeypatch):
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "params.yaml").write_text("finetune:\n  method: full\n  lr: 0.001\nruntime:\n  progress: true\n")
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "base", "--allow-empty"],
                   cwd=tmp_path, check=True)
    subprocess.run(["git", "add", "params.yaml"], cwd=tmp_path, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "params"], cwd=tmp_path,
                   check=True)
    (tmp_path / "params.yaml").write_text("finetune:\n  method: frozen\n  lr: 0.01\nruntime:\n  progress: false\n")
    changed = changed_params(tmp_path)
    assert changed == {"finetune.method": "frozen", "finetune.lr": "0.01", "runtime.progress": "False"}
    monkeypatch.setenv("DVC_EXP_NAME", "gusty-tuba")
    assert run_name("finetune", {"finetune.method": "frozen"}, changed) == \
        "finetune · method=frozen · finetune.lr=0.01 · exp gusty-tuba"


@pytest.mark.parametrize("uri", ["http://127.0.0.1:5000", "https://u:secret@mlflow.example/"])
def test_every_ui_link_carries_the_runs_view(uri):
    from lmforge.track.ui import ui_link

    assert ui_link(uri, "3", "abc").endswith("/#/experiments/3/runs/abc?workflowType=machine_learning")
    assert ui_link(uri, "3").endswith("/#/experiments/3/runs?workflowType=machine_learning")
    assert "secret" not in ui_link(uri, "3")
