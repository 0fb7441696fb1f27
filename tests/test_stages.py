"""The data stages as users run them: real `dvc repro` / `dvc exp run` in a copy of the
repository and a real local MLflow store (the embedded default), no mocks."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from lmforge.data.shards import ShardReader
from lmforge.errors import LmforgeError

from conftest import make_repo, run, tool_env, write_params


def _client(root: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")


def test_repro_writes_every_output_and_second_repro_is_a_no_op(tiny_repo):
    for path in (
        "data/raw/documents.parquet", "data/raw/stats.json", "data/clean/documents.parquet",
        "data/clean/stats.json", "data/clean/metrics.json", "data/clean/rejected_samples.jsonl",
        "data/tokenizer/tokenizer.json", "data/tokenizer/stats.json", "data/tokenizer/metrics.json",
        "data/shards/manifest.json",
    ):
        assert (tiny_repo / path).is_file(), path
    again = run(["dvc", "repro"], tiny_repo)
    assert "Running stage" not in again.stdout
    assert "up to date" in again.stdout


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
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert {"ingest", "clean", "tokenize"} <= set(runs)
    assert runs["ingest"].data.metrics["ingest/documents"] == 200
    assert runs["clean"].data.metrics["clean/documents_out"] > 0
    assert len(runs["clean"].data.metrics) <= 6  # the figures worth comparing; the counts are in stats.json
    tokenize = runs["tokenize"]
    assert tokenize.data.metrics["tokenize/tokens_per_s"] > 0 and tokenize.data.metrics["tokenize/train_tokens"] > 0
    assert tokenize.data.params["tokenizer.vocab_size"] == "320"
    assert len(tokenize.data.tags["mlflow.source.git.commit"]) >= 40
    # The input hash is DVC's, read from dvc.lock: lineage the user can check with `dvc status`.
    lock = yaml.safe_load((tiny_repo / "dvc.lock").read_text())
    clean_out = next(o for o in lock["stages"]["clean"]["outs"] if o["path"] == "data/clean/documents.parquet")
    assert tokenize.data.tags["lmforge.input.data/clean/documents.parquet"] == clean_out["md5"]
    artifacts = {a.path for a in client.list_artifacts(runs["clean"].info.run_id)}
    assert {"stats.json", "rejected_samples.jsonl", "lineage.json"} <= artifacts


def test_experiment_on_vocab_size_reruns_tokenize_only(tmp_path):
    root = make_repo(tmp_path)
    run(["dvc", "repro"], root)
    run(["git", "add", "-A"], root)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "lock"], root)
    result = run(["dvc", "exp", "run", "-S", "tokenizer.vocab_size=300"], root)
    assert "Running stage 'tokenize'" in result.stdout
    assert "Running stage 'ingest'" not in result.stdout and "Running stage 'clean'" not in result.stdout


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
    root = make_repo(tmp_path, n_docs=1500)
    _write_params(root, tokenizer={"shard_rows": 2, "encode_batch_size": 4})
    for module in ("ingest", "clean"):
        assert _stage(root, module).returncode == 0
    process = subprocess.Popen(
        ["python", "-m", "stages.tokenize_data"], cwd=root, env=tool_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    shards = root / "data/shards/train"
    deadline = time.monotonic() + 120
    while not (shards.is_dir() and len(list(shards.glob("*.arrow"))) >= 3):
        assert process.poll() is None, "the stage finished before it could be killed; grow the corpus"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    with pytest.raises(LmforgeError, match="unfinished"):
        ShardReader(root / "data/shards", "train")
    assert all(not p.name.startswith(".") for p in shards.glob("*.arrow"))
    assert _stage(root, "tokenize_data").returncode == 0
    reader = ShardReader(root / "data/shards", "train")
    assert len(reader) > 3
