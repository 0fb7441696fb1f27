"""The data stages as users run them: real `dvc repro` / `dvc exp run` in a copy of the
repository and a real local MLflow store (the embedded default), no mocks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from lmforge.core import paths
from lmforge.data.tokens.shards import ShardReader
from lmforge.track.lineage import input_hashes
from lmforge.data.engine import FAULT_ENV
from lmforge.core.errors import LmforgeError

from conftest import copy_repo, make_repo, run, tool_env, write_params


def _client(root: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")


def test_repro_writes_every_output_and_then_only_promote_is_stale(tiny_repo):
    for path in (
        "data/raw/part-00000.parquet", "data/raw/manifest.json", "data/raw/stats.json",
        "data/clean/part-00000.parquet", "data/clean/manifest.json",
        "data/clean/stats.json", "data/clean/metrics.json", "data/clean/rejected_samples.jsonl",
        "data/tokenizer/tokenizer.json", "data/tokenizer/stats.json", "data/tokenizer/metrics.json",
        "data/shards/manifest.json",
    ):
        assert (tiny_repo / path).is_file(), path
    # A second `dvc repro` would run promote alone (always_changed: it reads the registry, which DVC
    # cannot see); `dvc status` says so without running it on this shared repository.
    status = json.loads(run(["dvc", "status", "--json"], tiny_repo).stdout)
    assert status == {"promote": ["always changed"]}


def test_every_document_is_in_the_output_or_counted(tiny_repo):
    raw = json.loads((tiny_repo / "data/raw/stats.json").read_text())
    clean = json.loads((tiny_repo / "data/clean/stats.json").read_text())
    assert raw["documents"] == raw["counters"]["files_read"] == 200
    dropped = sum(step["dropped"] for step in clean["steps"].values())
    assert clean["documents_in"] == raw["documents"] == clean["documents_out"] + dropped
    manifest = json.loads((tiny_repo / "data/shards/manifest.json").read_text())
    assert sum(s["documents"] for s in manifest["splits"].values()) == clean["documents_out"]


def test_shards_from_the_stage_open_with_the_reader(tiny_repo):
    reader = ShardReader(tiny_repo / "data/shards", "train", tokenizer_path=tiny_repo / "data/tokenizer/tokenizer.json")
    assert reader.seq_len == 32 and len(reader) > 0


def test_each_stage_logs_one_mlflow_run_with_metrics_and_lineage(tiny_repo):
    client = _client(tiny_repo)
    experiment = client.get_experiment_by_name("lmforge")
    runs = {r.data.tags["lmforge.stage"]: r for r in client.search_runs([experiment.experiment_id])}
    assert {"ingest", "clean", "tokenize"} <= set(runs)
    assert runs["ingest"].data.metrics["ingest/documents"] == 200
    assert runs["clean"].data.metrics["clean/documents_out"] > 0
    figures = [key for key in runs["clean"].data.metrics if "/timings/" not in key]
    assert len(figures) <= 6  # the figures worth comparing; the counts are in stats.json
    for stage, stage_run in runs.items():  # and where each stage's seconds went (lmforge.core.timings)
        timed = {key.rpartition("/")[2] for key in stage_run.data.metrics if key.startswith(f"{stage}/timings/")}
        assert {"startup_s", "params_s", "tracking_s", "work_s", "total_s"} <= timed, stage
    tokenize = runs["tokenize"]
    assert tokenize.data.metrics["tokenize/tokens_per_s"] > 0 and tokenize.data.metrics["tokenize/train_tokens"] > 0
    assert tokenize.data.params["tokenizer.vocab_size"] == "320"
    assert len(tokenize.data.tags["mlflow.source.git.commit"]) >= 40
    # The input hash is DVC's when dvc.lock records the path, else the directory's own content hash.
    assert tokenize.data.tags["lmforge.input.data/clean"] == input_hashes([paths.CLEAN], tiny_repo)["data/clean"]
    lock = yaml.safe_load((tiny_repo / "dvc.lock").read_text())
    raw_out = next(o for o in lock["stages"]["ingest"]["outs"] if o["path"] == "data/raw")
    assert runs["clean"].data.tags["lmforge.input.data/raw"] == raw_out["md5"]
    clean_out = next(o for o in lock["stages"]["clean"]["outs"] if o["path"] == "data/clean")
    assert tokenize.data.tags["lmforge.input.data/clean"] == clean_out["md5"]
    artifacts = {a.path for a in client.list_artifacts(runs["clean"].info.run_id)}
    assert {"stats.json", "rejected_samples.jsonl", "lineage.json"} <= artifacts


def test_experiment_on_vocab_size_reruns_from_tokenize_not_ingest_or_clean(tiny_repo, tmp_path):
    """What `dvc exp run -S tokenizer.vocab_size=300` reruns, as DVC sees it."""
    root = copy_repo(tiny_repo, tmp_path / "repo")
    _write_params(root, tokenizer={"vocab_size": 300})
    stale = json.loads(run(["dvc", "status", "--json"], root).stdout)
    assert "tokenize" in stale and "ingest" not in stale and "clean" not in stale, stale


def _stage(root: Path, module: str) -> subprocess.CompletedProcess:
    return run(["python", "-m", f"stages.{module}"], root, check=False)


def _write_params(root: Path, **sections) -> None:
    write_params(root, **sections)


def test_unknown_param_stops_the_stage_naming_the_key(tmp_path):
    root = make_repo(tmp_path)
    _write_params(root, clean={"min_charz": 3})
    result = _stage(root, "ingest")
    assert result.returncode == 2
    assert "clean.min_charz" in result.stderr and "Traceback" not in result.stderr


def test_glob_matching_nothing_is_a_clear_error(tmp_path):
    root = make_repo(tmp_path)
    _write_params(root, data={"files": ["data/nowhere/*.txt"]})
    result = _stage(root, "ingest")
    assert result.returncode == 2
    assert "data/nowhere/*.txt" in result.stderr and "Traceback" not in result.stderr


def test_corpus_emptied_by_cleaning_is_a_clear_error_with_stats_kept(tmp_path):
    root = make_repo(tmp_path)
    _write_params(root, clean={"min_words": 10_000, "max_words": 20_000})
    assert _stage(root, "ingest").returncode == 0
    result = _stage(root, "clean")
    assert result.returncode == 2
    assert "all 200 documents were dropped" in result.stderr and "Traceback" not in result.stderr
    stats = json.loads((root / "data/clean/stats.json").read_text())
    assert stats["steps"]["length"]["reasons"] == {"too_few_words": 200}


def test_stage_run_before_its_input_exists_says_which_stage_to_run(tmp_path):
    root = make_repo(tmp_path)
    result = _stage(root, "clean")
    assert result.returncode == 2 and "dvc repro ingest" in result.stderr


def test_tokenize_killed_midway_leaves_no_shards_a_reader_accepts_and_rerun_completes(tmp_path):
    root = make_repo(tmp_path)
    _write_params(root, engine={"workers": 1})
    for module in ("ingest", "clean"):
        assert _stage(root, module).returncode == 0
    # The BPE is trained, then the encoding of partition 0 hangs (a test fault point): kill it there.
    process = subprocess.Popen(
        ["python", "-m", "stages.tokenize_data"], cwd=root, env=tool_env(**{FAULT_ENV: "tokenize:0:hang"}),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    staged = root / "data/.staging/tokenize"
    try:
        deadline = time.monotonic() + 120
        while not list((staged / "shards/train").glob("*.arrow")):
            assert process.poll() is None and time.monotonic() < deadline, "the stage never reached its encode tasks"
            time.sleep(0.1)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the stage and its engine's worker processes
        process.wait()
    with pytest.raises(LmforgeError, match="unfinished"):
        ShardReader(root / "data/shards", "train")
    assert _stage(root, "tokenize_data").returncode == 0
    reader = ShardReader(root / "data/shards", "train")
    assert len(reader) > 3 and not staged.exists()
    assert len(reader) > 3


def test_a_corpus_of_your_own_needs_labelled_files_and_finetune_data_names_the_params(tmp_path):
    """`dvc repro` on .txt + .jsonl files: with finetune still on the built-in task files (which only
    the stdlib corpus can give), finetune_data stops in one line naming the params to set; pointed
    at labelled files, it goes through (the built-in files written empty, unused)."""
    root = make_repo(tmp_path)
    (root / "data/corpus/more.jsonl").write_text(
        "".join(json.dumps({"text": f"Note {i}: the river returns a small stone to the lazy fox."}) + "\n"
                for i in range(20)), encoding="utf-8")
    corpus = {"files": ["data/corpus/*.txt", "data/corpus/*.jsonl"]}
    builtin = {"train_file": "data/finetune/classify_train.jsonl", "test_file": "data/finetune/classify_test.jsonl"}
    _write_params(root, data=corpus, finetune=builtin)
    result = run(["dvc", "repro", "finetune_data"], root, check=False)
    assert result.returncode != 0
    (line,) = [l for l in (result.stdout + result.stderr).splitlines() if l.startswith("[finetune_data] error:")]
    assert "finetune.train_file" in line and "finetune.test_file" in line and "data.source: files" in line
    assert "Traceback" not in result.stdout + result.stderr
    assert json.loads((root / "data/raw/stats.json").read_text())["documents"] == 220  # both kinds of file read

    _write_params(root, data=corpus)  # finetune reads data/labeled/{train,test}.jsonl
    run(["dvc", "repro", "finetune_data"], root)
    assert (root / "data/finetune/classify_train.jsonl").read_text() == ""
