"""The one MLflow helper every stage uses: open a run, log params, metrics, artifacts and models,
tag its lineage (lmforge.track.lineage: git commit, the hash of every input), and degrade to one warning
when the store is down, damaged or read-only. The flow's parent run is lmforge.track.pipeline_run.

Where the runs are stored, and whether that store can take one, is lmforge.track.store.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lmforge.track.lineage import git_commit, input_hashes, output_hashes
from lmforge.track.model_env import model_requirements, no_requirements_check
from lmforge.core.params import flatten
from lmforge.core.redact import redact
from lmforge.core.timings import breakdown, phase
from lmforge.track.store import (
    ensure_experiment,
    mark_orphans_killed,
    probe_store,
    process_tags,
    report_logging_failure,
    tracking_errors,
    tracking_uri,
    use_http_client_defaults,
)
from lmforge.track.ui import DVC_EXP_NAME, changed_params, model_params, run_name, ui_link, with_artifact_images

logger = logging.getLogger(__name__)

# Set by the Prefect flow (flows/pipeline.py) in the environment of each stage it runs: the stage's
# run nests under the flow's `pipeline` run and carries the flow run's id.
PARENT_RUN_ENV = "LMFORGE_PARENT_RUN_ID"
FLOW_RUN_ENV = "LMFORGE_PREFECT_FLOW_RUN_ID"
# Tag prefix of a stage run's outputs: `lmforge.output.<path>` = DVC's md5 of what the run wrote
# (lineage.content_hash), so a later flow whose stage is a DVC cache hit finds the run that made it.
OUTPUT_TAG = "lmforge.output."


def run_link(experiment_id: str, run_id: str) -> str:
    """Where to see a stage's run: its page on the server, or on the local store once served."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    link = ui_link(uri, experiment_id, run_id)
    if uri.startswith(("http://", "https://")):
        return link
    # `make ui` serves MLFLOW_TRACKING_URI too: name the store it will open, not always the default
    return f"{link} (`make ui` first: mlflow ui --backend-store-uri {redact(uri or 'sqlite:///mlflow.db')})"


def _run_exists(run_id: str, experiment_id: str) -> bool:
    import mlflow

    try:
        return mlflow.get_run(run_id).info.experiment_id == experiment_id
    except mlflow.exceptions.MlflowException:
        return False


def guarded(method: Callable[..., Any]) -> Callable[..., Any]:
    """A StageRun method that, on a tracking failure, warns once and turns logging off."""

    @functools.wraps(method)
    def call(self: StageRun, *args: Any, **kwargs: Any) -> Any:
        if self.failed:
            return None
        try:
            return method(self, *args, **kwargs)
        except tracking_errors() as exc:
            self.failed = True
            report_logging_failure(exc)
            return None

    return call


class StageRun:
    """What a stage logs through; thin on purpose so every stage logs the same way.

    When the tracking store fails (unreachable server), logging stops with one warning and the
    stage goes on: `failed` is then True and every later call does nothing.
    """

    def __init__(self, run_id: str | None, stage: str = "", experiment_id: str | None = None) -> None:
        self.run_id, self.stage, self.experiment_id = run_id, stage, experiment_id
        self.failed = run_id is None

    @guarded
    def log_params(self, params: Mapping[str, str]) -> None:
        import mlflow

        mlflow.log_params(dict(params))

    @guarded
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        import mlflow

        # Named `<stage>/<metric>`: a chart compares like with like (the LM's val_loss is not the
        # classifier's), and the runs table groups each stage's figures.
        numeric = {
            f"{self.stage}/{key}" if self.stage else key: float(value)
            for key, value in flatten(metrics).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        if numeric:
            mlflow.log_metrics(numeric, step=step)

    @guarded
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Counts and constants of the run (parameters, world size, ...): not metrics, no steps."""
        import mlflow

        mlflow.set_tags({key: str(value) for key, value in tags.items() if value is not None})

    @guarded
    def describe(self, text: str) -> None:
        """The run's description in the MLflow UI (markdown): what the stage did, its key figures."""
        import mlflow

        mlflow.set_tag("mlflow.note.content", text)

    @guarded
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifact(str(path), artifact_path=artifact_path)

    @guarded
    def log_markdown(self, path: Path, artifact_dir: str) -> None:
        """A markdown file as `<artifact_dir>/<name>`, its relative image paths (the caller logs the
        images under `artifact_dir` too) made URLs MLflow's viewer shows (ui.with_artifact_images)."""
        import mlflow

        text = with_artifact_images(path.read_text(encoding="utf-8"), tracking_uri(), str(self.run_id), artifact_dir)
        mlflow.log_text(text, f"{artifact_dir}/{path.name}")

    @guarded
    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        import mlflow

        mlflow.log_dict(dict(data), name)

    @guarded
    def log_table(self, rows: list[Mapping[str, Any]], name: str) -> None:
        """Rows of equal keys as an MLflow table (the UI's artifact view shows it, and
        `mlflow.load_table` reads it back across runs)."""
        import mlflow

        columns = list(rows[0]) if rows else []
        mlflow.log_table({column: [row[column] for row in rows] for column in columns}, artifact_file=name)

    @guarded
    def log_torch_model(self, model: Any, registered_name: str, signature: Any, input_example: Any,
                        description: str | None = None, extra_files: list[Path] | None = None) -> str | None:
        """Log a plain torch module (pytorch flavor), named like its registered model, register a new
        version of it and return that version (`description`, when given, on the registered model).
        `extra_files` land in the model's `extra_files/` (the exported directory, for promote).

        Saved as `pt2` (torch.export, traced from `input_example`): MLflow's safe format, no pickle, so
        `mlflow.pytorch.load_model("models:/<name>/<version>")` runs without lmforge installed or any
        code of ours executed. No serving check of the example: the flavour cannot take the several
        named tensors the signature holds (it would print a JSON dump and an error).
        """
        import mlflow
        from mlflow.tracking import MlflowClient

        with no_requirements_check():
            logged = mlflow.pytorch.log_model(
                model.eval(),
                name=registered_name,
                signature=signature,
                input_example=input_example,
                serialization_format="pt2",
                validate_serving_input=False,
                pip_requirements=model_requirements(),
                extra_files=[str(path) for path in extra_files or []] or None,
            )
        # Registered here, not through log_model's registered_model_name: MLflow prints "Registered
        # model ... already exists" there whenever the model exists, as it does once described.
        client = MlflowClient()
        try:
            client.create_registered_model(registered_name, description=description)
        except mlflow.exceptions.MlflowException:  # it exists: keep its description current
            if description:
                client.update_registered_model(registered_name, description=description)
        version = client.create_model_version(registered_name, source=logged.model_uri, run_id=self.run_id,
                                              model_id=logged.model_id)
        return str(version.version)

    @guarded
    def log_datasets(self, datasets: Mapping[str, tuple[str, str]], context: str) -> None:
        """name -> (source URI, DVC hash) as the run's input datasets (MLflow's Datasets panel)."""
        import mlflow
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        for name, (source, digest) in datasets.items():
            with warnings.catch_warnings():  # a file URI matches two equivalent local sources: either will do
                warnings.simplefilter("ignore", UserWarning)
                resolved = resolve_dataset_source(source)
            mlflow.log_input(MetaDataset(resolved, name=name, digest=digest), context=context)

    @guarded
    def tag_model_version(self, name: str, version: str, tags: Mapping[str, str]) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)

    @guarded
    def describe_model_version(self, name: str, version: str, text: str) -> None:
        from mlflow.tracking import MlflowClient

        MlflowClient().update_model_version(name, version, description=text)

    @guarded
    def set_model_alias(self, name: str, alias: str, version: str) -> None:
        from mlflow.tracking import MlflowClient

        MlflowClient().set_registered_model_alias(name, alias, version)

    @guarded
    def find_model_version(self, name: str, tag: str, value: str) -> str | None:
        """The newest registered version of `name` whose tag `tag` is `value` (None: none is)."""
        from mlflow.tracking import MlflowClient

        versions = MlflowClient().search_model_versions(f"name = '{name}'")
        matching = [int(v.version) for v in versions if v.tags.get(tag) == value]
        return str(max(matching)) if matching else None


@contextmanager
def tracking_guard(run: StageRun) -> Iterator[None]:
    """Tracking calls a stage makes itself, beyond StageRun's methods (promote's registry work): a
    tracking failure ends the block, warns once and turns the run's logging off; anything else raises.
    (A block cannot be skipped: check `run.failed` before entering.)"""
    try:
        yield
    except tracking_errors() as exc:
        run.failed = True
        report_logging_failure(exc)


@contextmanager
def stage_run(
    stage: str,
    params: Mapping[str, BaseModel | Mapping[str, Any]],
    inputs: list[str | Path],
    root: Path | None = None,
    resume_run_id: str | None = None,
    system_metrics: bool = False,
    scored: BaseModel | None = None,
) -> Iterator[StageRun]:
    """Open the MLflow run of one stage (experiment `lmforge`), named by the stage and what differs
    (lmforge.track.ui.run_name: `finetune · method=frozen`, the params changed since the baseline
    commit, the DVC experiment's name).

    `scored`: the whole params of a stage that scores a model (evaluate, promote): the params that
    define that model (lmforge.track.ui.model_params) are logged beside the stage's own.

    `system_metrics`: MLflow samples CPU, memory (and GPU, with nvidia-ml-py) into the run while it
    is open (psutil; the training stages ask for it, on rank 0 only since only rank 0 opens a run).

    `resume_run_id`: continue that run (a training stage resumed after a kill logs into the
    run it started, so its curve is one line in the UI) when it exists in this store.
    The store is probed first; when it cannot take a run, one warning names it and the stage's
    work goes on exactly as with tracking up (every StageRun call then does nothing).
    """
    root = (root or Path.cwd()).resolve()
    use_http_client_defaults()
    with phase("hashing"):
        hashes = input_hashes(inputs, root)
    with phase("tracking"):
        handle = _opened(stage, params, hashes, root, resume_run_id, system_metrics, scored)
    if handle.run_id is None:
        yield handle
        return
    with _ended(handle, root):
        yield handle


def _opened(stage: str, params: Mapping[str, BaseModel | Mapping[str, Any]], hashes: dict[str, str], root: Path,
            resume_run_id: str | None, system_metrics: bool, scored: BaseModel | None) -> StageRun:
    """The stage's run, started with its params and lineage; one that logs nothing when the store is down."""
    problem = probe_store(root)
    if problem:
        report_logging_failure(problem, root)
        return StageRun(None, stage)
    changed = changed_params(root)
    logged = logged_params(params)
    if scored is not None:
        logged = {**model_params(scored.model_dump(mode="json"), changed), **logged}
    name = run_name(stage, logged, changed)
    run = _start_run(name, run_tags(stage, root, hashes), logged, resume_run_id, system_metrics, root)
    if run is None:
        return StageRun(None, stage)
    handle = StageRun(run.info.run_id, stage, run.info.experiment_id)
    logger.info("MLflow run %s: %s", name, run_link(run.info.experiment_id, run.info.run_id))
    handle.log_params(logged)
    handle.log_dict({"stage": stage, "inputs": hashes}, "lineage.json")
    return handle


def run_tags(stage: str, root: Path, hashes: Mapping[str, str]) -> dict[str, str]:
    """A stage run's tags: the stage, the code's commit, the process, every input's hash, and the
    flow's runs it belongs to (nested under the `pipeline` run when the Prefect flow runs it)."""
    tags = {
        "lmforge.stage": stage,
        "mlflow.source.git.commit": git_commit(root),
        **process_tags(),
        **{f"lmforge.input.{path}": digest for path, digest in hashes.items()},
    }
    if os.environ.get(PARENT_RUN_ENV):
        tags["mlflow.parentRunId"] = os.environ[PARENT_RUN_ENV]
    if os.environ.get(FLOW_RUN_ENV):
        tags["lmforge.prefect_flow_run_id"] = os.environ[FLOW_RUN_ENV]
    if os.environ.get(DVC_EXP_NAME):  # `dvc exp run`: filter the table with tags.`lmforge.dvc_experiment`
        tags["lmforge.dvc_experiment"] = os.environ[DVC_EXP_NAME]
    return tags


def logged_params(params: Mapping[str, BaseModel | Mapping[str, Any]]) -> dict[str, str]:
    """The sections flattened to `section.key`: MLflow params are strings of bounded length, so lists
    and dicts become JSON."""
    flat_params = {}
    for section, values in params.items():
        dumped = values.model_dump(mode="json") if isinstance(values, BaseModel) else dict(values)
        flat_params.update(flatten(dumped, f"{section}."))
    return {k: (json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in flat_params.items()}


def _start_run(name: str, tags: dict[str, str], logged: Mapping[str, str], resume_run_id: str | None,
               system_metrics: bool, root: Path) -> Any:
    """The active MLflow run named `name`: `resume_run_id` continued when it exists with the same
    params, else a new run (linked to it); runs a gone process left RUNNING marked KILLED first.
    None, after one warning, when the store does not answer."""
    import mlflow
    from mlflow.tracking import MlflowClient

    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        experiment_id = ensure_experiment(root)
        for orphan in mark_orphans_killed(MlflowClient(tracking_uri(root)), experiment_id):
            logger.info("MLflow run %s was left RUNNING by a process that is gone: marked KILLED", orphan)
        start: dict[str, Any] = {"experiment_id": experiment_id, "run_name": name}
        if resume_run_id and _run_exists(resume_run_id, experiment_id):
            if mlflow.get_run(resume_run_id).data.params == logged:
                start = {"run_id": resume_run_id}
            else:  # MLflow params are immutable: a resume with other params is a new, linked run
                tags["lmforge.continues_run"] = resume_run_id
        return mlflow.start_run(**start, tags=tags, log_system_metrics=True if system_metrics else None)
    except tracking_errors() as exc:  # the store does not answer: do the stage's work all the same
        report_logging_failure(exc, root)
        return None


@contextmanager
def _ended(handle: StageRun, root: Path) -> Iterator[None]:
    """End the run as the stage ends (FINISHED, FAILED, KILLED); a finished one is first tagged with
    what it made, as dvc.lock will record it (no output depends on this tag)."""
    import mlflow

    errors = tracking_errors()
    status = "FINISHED"
    try:
        yield
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    else:
        if not handle.failed:
            with phase("hashing"):
                outputs = output_hashes(root, handle.stage)
            handle.set_tags({f"{OUTPUT_TAG}{path}": md5 for path, md5 in outputs.items()})
    finally:
        try:  # where the seconds went, up to here (lmforge.core.timings): `work` beside the fixed costs
            handle.log_metrics({f"timings/{name}_s": seconds for name, seconds in breakdown().items()})
            mlflow.end_run(status)
        except errors as exc:
            if not handle.failed:
                report_logging_failure(exc, root)
