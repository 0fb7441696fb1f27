"""Shared fixtures: small deterministic corpora, and a copy of the repository where real
DVC and MLflow run the stages (no mocks). The tiny pipeline runs once per test session, whatever
the number of xdist workers; every fixture that needs its outputs copies them from there."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

# The team stack's variables, as `eval "$(deploy/local-stack env)"` exports them in a developer's
# shell (README): a test that means one sets it. Taken out of this process's environment here, at
# import, not in a fixture: Prefect reads PREFECT_API_URL and lmforge.core.paths
# LMFORGE_CHECKPOINTS_DIR once, when a test module imports them.
TEAM_STACK = ("LMFORGE_", "AWS_", "MLFLOW_", "DVC_", "PREFECT_API_")
# Two test processes share the cores (`make test`): torch in each, and in every process a test starts,
# uses one thread rather than one per core, so they do not oversubscribe the machine. Set before torch
# is imported; a value in the environment wins, and a test about threads sets its own.
os.environ.setdefault("OMP_NUM_THREADS", "1")
SHELL_TEAM_STACK = {name: os.environ.pop(name) for name in list(os.environ) if name.startswith(TEAM_STACK)}

import pytest  # noqa: E402 - after the environment is cleared
import yaml  # noqa: E402
from filelock import FileLock  # noqa: E402

from lmforge import quiet_env  # noqa: E402
from lmforge.core import paths  # noqa: E402
from lmforge.core.params_yaml import params_yaml  # noqa: E402
from lmforge.track.deferred import wait_for_journals  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORDS = (
    "the a model data token river stone light quick brown fox jumps over lazy dog in of and to "
    "with from read write value function returns number string list file path system object "
    "class method error raise python module stream batch shard train loss learn small large"
).split()


def make_texts(n_docs: int, seed: int = 0, words_per_doc: tuple[int, int] = (20, 80)) -> list[str]:
    """English-like documents: random sentences over a small vocabulary, all distinct."""
    rng = random.Random(seed)
    texts = []
    for i in range(n_docs):
        sentences = []
        remaining = rng.randint(*words_per_doc)
        while remaining > 0:
            length = min(remaining, rng.randint(5, 12))
            sentence = " ".join(rng.choice(WORDS) for _ in range(length))
            sentences.append(sentence.capitalize() + ".")
            remaining -= length
        texts.append(f"Document {i}. " + " ".join(sentences))
    return texts


# The files that take longest (minutes of real processes and servers; `--durations` shows them),
# longest first. `make test` hands each xdist worker one file at a time in collection order
# (--no-loadscope-reorder), so these start at once and short files fill the end, not one long file
# running alone. The first builds the session's tiny pipeline while the second, which needs none, runs.
LONGEST_FIRST = ("test_pretrain_stage.py", "test_deploy.py", "test_distributed.py", "test_data_engine.py",
                 "test_flow_faults.py", "test_launch_nodes.py", "test_faults.py", "test_flow.py",
                 "test_docs.py", "test_promote.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def tool_env(**extra: str) -> dict[str, str]:
    """The environment stage subprocesses see: venv first on PATH, quiet, no outside store, none
    of the team stack's variables but those the test passes in `extra` or set itself (the shell's
    are gone from os.environ, see SHELL_TEAM_STACK; MLflow's and DVC's only through `extra`)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "DVC_")) and SHELL_TEAM_STACK.get(k) != v}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    quiet_env(env)
    env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, check: bool = True, **extra_env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=tool_env(**extra_env), capture_output=True, text=True)
    # The data stages' runs reach MLflow through the workspace's tracking agent: what a test reads
    # next is what a reader after the command sees (the flow and the logged stages wait the same way).
    wait_for_journals(Path(cwd))
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def store_client(root: Path):
    """An MLflow client on `root`'s embedded store (mlflow.db)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{root}/mlflow.db")


def registered_versions(root: Path, name: str = paths.FINETUNED_MODEL) -> list[int]:
    """The versions of registered model `name` in `root`'s local MLflow store, in order."""
    return sorted(int(v.version) for v in store_client(root).search_model_versions(f"name = '{name}'"))


def store_runs(root: Path) -> list:
    """The runs of the experiment `lmforge` in `root`'s local store (newest first)."""
    client = store_client(root)
    return client.search_runs([client.get_experiment_by_name("lmforge").experiment_id])


def stage_runs(root: Path, stage: str) -> list:
    """The MLflow runs of `stage` in `root`'s local store (newest first)."""
    return [r for r in store_runs(root) if r.data.tags["lmforge.stage"] == stage]


# Where tiny_repo's stages recorded the params they read (git- and DVC-ignored).
PARAMS_TRACE = ".dvc/tmp/params-trace.jsonl"
# What tiny_repo's `dvc repro` printed, stdout then stderr (git- and DVC-ignored).
REPRO_LOG = ".dvc/tmp/repro.log"
REPRO_OUTPUT = REPRO_LOG  # tests/test_quiet_output.py reads it under this name
TINY_PARAMS = {
    "data": {"source": "files", "files": ["data/corpus/*.txt"], "val_fraction": 0.2, "batch_size": 64},
    "clean": {"batch_size": 64},
    "tokenizer": {"vocab_size": 320, "seq_len": 32, "encode_batch_size": 50, "shard_rows": 16},
    "model": {"preset": "tiny", "dim": 32},
    "pretrain": {
        "max_steps": 6, "micro_batch_size": 4, "warmup_steps": 2, "lr": 0.01, "min_lr": 0.001, "eval_every": 3, "eval_batches": 2,
    },
    "generate": {"max_new_tokens": 8, "prompts": ["The model"]},
    "finetune": {
        "train_file": "data/labeled/train.jsonl", "test_file": "data/labeled/test.jsonl", "max_length": 32,
        "max_steps": 4, "micro_batch_size": 8, "warmup_steps": 1, "eval_every": 2, "eval_batches": 2,
    },
    "evaluate": {"lm_max_rows": 16, "sft_max_examples": 8, "sft_max_new_tokens": 4, "harness": {"limit": 16}},
    "runtime": {"pretrain": {"checkpoint_every": 3, "progress": False}, "finetune": {"checkpoint_every": 2, "progress": False}},
}
TOPICS = {
    "nature": "river stone light quick brown fox jumps over lazy dog".split(),
    "code": "read write value function returns number string list file path".split(),
}


def make_labeled(n: int, seed: int) -> list[dict]:
    """Rows {id, text, label}: each text drawn from its label's own words (separable)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = sorted(TOPICS)[i % 2]
        text = " ".join(rng.choice(TOPICS[label]) for _ in range(rng.randint(6, 14)))
        rows.append({"id": f"{seed}-{i}", "text": text.capitalize() + ".", "label": label})
    return rows


def merged(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` applied key by key, nested mappings merged, not replaced."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def tiny_params(**sections: dict) -> dict:
    """The repository's params.yaml (every section DVC lists must exist) with tiny overrides."""
    repo = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    return merged(merged(repo, TINY_PARAMS), sections)


# Evaluate without the lm-eval harness and the from-scratch fine-tune: ~9 s of the ~15 s evaluate takes
# on the tiny pipeline. For the full-pipeline runs of tests that read neither (nor pretraining_gain,
# the scratch baselines, reports/harness.json): the session's tiny_repo keeps both on (TINY_PARAMS),
# and tests/test_evaluate_stage.py and tests/test_harness.py check them there.
LIGHT_EVALUATE = {"scratch_baseline": False, "harness": {"tasks": []}}


def light_params(**sections: dict) -> dict:
    """tiny_params(**sections) with evaluate's harness and from-scratch fine-tune off (LIGHT_EVALUATE)."""
    return tiny_params(**merged({"evaluate": LIGHT_EVALUATE}, sections))


def write_params(root: Path, **sections: dict) -> None:
    """The tiny params (with `sections` merged in), in the form the repository's params.yaml has."""
    (root / "params.yaml").write_text(params_yaml(tiny_params(**sections)), encoding="utf-8")


def _copy_bytecode(source: Path, target: Path) -> None:
    """`source`'s compiled module (`make test` compiles the project first) beside its copy: the stages
    a test starts import the copy, and where PYTHONDONTWRITEBYTECODE is set each would compile it
    again. Still valid there: copy2 keeps the source's mtime, which the bytecode records."""
    if source.suffix == ".py" and (compiled := Path(importlib.util.cache_from_source(str(source)))).is_file():
        (target.parent / "__pycache__").mkdir(exist_ok=True)
        shutil.copy2(compiled, target.parent / "__pycache__" / compiled.name)


def make_repo(root: Path, params: dict | None = None, n_docs: int = 200, store: bool = True) -> Path:
    """A copy of this repository's files (tracked and untracked, not ignored) with a tiny
    corpus and tiny params, committed to a fresh git repo so `dvc exp run` works too; with an empty
    embedded MLflow store (made once per session) unless `store` is False: the first run makes one then."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split()
    for name in listed:
        source = REPO / name
        if source.is_file() and not name.startswith(("tests/", "bench/")):
            target = root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
            _copy_bytecode(source, target)
    (root / "dvc.lock").unlink(missing_ok=True)
    corpus = root / "data" / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(make_texts(n_docs)):
        (corpus / f"doc{i:04d}.txt").write_text(text, encoding="utf-8")
    labeled = root / "data" / "labeled"
    labeled.mkdir(parents=True, exist_ok=True)
    sft = [{"id": str(i), "prompt": f"def {w}_{i}(x)", "response": f"Return the {w}."}
           for i, w in enumerate(WORDS * 2)]
    for name, rows in (("train", make_labeled(80, 1)), ("test", make_labeled(20, 2)),
                       ("sft_train", sft[:80]), ("sft_test", sft[80:])):
        (labeled / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (root / "params.yaml").write_text(params_yaml(params or tiny_params()), encoding="utf-8")
    if store and _SESSION_TEMP is not None:
        template = built_once(_SESSION_TEMP, "empty_store", _empty_store)
        shutil.copy2(template / "mlflow.db", root / "mlflow.db")
        _own_store(template, root)
    run(["git", "init", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny"], root)
    return root


_BUILT: dict[str, Path] = {}  # this process's: tiny_repo and data_repo share one build


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """`build(root)` run once per test session: the first xdist worker to ask builds it under a file
    lock in the temp directory all workers share, the others wait for it and get the same directory.
    Read it only: a test that changes files works on a copy (`copy_repo`)."""
    if name in _BUILT:
        return _BUILT[name]
    if "PYTEST_XDIST_WORKER" not in os.environ:
        root = tmp_path_factory.mktemp(name)
        build(root)
        _BUILT[name] = root
        return root
    shared = tmp_path_factory.getbasetemp().parent  # pytest-N/, above each worker's popen-gwK/
    root, done = shared / name, shared / f"{name}.done"
    with FileLock(shared / f"{name}.lock"):
        if not done.exists():  # a worker whose build failed leaves no mark: the next one tries again
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            build(root)
            done.touch()
    _BUILT[name] = root
    return root


def copy_repo(source: Path, target: Path, *, ignore: Callable[[str, list[str]], set[str]] | None = None) -> Path:
    """A private copy of a tiny repository; its embedded MLflow store (if copied) made its own: MLflow
    records absolute artifact locations, which would otherwise point into `source`."""
    shutil.copytree(source, target, symlinks=True, ignore=ignore)
    if (target / "mlflow.db").is_file():
        _own_store(source, target)
    return target


def _own_store(source: Path, target: Path) -> None:
    """The embedded store copied from `source` into `target` pointed at `target`'s own mlruns/."""
    from lmforge.track.store import relocate_local_store

    relocate_local_store(target / "mlflow.db", (source / "mlruns").resolve().as_uri(),
                         (target / "mlruns").resolve().as_uri())


# An embedded MLflow store holding the experiment `lmforge` and no run, made once per session (on the
# first make_repo) by the code a stage's tracking agent runs (ensure_experiment): creating its schema
# costs a process about a CPU-second, which each of ~20 workspaces paid. The tiny pipeline makes its own.
_SESSION_TEMP: pytest.TempPathFactory | None = None


@pytest.fixture(scope="session", autouse=True)
def _session_temp(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Where make_repo builds the store template (built_once: shared by the xdist workers)."""
    global _SESSION_TEMP
    _SESSION_TEMP = tmp_path_factory


# Prefect's server migrates a fresh database at its first start: about 5 CPU-seconds, which each
# harness and each fresh PREFECT_HOME of the suite paid. The session's first harness publishes its
# database (migrated, Prefect's block types in it, no run yet); the later ones start on copies.
PREFECT_DB = "prefect.db"


def _prefect_db_dir() -> Path | None:
    """Where the session's migrated Prefect database is published (shared by the xdist workers)."""
    if _SESSION_TEMP is None:
        return None
    base = _SESSION_TEMP.getbasetemp()
    return (base.parent if "PYTEST_XDIST_WORKER" in os.environ else base) / "prefect_db"


def seed_prefect_db(target: Path) -> bool:
    """A copy of the session's migrated Prefect database at `target`, once a harness published one."""
    directory = _prefect_db_dir()
    if directory is None or not (directory / ".done").exists():
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(directory / PREFECT_DB, target)
    return True


def _publish_prefect_db(database: Path) -> None:
    directory = _prefect_db_dir()
    if directory is None or not database.is_file():
        return
    directory.mkdir(exist_ok=True)
    with FileLock(directory / ".lock"):
        if not (directory / ".done").exists():
            # SQLite's backup: a consistent copy of a database its server has open
            with contextlib.closing(sqlite3.connect(database)) as source, \
                    contextlib.closing(sqlite3.connect(directory / PREFECT_DB)) as copy:
                source.backup(copy)
            (directory / ".done").touch()


@contextlib.contextmanager
def prefect_harness() -> Iterator[None]:
    """Prefect's prefect_test_harness (a server on a temporary SQLite database, this process's client
    pointed at it), on a copy of the session's migrated database when there is one; else its server
    migrates a fresh one, published for the next harness."""
    from prefect.testing.utilities import prefect_test_harness

    directory = Path(tempfile.mkdtemp())
    database = directory / "prefect-test.db"  # the harness's database in the directory it makes
    seeded = seed_prefect_db(database)
    with contextlib.ExitStack() as stack:
        with mock.patch("prefect.testing.utilities.mkdtemp", return_value=str(directory)):
            stack.enter_context(prefect_test_harness(server_startup_timeout=180))
        if not seeded:
            _publish_prefect_db(database)
        yield


def _empty_store(root: Path) -> None:
    code = "from pathlib import Path; from lmforge.track.store import ensure_experiment; ensure_experiment(Path.cwd())"
    run([sys.executable, "-c", code], root)


def _tiny_pipeline(root: Path) -> None:
    """`make run` without its set-up (`-o setup`; this venv's tools): `dvc repro`, then the run saved as
    the DVC experiment `baseline`. Each stage appends the params keys it reads to PARAMS_TRACE
    (tests/test_params_deps.py); what the run printed is kept in REPRO_LOG."""
    make_repo(root, store=False)
    result = run(["make", "-o", "setup", "run", f"BIN={Path(sys.executable).parent}"], root,
                 LMFORGE_PARAMS_TRACE=str(root / PARAMS_TRACE))
    (root / REPRO_LOG).write_text(result.stdout + result.stderr, encoding="utf-8")


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny repository on which `make run` has run once (`dvc repro`, the baseline saved): the
    session's one full pipeline run (TINY_PARAMS), copied once per worker. Read only: copy it
    (`copy_repo`) to change it."""
    built = built_once(tmp_path_factory, "tiny_pipeline", _tiny_pipeline)
    return copy_repo(built, tmp_path_factory.mktemp("repo") / "repo")


# tests/train_helper.py's reference runs, trained once per session for the modules that compare with
# them (test_distributed, test_fp8, test_trainer): one process, then two FSDP ranks under torchrun,
# each process training its runs one after another (`--then`), so each pays its start once.
HELPER = REPO / "tests" / "train_helper.py"
ONE_PROCESS_RUNS = {  # 12 steps of a global batch of 8 rows (4 rows x 2 micro-steps); fp8: 6 steps
    "one": ["--steps", "12", "--micro", "4", "--accum", "2"],
    "one_fp8": ["--steps", "6", "--ckpt-every", "3", "--precision", "fp8", "--micro", "4", "--accum", "2"],
}
TWO_RANK_RUNS = {  # the same global batch as 2 ranks x 4 rows; gradients reduced in fp32 or bf16
    "fsdp_fp32": ["--steps", "12", "--micro", "4", "--accum", "1"],
    "fsdp_bf16": ["--steps", "12", "--micro", "4", "--accum", "1", "--reduce-precision", "bf16", "--ckpt-every", "12"],
    "fsdp_fp8": ["--steps", "6", "--ckpt-every", "3", "--precision", "fp8", "--micro", "4", "--accum", "1"],
}


def _helper_command(root: Path, runs: dict[str, list[str]]) -> list[str]:
    command: list[str] = []
    for name, args in runs.items():
        if command:
            command.append("--then")
        command += [str(root / name), *args]
    return command


def helper_env() -> dict[str, str]:
    """A train_helper process's environment: one thread, and none of torchrun's variables (a helper
    started alone must not take itself for a rank of some run)."""
    env = tool_env(OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def helper_losses(run: Path) -> dict[int, float]:
    """Each step's train loss in a train_helper run's metrics.jsonl (a step a resume wrote again: its latest)."""
    rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return {row["step"]: row["train_loss"] for row in rows}


def _helper_runs(root: Path) -> None:
    env = helper_env()
    for launch, runs in (([], ONE_PROCESS_RUNS),
                         (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], TWO_RANK_RUNS)):
        done = subprocess.run([sys.executable, *launch, str(HELPER), *_helper_command(root, runs)], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="session")
def helper_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each reference run's directory (metrics.jsonl, checkpoints/, model/, result.json), by the names
    of ONE_PROCESS_RUNS and TWO_RANK_RUNS. Read only: copy a run to change it."""
    root = built_once(tmp_path_factory, "helper_runs", _helper_runs)
    return {name: root / name for name in (*ONE_PROCESS_RUNS, *TWO_RANK_RUNS)}


# What the data stages (ingest, clean, tokenize) leave out of a tiny pipeline's workspace.
NOT_DATA = {"mlflow.db", "mlruns", "checkpoints", "models", "reports", "dvc.lock", "data/finetune",
            ".dvc/cache", ".dvc/tmp", ".lmforge"}


def _data_only(root: Path) -> Callable[[str, list[str]], set[str]]:
    def ignore(directory: str, names: list[str]) -> set[str]:
        here = Path(directory).relative_to(root)
        return {name for name in names if (here / name).as_posix() in NOT_DATA}
    return ignore


@pytest.fixture(scope="session")
def data_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny repository whose data stages have run, nothing after them (no store, no dvc.lock): the
    session's pipeline run's data outputs (same params, same commands)."""
    built = built_once(tmp_path_factory, "tiny_pipeline", _tiny_pipeline)
    return copy_repo(built, tmp_path_factory.mktemp("data_repo") / "repo", ignore=_data_only(built))


@pytest.fixture
def trained_ready(data_repo: Path, tmp_path: Path) -> Path:
    """A private copy of `data_repo` (shards ready, no MLflow store, no checkpoints)."""
    return copy_repo(data_repo, tmp_path / "repo")


@pytest.fixture
def trained_repo(tiny_repo: Path, tmp_path: Path) -> Path:
    """A private copy of `tiny_repo` as pretrain left it: its store with the pretrain run, its
    checkpoints (TINY_PARAMS), for a test about what the next pretrain run does."""
    return copy_repo(tiny_repo, tmp_path / "repo")
