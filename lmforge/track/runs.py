"""The one MLflow helper every stage uses: open a run, log params, metrics, artifacts and models,
tag its lineage (lmforge.track.lineage: git commit, the hash of every input), and degrade to one warning
when the store is down, damaged or read-only; and the Prefect flow's parent run `pipeline`
(PipelineRun) that the stages' runs nest under.

Where the runs are stored, and whether that store can take one, is lmforge.track.store.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lmforge.track.lineage import git_commit, input_hashes, output_hashes, recorded_hashes, stage_outputs
from lmforge.core.params import flatten
from lmforge.core.redact import redact
from lmforge.track.store import (
    LOGGING_FAILED_MARKER,
    ensure_experiment,
    mark_orphans_killed,
    probe_store,
    process_tags,
    report_logging_failure,
    store_label,
    tracking_errors,
    tracking_uri,
    use_http_client_defaults,
)

# The runs table (the UI opens on traces otherwise): `<ui>/#/experiments/<id>/...`
RUNS_TABLE = "#/experiments/{id}/runs?workflowType=machine_learning"
logger = logging.getLogger(__name__)

# Set by the Prefect flow (flows/pipeline.py) in the environment of each stage it runs: the stage's
# run nests under the flow's `pipeline` run and carries the flow run's id.
PARENT_RUN_ENV = "LMFORGE_PARENT_RUN_ID"
FLOW_RUN_ENV = "LMFORGE_PREFECT_FLOW_RUN_ID"
# Tag prefix of a stage run's outputs: `lmforge.output.<path>` = DVC's md5 of what the run wrote
# (lineage.content_hash), so a later flow whose stage is a DVC cache hit finds the run that made it.
OUTPUT_TAG = "lmforge.output."


def runs_table_link(experiment_id: str) -> str:
    """Where to see the runs: the server's runs table, or how to open the local store's."""
    page = RUNS_TABLE.format(id=experiment_id)
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith(("http://", "https://")):
        return redact(f"{uri.rstrip('/')}/{page}")
    return f"`make ui` (mlflow ui --backend-store-uri sqlite:///mlflow.db), then http://127.0.0.1:5000/{page}"


def _run_exists(run_id: str, experiment_id: str) -> bool:
    import mlflow

    try:
        return mlflow.get_run(run_id).info.experiment_id == experiment_id
    except mlflow.exceptions.MlflowException:
        return False


def _guarded(method: Callable[..., Any]) -> Callable[..., Any]:
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

    @_guarded
    def log_params(self, params: Mapping[str, str]) -> None:
        import mlflow

        mlflow.log_params(dict(params))

    @_guarded
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

    @_guarded
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Counts and constants of the run (parameters, world size, ...): not metrics, no steps."""
        import mlflow

        mlflow.set_tags({key: str(value) for key, value in tags.items() if value is not None})

    @_guarded
    def describe(self, text: str) -> None:
        """The run's description in the MLflow UI (markdown): what the stage did, its key figures."""
        import mlflow

        mlflow.set_tag("mlflow.note.content", text)

    @_guarded
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifact(str(path), artifact_path=artifact_path)

    @_guarded
    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        import mlflow

        mlflow.log_dict(dict(data), name)

    @_guarded
    def log_torch_model(self, model: Any, registered_name: str, signature: Any = None, input_example: Any = None,
                        description: str | None = None, extra_files: list[Path] | None = None) -> Any:
        """Log a plain torch module (pytorch flavor), named like its registered model, and register
        a new version of it (with `description`, when given, on the registered model). `extra_files`
        land in the model's `extra_files/` (the exported directory: loadable without the pickle).

        Pickle serialization with lmforge's source bundled (`code_paths`), so
        `mlflow.pytorch.load_model("models:/<name>/<version>")` works without lmforge installed.
        """
        import mlflow
        import torch

        import lmforge

        if description:
            from mlflow.tracking import MlflowClient

            client = MlflowClient()
            try:
                client.create_registered_model(registered_name, description=description)
            except mlflow.exceptions.MlflowException:  # it exists: keep its description current
                client.update_registered_model(registered_name, description=description)
        return mlflow.pytorch.log_model(
            model,
            name=registered_name,
            signature=signature,
            input_example=input_example,
            serialization_format="pickle",
            pip_requirements=[f"torch>={torch.__version__.split('+')[0]}", "numpy", "safetensors"],
            code_paths=[str(Path(lmforge.__file__).parent)],
            registered_model_name=registered_name,
            extra_files=[str(path) for path in extra_files or []] or None,
        )

    @_guarded
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

    @_guarded
    def tag_model_version(self, name: str, version: str, tags: Mapping[str, str]) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)

    @_guarded
    def describe_model_version(self, name: str, version: str, text: str) -> None:
        from mlflow.tracking import MlflowClient

        MlflowClient().update_model_version(name, version, description=text)

    @_guarded
    def set_model_alias(self, name: str, alias: str, version: str) -> None:
        from mlflow.tracking import MlflowClient

        MlflowClient().set_registered_model_alias(name, alias, version)

    @_guarded
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
) -> Iterator[StageRun]:
    """Open the MLflow run of one stage (experiment `lmforge`, run name = stage).

    `system_metrics`: MLflow samples CPU, memory (and GPU, with nvidia-ml-py) into the run while it
    is open (psutil; the training stages ask for it, on rank 0 only since only rank 0 opens a run).

    `resume_run_id`: continue that run (a training stage resumed after a kill logs into the
    run it started, so its curve is one line in the UI) when it exists in this store.
    The store is probed first; when it cannot take a run, one warning names it and the stage's
    work goes on exactly as with tracking up (every StageRun call then does nothing).
    """
    root = (root or Path.cwd()).resolve()
    use_http_client_defaults()
    hashes = input_hashes(inputs, root)
    problem = probe_store(root)
    if problem:
        report_logging_failure(problem, root)
        yield StageRun(None, stage)
        return
    import mlflow
    from mlflow.tracking import MlflowClient

    logging.getLogger("alembic").setLevel(logging.WARNING)
    tags = {
        "lmforge.stage": stage,
        "mlflow.source.git.commit": git_commit(root),
        **process_tags(),
        **{f"lmforge.input.{path}": digest for path, digest in hashes.items()},
    }
    if os.environ.get(PARENT_RUN_ENV):  # run by the Prefect flow: nest under its `pipeline` run
        tags["mlflow.parentRunId"] = os.environ[PARENT_RUN_ENV]
    if os.environ.get(FLOW_RUN_ENV):
        tags["lmforge.prefect_flow_run_id"] = os.environ[FLOW_RUN_ENV]
    flat_params = {}
    for section, values in params.items():
        dumped = values.model_dump(mode="json") if isinstance(values, BaseModel) else dict(values)
        flat_params.update(flatten(dumped, f"{section}."))
    # MLflow params are strings of bounded length; lists and dicts become JSON.
    logged = {k: (json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in flat_params.items()}
    errors = tracking_errors()
    try:
        experiment_id = ensure_experiment(root)
        for orphan in mark_orphans_killed(MlflowClient(tracking_uri(root)), experiment_id):
            logger.info("MLflow run %s was left RUNNING by a process that is gone: marked KILLED", orphan)
        start: dict[str, Any] = {"experiment_id": experiment_id, "run_name": stage}
        if resume_run_id and _run_exists(resume_run_id, experiment_id):
            if mlflow.get_run(resume_run_id).data.params == logged:
                start = {"run_id": resume_run_id}
            else:  # MLflow params are immutable: a resume with other params is a new, linked run
                tags["lmforge.continues_run"] = resume_run_id
        run = mlflow.start_run(**start, tags=tags, log_system_metrics=True if system_metrics else None)
    except errors as exc:  # the store does not answer: do the stage's work all the same
        report_logging_failure(exc, root)
        run = None
    if run is None:
        yield StageRun(None, stage)
        return
    handle = StageRun(run.info.run_id, stage, run.info.experiment_id)
    logger.info("MLflow run %s/%s: %s", stage, run.info.run_id, runs_table_link(run.info.experiment_id))
    handle.log_params(logged)
    handle.log_dict({"stage": stage, "inputs": hashes}, "lineage.json")
    status = "FINISHED"
    try:
        yield handle
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    else:  # what the run made, as dvc.lock will record it (no output depends on this tag)
        if not handle.failed:
            handle.set_tags({f"{OUTPUT_TAG}{path}": md5 for path, md5 in output_hashes(root, stage).items()})
    finally:
        try:
            mlflow.end_run(status)
        except errors as exc:
            if not handle.failed:
                report_logging_failure(exc, root)


class PipelineRun:
    """The parent run `pipeline` (experiment `lmforge`) that the Prefect flow opens and the stages'
    runs nest under. Guarded like StageRun: the first tracking failure warns once and turns its
    logging off (the stages go on); `failure` keeps that warning's line for the flow's last word."""

    def __init__(self, root: Path, run_id: str, experiment_id: str) -> None:
        self.root = root.resolve()
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.failed = False
        self.failure: str | None = None

    @classmethod
    def start(cls, root: Path, tags: Mapping[str, str] | None = None) -> PipelineRun:
        """Open the run (not guarded: a store that cannot open it fails the caller)."""
        from mlflow.tracking import MlflowClient

        root = root.resolve()
        experiment_id = ensure_experiment(root)
        run = MlflowClient(tracking_uri(root)).create_run(
            experiment_id, run_name="pipeline",
            tags={"lmforge.stage": "pipeline", "mlflow.source.git.commit": git_commit(root), **process_tags(),
                  **(tags or {})},
        )
        return cls(root, run.info.run_id, experiment_id)

    @_guarded
    def tag(self, tags: Mapping[str, str]) -> None:
        with self._noted("tagging the pipeline run"):
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri(self.root))
            for key, value in tags.items():
                client.set_tag(self.run_id, key, value)

    @_guarded
    def producing_runs(self, stages: list[str]) -> dict[str, str | None]:
        """stage -> the id of the newest FINISHED run of that stage whose output tags equal the md5s
        dvc.lock records for the stage's outputs (it made the files in the workspace, in this flow
        or an earlier one); None when no run did (never recorded, or made with tracking down)."""
        with self._noted("finding the stages' runs"):
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri(self.root))
            recorded = recorded_hashes(self.root)
            found: dict[str, str | None] = {}
            for stage in stages:
                outputs = {path: recorded.get(path) for path in stage_outputs(self.root, stage)}
                if not outputs or None in outputs.values() or any("`" in p or "'" in p for p in outputs):
                    found[stage] = None
                    continue
                conditions = [f"tags.`lmforge.stage` = '{stage}'", "attributes.status = 'FINISHED'"]
                conditions += [f"tags.`{OUTPUT_TAG}{path}` = '{md5}'" for path, md5 in outputs.items()]
                runs = client.search_runs([self.experiment_id], " and ".join(conditions),
                                          order_by=["attributes.start_time DESC"], max_results=1)
                found[stage] = runs[0].info.run_id if runs else None
            return found

    @_guarded
    def record(self, metrics: Mapping[str, float], params: Mapping[str, str], description: str) -> None:
        """The run's headline figures (named like the stages' own metrics), key params and description."""
        with self._noted("recording the pipeline run's figures"):
            from mlflow.entities import Metric, Param, RunTag
            from mlflow.tracking import MlflowClient

            now = int(time.time() * 1000)
            MlflowClient(tracking_uri(self.root)).log_batch(
                self.run_id, metrics=[Metric(key, float(value), now, 0) for key, value in metrics.items()],
                params=[Param(key, value) for key, value in params.items()],
                tags=[RunTag("mlflow.note.content", description)],
            )

    @_guarded
    def end(self, status: str) -> None:
        with self._noted("closing the pipeline run"):
            from mlflow.tracking import MlflowClient

            MlflowClient(tracking_uri(self.root)).set_terminated(self.run_id, status)

    @contextmanager
    def _noted(self, what: str) -> Iterator[None]:
        """Keep the line of a failure of `what` (the guard around it reports it and turns logging off)."""
        try:
            yield
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else repr(exc)
            self.failure = redact(f"{LOGGING_FAILED_MARKER}: {what}: {first} ({store_label(self.root)})")
            raise
