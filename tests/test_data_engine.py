"""Ingest and tokenize on the Dask engine (real LocalClusters, a real `dask scheduler` + `dask worker`,
no mocks): sliced inputs read exactly once, the same bytes on 1 or 2 workers and a rerun, a worker
killed mid-task retried without loss, a killed stage resumed without redoing finished partitions."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.data.ingest_job import IngestJob, plan_tasks, run_partition
from lmforge.core import digests
from lmforge.data import job
from lmforge.data.job import Engine, run_data_job
from lmforge.data.markers import MARKERS_DIR
from lmforge.data.partitions import iter_dataset_batches
from lmforge.data.tokens.shards import ShardReader
from lmforge.data.sequential import iter_documents
from lmforge.data.tokenize_job import TokenizeJob
from lmforge.data.engine import FAULT_ENV, dask_client
from lmforge.core.params import DataParams, EngineParams, TokenizerParams

from conftest import REPO, make_repo, make_texts, tiny_params, tool_env

# Partitions of ~1.5 KB: a few documents each, so 120 documents make dozens of partitions.
PARTITION_MB = 0.0015
TOKENIZER = TokenizerParams(vocab_size=320, seq_len=16, encode_batch_size=16, shard_rows=8, train_sample_mb=0.01)
VAL_FRACTION = 0.2
# Figures that are timings or the engine's size: kept out of the byte comparisons.
TIMINGS = {"seconds", "mb_per_s", "tokens_per_s", "encode_seconds", "tokenizer_train_seconds", "workers"}
WAIT_S = 90


def make_corpus(root: Path) -> DataParams:
    """Files of every kind, large ones sliced: one-document .txt files, a .jsonl (with a bad line),
    a .parquet of several row groups and a .csv."""
    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    texts = make_texts(160, seed=3)
    for i, text in enumerate(texts[:60]):
        (corpus / f"a{i:03d}.txt").write_text(text, encoding="utf-8")
    lines = [json.dumps({"text": text}) for text in texts[60:110]]
    lines.insert(7, "{not json")
    (corpus / "b.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    pq.write_table(pa.table({"text": texts[110:150]}), corpus / "c.parquet", row_group_size=6)
    (corpus / "d.csv").write_text("text\n" + "".join(f'"{text}"\n' for text in texts[150:]), encoding="utf-8")
    return DataParams(source="files", files=[f"{corpus}/*"], partition_mb=PARTITION_MB, batch_size=16,
                      val_fraction=VAL_FRACTION)


def run_data_stages(client, data: DataParams, out: Path, engine: EngineParams | None = None) -> Path:
    """Ingest, then tokenize over the raw partitions (they follow clean's contract), into `out`: on
    `client`'s cluster, or as a stage would with `engine`."""
    running = engine or Engine(client)
    run_data_job(IngestJob(data, out / "raw", out / "staging-ingest"), running, hash_outputs=engine is not None)
    run_data_job(TokenizeJob(TOKENIZER, VAL_FRACTION, out / "raw", out / "shards", out / "tokenizer",
                             out / "staging-tokenize"), running, hash_outputs=engine is not None)
    return out


def outputs(out: Path) -> dict[str, object]:
    """Every output file's bytes, the stats without their timings."""
    found: dict[str, object] = {}
    for path in sorted(out.rglob("*")):
        if path.is_file():
            name = path.relative_to(out).as_posix()
            found[name] = _without_timings(json.loads(path.read_text())) if name.endswith("stats.json") else path.read_bytes()
    return found


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> DataParams:
    return make_corpus(tmp_path_factory.mktemp("engine-corpus"))


@pytest.fixture(scope="module")
def one_worker():
    with dask_client(EngineParams(workers=1)) as client:
        yield client


@pytest.fixture(scope="module")
def reference(one_worker, corpus, tmp_path_factory) -> dict[str, object]:
    return outputs(run_data_stages(one_worker, corpus, tmp_path_factory.mktemp("reference")))


def test_sliced_inputs_give_the_documents_and_counts_of_one_sequential_pass(corpus, tmp_path):
    tasks = plan_tasks(corpus, tmp_path)
    sliced = [s for task in tasks for s in task.partition["slices"] if s[2] or s[3] is not None]
    assert {Path(s[0]).suffix for s in sliced} == {".jsonl", ".parquet"} and len(tasks) > 20
    results = [run_partition(task) for task in tasks]  # in this process: the reading, not the engine
    documents = [doc for result in results for doc in pq.read_table(tmp_path / result["name"]).to_pylist()]
    counters: Counter = Counter()
    expected = list(iter_documents(corpus, counters))
    assert documents == expected
    assert sum((Counter(result["counters"]) for result in results), Counter()) == counters
    assert counters["bad_json_lines"] == 1 and counters["files_read"] == 63


@pytest.mark.parametrize("separator", ["\n\n", "\n", "\n---\n", "==="])
def test_txt_slices_read_every_piece_once_at_any_partition_size(tmp_path, separator):
    # Runs of the separator (a self-overlapping one too) around every possible cut.
    pieces = [f"piece {i} " + "word " * (i % 7) for i in range(40)]
    glue = [separator * (1 + i % 3) + "  " * (i % 2) for i in range(40)]
    (tmp_path / "big.txt").write_text("".join(p + g for p, g in zip(pieces, glue)), encoding="utf-8")
    for size in (3, 17, 40, 111):
        data = DataParams(source="files", files=[f"{tmp_path}/big.txt"], txt_separator=separator, partition_mb=size / 1e6)
        tasks = plan_tasks(data, tmp_path / f"staging-{size}")
        assert (len(tasks) == 1) == (separator == "==="), "a self-overlapping visible separator is not sliced"
        texts = [doc["text"] for task in tasks
                 for doc in pq.read_table(tmp_path / f"staging-{size}" / run_partition(task)["name"]).to_pylist()]
        assert texts == [p.strip() for p in pieces], size


def test_one_and_two_workers_and_a_rerun_write_the_same_bytes(reference, corpus, tmp_path):
    with dask_client(EngineParams(workers=2)) as client:
        two = outputs(run_data_stages(client, corpus, tmp_path / "two"))
        again = outputs(run_data_stages(client, corpus, tmp_path / "again"))
    assert two == reference and again == reference
    assert sum(name.startswith("raw/part-") for name in reference) > 20
    assert sum(name.startswith("shards/train/part-") for name in reference) > 20
    shards = ShardReader(tmp_path / "two/shards", "train", tokenizer_path=tmp_path / "two/tokenizer/tokenizer.json")
    assert len(shards) == reference["tokenizer/stats.json"]["train.rows"]


def test_one_partition_runs_in_the_driver_with_the_bytes_of_a_cluster(one_worker, corpus, tmp_path, monkeypatch):
    whole = corpus.model_copy(update={"partition_mb": 64.0})  # the whole corpus in one partition
    on_cluster = outputs(run_data_stages(one_worker, whole, tmp_path / "cluster"))
    monkeypatch.setattr(job, "dask_client", lambda params: pytest.fail(f"a cluster was started for {params}"))
    # The output tags' md5s of the part and the shards: hashed as they were written, never read back.
    monkeypatch.setattr(digests, "file_md5", lambda path: pytest.fail(f"{path} read back for its md5")
                        if str(path).endswith((".parquet", ".arrow")) else digests.file_digest(path, "md5"))
    in_driver = outputs(run_data_stages(None, whole, tmp_path / "driver", EngineParams(workers=2)))
    assert in_driver == on_cluster and sum(name.startswith("raw/part-") for name in in_driver) == 1
    assert sum(name.startswith("shards/train/") for name in in_driver) > 5
    assert json.loads((tmp_path / "driver/tokenizer/stats.json").read_text())["workers"] == 0
    for output in ("raw", "shards"):
        with monkeypatch.context() as forgotten:
            forgotten.setattr(digests, "_KNOWN_MD5", {})  # every file read: the md5s remembered were right
            forgotten.setattr(digests, "file_md5", lambda path: digests.file_digest(path, "md5"))
            read = digests.content_hash(tmp_path / "driver" / output)
        assert digests.content_hash(tmp_path / "driver" / output) == read


def test_tokenize_on_two_workers_runs_in_the_driver_with_the_bytes_of_a_cluster(reference, corpus, tmp_path,
                                                                               monkeypatch):
    # Its BPE trainer and encoder use both cores of one process: two workers are not worth their start.
    started = []
    start = job.dask_client
    monkeypatch.setattr(job, "dask_client", lambda params: started.append(params) or start(params))
    assert outputs(run_data_stages(None, corpus, tmp_path / "out", EngineParams(workers=2))) == reference
    assert started == [EngineParams(workers=2)]  # ingest's cluster, none for tokenize
    assert json.loads((tmp_path / "out/tokenizer/stats.json").read_text())["workers"] == 0


def test_the_bpe_trains_on_a_bounded_sample_chosen_by_id(reference):
    stats = reference["tokenizer/stats.json"]
    assert 0 < stats["sample_rate"] < 1
    assert 0 < stats["sample_documents"] < stats["train.documents"]
    assert stats["sample_bytes"] < 3 * TOKENIZER.train_sample_mb * 1e6


def test_a_worker_killed_mid_task_is_retried_and_nothing_is_lost_or_doubled(reference, corpus, tmp_path, monkeypatch):
    flags = [tmp_path / "ingest-exited", tmp_path / "tokenize-exited"]
    # Set before the cluster starts: its worker processes (and their restarts) inherit it.
    monkeypatch.setenv(FAULT_ENV, f"ingest:3:exit:{flags[0]},tokenize:2:exit:{flags[1]}")
    with dask_client(EngineParams(workers=2)) as client:
        assert outputs(run_data_stages(client, corpus, tmp_path / "out")) == reference
    assert all(flag.is_file() for flag in flags)


def _free_scheduler(tmp_path: Path) -> tuple[subprocess.Popen, subprocess.Popen, str]:
    scheduler_file = tmp_path / "scheduler.json"
    env = tool_env(PYTHONPATH=str(REPO))  # the workers import this checkout's lmforge
    elsewhere = tmp_path / "worker-cwd"  # workers do not share the driver's working directory
    elsewhere.mkdir()
    scheduler = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
         "--no-dashboard", "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(scheduler_file)],
        cwd=elsewhere, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = None
    try:
        deadline = time.monotonic() + WAIT_S
        while not scheduler_file.is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        address = json.loads(scheduler_file.read_text())["address"]
        worker = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1", "--no-dashboard",
             "--local-directory", str(elsewhere)],
            cwd=elsewhere, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except BaseException:
        _stop(scheduler)
        raise
    return scheduler, worker, address


def _stop(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=15)


def test_an_external_scheduler_and_worker_give_the_embedded_engines_bytes(reference, corpus, tmp_path):
    scheduler, worker, address = _free_scheduler(tmp_path)
    try:
        with dask_client(EngineParams(address=address)) as client:
            client.wait_for_workers(1, timeout=WAIT_S)
            assert outputs(run_data_stages(client, corpus, tmp_path / "out")) == reference
    finally:
        _stop(worker)
        _stop(scheduler)


def _stage(root: Path, module: str, **env: str) -> subprocess.Popen:
    # A session of its own: the kill reaches the stage and the cluster's worker processes.
    return subprocess.Popen([sys.executable, "-m", f"stages.{module}"], cwd=root, env=tool_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.parametrize("stage,module,prefix", [("ingest", "ingest", "part-"), ("tokenize", "tokenize_data", "encode-")])
def test_a_stage_killed_mid_way_resumes_without_redoing_finished_partitions(one_worker, tmp_path, monkeypatch,
                                                                           stage, module, prefix):
    # One worker: the driver runs the partitions itself (test_clean_stage.py kills a stage on a cluster).
    params = tiny_params(data={"partition_mb": 0.002}, engine={"workers": 1}, tokenizer={"train_sample_mb": 0.02})
    root = make_repo(tmp_path / "repo", params, n_docs=120)
    monkeypatch.chdir(root)  # the uninterrupted runs below, in this process, read the same relative paths
    data, tokenizer = DataParams(**params["data"]), TokenizerParams(**params["tokenizer"])
    if stage == "tokenize":  # its input: raw partitions published as data/clean (the contract's layout)
        run_data_job(IngestJob(data, root / "data/clean", tmp_path / "staging"), Engine(one_worker))
    hanging = _stage(root, module, **{FAULT_ENV: f"{stage}:5:hang"})
    markers = root / "data/.staging" / stage / MARKERS_DIR
    try:
        deadline = time.monotonic() + WAIT_S
        while len(list(markers.glob(f"{prefix}*.json"))) < 5:
            assert time.monotonic() < deadline and hanging.poll() is None, hanging.stderr.read()
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):  # ended by itself: the assert above says why
            os.killpg(hanging.pid, signal.SIGKILL)
        hanging.communicate(timeout=60)
    finished = list(markers.glob(f"{prefix}*.json"))
    resumed = _stage(root, module)
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert f"resumed: {len(finished)} of" in stderr
    if stage == "ingest":
        out, expected = root / "data/raw", tmp_path / "uninterrupted"
        run_data_job(IngestJob(data, expected, tmp_path / "staging"), Engine(one_worker))
        ids = [doc["id"] for batch in iter_dataset_batches(out, 1000, "ingest") for doc in batch]
        assert len(ids) == len(set(ids)) == 120
    else:
        out, expected = root / "data/shards", tmp_path / "uninterrupted"
        run_data_job(TokenizeJob(tokenizer, data.val_fraction, root / "data/clean", expected, tmp_path / "tokenizer",
                                 tmp_path / "staging"), Engine(one_worker))
        assert (root / "data/tokenizer/tokenizer.json").read_bytes() == (tmp_path / "tokenizer/tokenizer.json").read_bytes()
    assert _tree(out) == _tree(expected)


def _tree(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*")
            if p.is_file() and p.name != "stats.json"}


def test_inputs_on_s3_are_globbed_sliced_and_read_like_local_files(corpus, tmp_path, monkeypatch):
    """A real S3 API (moto's server on loopback) through s3fs: the same documents as the local files."""
    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
            monkeypatch.setenv(key, value)
        s3 = boto3.client("s3")
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                s3.create_bucket(Bucket="corpus")
                break
            except Exception:  # the server is still starting
                assert time.monotonic() < deadline and server.poll() is None, "moto_server did not start"
                time.sleep(0.2)
        local = sorted(Path(corpus.files[0]).parent.iterdir())
        for path in local:
            s3.upload_file(str(path), "corpus", f"dir/{path.name}")
        remote = corpus.model_copy(update={"files": ["s3://corpus/dir/*"]})
        tasks = plan_tasks(remote, tmp_path)
        assert len(tasks) > 20
        texts = [doc["text"] for task in tasks for doc in pq.read_table(tmp_path / run_partition(task)["name"]).to_pylist()]
        assert texts == [doc["text"] for doc in iter_documents(corpus, Counter())]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_whole_train_split_is_read_where_it_is_as_a_sample_would_hold_it(tmp_path):
    """At rate 1.0 (a corpus under tokenizer.train_sample_mb) the BPE task reads the clean
    partitions' train documents itself: the same texts, in the same order, a sample would copy."""
    import hashlib

    from lmforge.data.tokenize_job import SampleTask, _train_split, part_of, sample_part

    texts = make_texts(60, seed=5)
    ids = [hashlib.md5(text.encode()).hexdigest() for text in texts]
    paths = []
    for i, (chunk_ids, chunk_texts) in enumerate(((ids[:35], texts[:35]), (ids[35:], texts[35:]))):
        paths.append(tmp_path / f"part-{i:05d}.parquet")
        pq.write_table(pa.table({"id": chunk_ids, "text": chunk_texts}), paths[-1], row_group_size=7)
    sampled = []
    for index, path in enumerate(paths):
        summary = sample_part(SampleTask(part_of(index, path), 1.0, VAL_FRACTION, 8, str(tmp_path / "staging")))
        sampled.append((summary, pq.read_table(tmp_path / "staging/sample" / path.name).column("text").to_pylist()))
    read = {"documents": 0, "bytes": 0}
    whole = list(_train_split(tuple(str(path) for path in paths), VAL_FRACTION, 8, read))
    assert whole == [text for _, part in sampled for text in part] and 0 < len(whole) < len(texts)
    assert read == {key: sum(summary[key] for summary, _ in sampled) for key in ("documents", "bytes")}
