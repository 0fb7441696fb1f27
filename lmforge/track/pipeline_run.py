"""The Prefect flow's parent run `pipeline` (experiment `lmforge`) that the stages' runs nest under,
guarded like a stage's run (lmforge.track.runs).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from lmforge.core.redact import redact
from lmforge.track.lineage import git_commit, recorded_hashes, stage_outputs
from lmforge.track.deferred import now_ms, wait_for_journals
from lmforge.track.run_handle import guarded
from lmforge.track.runs import OUTPUT_TAG
from lmforge.track.store import LOGGING_FAILED_MARKER, ensure_experiment, process_tags, store_label, tracking_uri


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

    @guarded
    def tag(self, tags: Mapping[str, str]) -> None:
        with self._noted("tagging the pipeline run"):
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri(self.root))
            for key, value in tags.items():
                client.set_tag(self.run_id, key, value)

    @guarded
    def producing_runs(self, stages: list[str]) -> dict[str, str | None]:
        """stage -> the id of the newest FINISHED run of that stage whose output tags equal the md5s
        dvc.lock records for the stage's outputs (it made the files in the workspace, in this flow
        or an earlier one); None when no run did (never recorded, or made with tracking down).
        The data stages' runs the tracking agent has yet to write are waited for first."""
        wait_for_journals(self.root, tracking_uri(self.root))
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

    @guarded
    def record(self, metrics: Mapping[str, float], params: Mapping[str, str], description: str) -> None:
        """The run's headline figures (named like the stages' own metrics), key params and description."""
        with self._noted("recording the pipeline run's figures"):
            from mlflow.entities import Metric, Param, RunTag
            from mlflow.tracking import MlflowClient

            now = now_ms()
            MlflowClient(tracking_uri(self.root)).log_batch(
                self.run_id, metrics=[Metric(key, float(value), now, 0) for key, value in metrics.items()],
                params=[Param(key, value) for key, value in params.items()],
                tags=[RunTag("mlflow.note.content", description)],
            )

    @guarded
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
