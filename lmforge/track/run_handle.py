"""The handle a stage logs through (StageRun: params, metrics, tags, artifacts, models, the
registry), each call guarded: a tracking failure warns once and turns the run's logging off, and
the stage's work goes on. Opened and ended by lmforge.track.runs.stage_run; lmforge.track.agent
replays a deferred stage's recorded calls through it.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lmforge.core.params import flatten
from lmforge.track.model_env import model_requirements, no_requirements_check
from lmforge.track.store import report_logging_failure, tracking_errors, tracking_uri
from lmforge.track.ui import with_artifact_images

logger = logging.getLogger(__name__)


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
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None, timestamp_ms: int | None = None) -> None:
        import mlflow

        # Named `<stage>/<metric>`: a chart compares like with like (the LM's val_loss is not the
        # classifier's), and the runs table groups each stage's figures.
        numeric = {
            f"{self.stage}/{key}" if self.stage else key: float(value)
            for key, value in flatten(metrics).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        if numeric:
            mlflow.log_metrics(numeric, step=step, timestamp=timestamp_ms)

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
    def find_keyed_run(self, key: str) -> str | None:
        """The id of the newest run a training stage keyed `key` (lmforge.track.live), or None."""
        from lmforge.track.live import RUN_KEY_TAG
        from lmforge.track.store import find_run

        return find_run(str(self.experiment_id), {RUN_KEY_TAG: key}) if self.experiment_id else None

    @guarded
    def find_model_version(self, name: str, tag: str, value: str, run_id: str | None = None) -> str | None:
        """The newest registered version of `name` whose tag `tag` is `value` (and registered from
        the run `run_id`, when given); None: none is."""
        from mlflow.tracking import MlflowClient

        versions = MlflowClient().search_model_versions(f"name = '{name}'")
        matching = [int(v.version) for v in versions if v.tags.get(tag) == value and run_id in (None, v.run_id)]
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
