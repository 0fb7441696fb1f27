"""The Prefect flow `lmforge-pipeline`: the DVC stages as tasks, with param overrides, a parent
MLflow run, and a markdown summary artifact.

    python -m flows.pipeline run [-S key=value ...] [--force] [--stages a,b]
    python -m flows.pipeline serve --cron "0 3 * * *"      # deployment `nightly` (flow.serve)

- The tasks are DVC's stages in DVC's topological order (read from dvc.yaml through DVC's own
  index, never restated here). Each runs `dvc repro --single-item <stage>` (`-f` with force) from
  the repository root, its output streamed line by line to the Prefect run logger, so dvc.lock stays
  the truth. Before the first stage, one in-process `dvc status` says which stages are up to date:
  those, as long as no stage upstream of them has run in this flow run, are cache hits reported
  without starting DVC at all (it would print "didn't change, skipping"); once a stage has run, DVC
  decides for each later stage (its "didn't change, skipping" / "is cached" lines mark a hit).
- Overrides (`key=value`, like `dvc exp run -S`) are validated against lmforge.params first (an
  unknown key fails the flow naming it), written into params.yaml with DVC's own hydra-override
  editor (what `dvc exp run -S` does, comments kept), left there after the run as `dvc exp run -S`
  leaves them in the workspace, and the finished result is recorded as a DVC experiment with
  `dvc exp save` (it shows in `dvc exp show`).
- MLflow: a parent run `pipeline` (experiment `lmforge`); each stage's own run nests under it through
  LMFORGE_PARENT_RUN_ID (lmforge.tracking.stage_run reads it) and is tagged with the Prefect flow
  run id. The parent carries `stage.<name>` = `ran` | `skipped (cache hit)` | `failed`.
- A stage that fails fails the flow with the stage's own error line first; later stages do not run
  and earlier outputs stay. pretrain and finetune retry with backoff (they resume from checkpoints).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task

FLOW_NAME = "lmforge-pipeline"
DEPLOYMENT_NAME = "nightly"
SUMMARY_KEY = "lmforge-pipeline-summary"
RETRIED_STAGES = {"pretrain": 2, "finetune": 2}  # they resume from their checkpoints
RETRY_DELAYS_S = [30, 120]
DEFAULT_STAGE_TIMEOUT_S = 12 * 3600
CACHE_HIT_LINES = ("didn't change, skipping", "is cached")
LOCK_LINE = "Unable to acquire lock"
SKIPPED = "skipped (cache hit)"


class PipelineError(RuntimeError):
    """A failure of the pipeline with its message first: the stage's own error line, or the setup
    problem (unknown override key or stage, tracking server not answering, DVC's lock)."""


# ---------------------------------------------------------------------------- DVC, read from DVC


def dvc_stages(root: Path) -> tuple[list[str], dict[str, list[str]], dict[str, list[str]]]:
    """(stage names in topological order, name -> upstream stage names, name -> metrics files),
    from DVC's index of dvc.yaml; ties keep dvc.yaml's order."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        stages = list(repo.index.stages)
        position = {stage: i for i, stage in enumerate(stages)}
        graph = repo.index.graph  # edges go from a stage to the stages it depends on
        order = nx.lexicographical_topological_sort(graph.reverse(copy=True), key=lambda s: f"{position[s]:06d}")
        names = [stage.name for stage in order]
        upstream = {stage.name: sorted(s.name for s in nx.descendants(graph, stage)) for stage in stages}
        metrics = {stage.name: [str(out.def_path) for out in stage.outs if out.metric] for stage in stages}
    return names, upstream, metrics


def dvc_changed(root: Path) -> set[str]:
    """Stages `dvc status` reports as changed (anything DVC would rerun)."""
    from dvc.lock import LockError
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            return {name.split(":")[-1] for name in repo.status()}
    except LockError as exc:
        raise PipelineError(
            f"{exc}\nno stage run: another DVC process (another pipeline run or `dvc repro`) holds the lock "
            f"of {root}; wait for it to finish"
        ) from None


def _dvc_lock_entry(root: Path, stage: str) -> Any:
    lock = root / "dvc.lock"
    if not lock.is_file():
        return None
    return ((yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages") or {}).get(stage)


# ------------------------------------------------------------------------------------- overrides


def parse_overrides(overrides: list[str], params_path: Path) -> list[str]:
    """Check each `key=value` against lmforge.params (key and value); returns the hydra overrides
    that DVC's editor applies (`+key=value` for a valid key absent from params.yaml)."""
    from lmforge.errors import LmforgeError
    from lmforge.params import parse_params

    raw = yaml.safe_load(params_path.read_text(encoding="utf-8")) or {}
    merged = json.loads(json.dumps(raw))
    hydra = []
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or key.startswith(("+", "~")):
            raise PipelineError(f"override {item!r} is not of the form key=value (e.g. tokenizer.vocab_size=4096)")
        parts = key.split(".")
        node, present = merged, True
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                present = False
                node[part] = {}
            node = node[part]
        present = present and parts[-1] in node
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else value
        hydra.append(item if present else f"+{item}")
    try:
        parse_params(merged, "params.yaml with the overrides")
    except LmforgeError as exc:
        raise PipelineError(f"{exc}\n(from the overrides {overrides})") from None
    return hydra


# ----------------------------------------------------------------------------------- stage task


def _error_line(stage: str, lines: list[str]) -> str:
    """The stage's own error line: `[stage] error: ...`, else the exception that ended its
    traceback, else DVC's ERROR line."""
    own = [line for line in lines if re.match(rf"^\[{re.escape(stage)}\] error:", line)]
    if own:
        return own[-1]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("Traceback (most recent call last)"):
            tail = [line for line in lines[i + 1:] if line and not line.startswith((" ", "\t", "ERROR:"))]
            if tail:
                return tail[-1] if ":" in tail[-1] else tail[0]
    dvc = [line for line in lines if line.startswith("ERROR:")]
    return dvc[0] if dvc else (lines[-1] if lines else "no output")


def _stage_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(DO_NOT_TRACK="1", MLFLOW_DISABLE_TELEMETRY="true", DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1")
    # A tracking server that stops answering mid-stage costs seconds, not MLflow's minutes of retries.
    env.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    env.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    env.update(extra)
    return env


@task(name="stage")
def run_stage(stage: str, root: str, force: bool, env: dict[str, str], known_hit: bool,
              timeout_s: float) -> dict[str, Any]:
    """One DVC stage: `dvc repro --single-item <stage>`, streamed to the run logger."""
    from lmforge.tracking import LOGGING_FAILED_MARKER

    logger = get_run_logger()
    started = time.perf_counter()
    if known_hit:
        logger.info("stage %s: dvc status says it is up to date: %s", stage, SKIPPED)
        return {"stage": stage, "status": SKIPPED, "seconds": time.perf_counter() - started, "logging_failed": None}
    before = _dvc_lock_entry(Path(root), stage)
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage] + (["-f"] if force else [])
    logger.info("stage %s: %s", stage, " ".join(cmd[1:]))
    process = subprocess.Popen(cmd, cwd=root, env=_stage_env(env), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        try:
            os.killpg(process.pid, 15)
        except ProcessLookupError:
            pass

    watchdog = threading.Timer(timeout_s, kill)
    watchdog.start()
    lines: list[str] = []
    try:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.rstrip("\n")
            lines.append(line)
            if line.strip():
                logger.info("[%s] %s", stage, line)
        rc = process.wait()
    finally:
        watchdog.cancel()
        if process.poll() is None:
            os.killpg(process.pid, 9)
    seconds = time.perf_counter() - started
    if timed_out.is_set():
        raise PipelineError(f"stage '{stage}' timed out after {timeout_s:.0f} s and was stopped "
                            f"(its checkpoints, if any, are kept)")
    if rc != 0:
        if any(LOCK_LINE in line for line in lines):
            lock = next(line for line in lines if LOCK_LINE in line)
            raise PipelineError(
                f"{lock}\nstage '{stage}' not run: another DVC process (another pipeline run or `dvc repro`) "
                f"holds the lock of {root}; wait for it to finish"
            )
        tail = "\n".join(lines[-25:])
        raise PipelineError(
            f"{_error_line(stage, lines)}\nstage '{stage}' failed (dvc repro exited {rc}); later stages not run, "
            f"earlier stages' outputs kept.\n--- last lines of its output ---\n{tail}"
        )
    hit = any(marker in line for line in lines for marker in CACHE_HIT_LINES) and not force
    hit = hit or (not force and before is not None and before == _dvc_lock_entry(Path(root), stage))
    failed = next((line for line in lines if line.startswith(LOGGING_FAILED_MARKER)), None)
    if failed:
        logger.warning("stage %s finished, but its MLflow logging failed: %s", stage, failed)
    status = SKIPPED if hit else "ran"
    logger.info("stage %s: %s in %.1f s", stage, status, seconds)
    return {"stage": stage, "status": status, "seconds": seconds, "logging_failed": failed}


# ------------------------------------------------------------------------------------- summary


def _flat_numbers(data: Any, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(data, Mapping):
        for key, value in data.items():
            out.update(_flat_numbers(value, f"{prefix}{key}."))
    elif isinstance(data, (int, float)) and not isinstance(data, bool):
        out[prefix.rstrip(".")] = data
    return out


def read_metrics(root: Path, metrics_files: Mapping[str, list[str]]) -> dict[str, dict[str, float]]:
    """stage -> its metrics (the numbers in the metrics files dvc.yaml lists for it)."""
    shown: dict[str, dict[str, float]] = {}
    for stage, files in metrics_files.items():
        values: dict[str, float] = {}
        for name in files:
            path = root / name
            if path.is_file():
                try:
                    values.update(_flat_numbers(json.loads(path.read_text(encoding="utf-8"))))
                except (json.JSONDecodeError, OSError):
                    pass
        shown[stage] = values
    return shown


def mlflow_run_url(run_id: str, experiment_id: str) -> str:
    from lmforge.tracking import tracking_uri

    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"{tracking_uri()} (local store: `mlflow ui --backend-store-uri {tracking_uri()}`)"


def summary_markdown(results: list[dict[str, Any]], metrics: Mapping[str, Mapping[str, float]], run_id: str,
                     url: str, overrides: list[str], outcome: str, experiment: str | None) -> str:
    lines = [
        f"# lmforge pipeline: {outcome}",
        "",
        f"MLflow run `pipeline`: `{run_id}` — {url}",
        "",
        f"Overrides: {', '.join(f'`{o}`' for o in overrides) if overrides else 'none'}"
        + (f" (DVC experiment `{experiment}`)" if experiment else ""),
        "",
        "| stage | result | seconds |",
        "|---|---|---|",
    ]
    lines += [f"| {r['stage']} | {r['status']} | {r['seconds']:.1f} |" for r in results]
    lines += ["", "## Metrics", ""]
    for stage, values in metrics.items():
        if values:
            lines += [f"### {stage}", "", "| metric | value |", "|---|---|"]
            lines += [f"| {key} | {value:.6g} |" for key, value in values.items()]
            lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- flow


@flow(name=FLOW_NAME)
def pipeline(overrides: list[str] | None = None, force: bool = False, stages: list[str] | None = None,
             root: str | None = None, stage_timeout_s: float = DEFAULT_STAGE_TIMEOUT_S) -> dict[str, Any]:
    """Run the DVC stages (all, or `stages`) as tasks; see the module docstring."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.runtime import flow_run

    from lmforge.tracking import FLOW_RUN_ENV, PARENT_RUN_ENV, check_tracking_server, end_pipeline_run, \
        start_pipeline_run

    logger = get_run_logger()
    repo = Path(root or os.getcwd()).resolve()
    overrides = list(overrides or [])
    problem = check_tracking_server()
    if problem:
        raise PipelineError(f"{problem}: start it, or unset MLFLOW_TRACKING_URI to log to the local store")
    order, _, metrics_files = dvc_stages(repo)
    unknown = [name for name in (stages or []) if name not in order]
    if unknown:
        raise PipelineError(f"unknown stage(s) {', '.join(unknown)}: dvc.yaml has {', '.join(order)}")
    selected = [name for name in order if stages is None or name in stages]
    hydra = parse_overrides(overrides, repo / "params.yaml") if overrides else []
    if hydra:
        from dvc.utils.hydra import apply_overrides

        apply_overrides(repo / "params.yaml", hydra)
        logger.info("params.yaml overrides applied: %s", ", ".join(overrides))

    flow_run_id = str(flow_run.id or "")
    run_id, experiment_id = start_pipeline_run(repo, tags={
        "lmforge.prefect_flow_run_id": flow_run_id, "lmforge.overrides": json.dumps(overrides),
        "lmforge.force": str(force),
    })
    url = mlflow_run_url(run_id, experiment_id)
    logger.info("MLflow run `pipeline` %s: %s", run_id, url)
    env = {PARENT_RUN_ENV: run_id, FLOW_RUN_ENV: flow_run_id}
    results: list[dict[str, Any]] = []
    experiment = None
    tracking: dict[str, str | None] = {"failed": None}  # the first failure of the flow's own MLflow calls
    try:
        changed = set(order) if force else dvc_changed(repo)
        upstream_ran = False
        for name in selected:
            stage_task = run_stage.with_options(
                name=name, task_run_name=name, retries=RETRIED_STAGES.get(name, 0),
                retry_delay_seconds=RETRY_DELAYS_S, timeout_seconds=stage_timeout_s + 120,
            )
            known_hit = not force and not upstream_ran and name not in changed
            try:
                result = stage_task(name, str(repo), force, env, known_hit, stage_timeout_s)
            except BaseException:
                _tag(repo, run_id, {f"stage.{name}": "failed"}, tracking)
                raise
            results.append(result)
            upstream_ran = upstream_ran or result["status"] == "ran"
            _tag(repo, run_id, {f"stage.{name}": result["status"], f"stage.{name}.seconds": f"{result['seconds']:.2f}"},
                 tracking)
        if overrides:
            experiment = _exp_save(repo, overrides, f"flow-{flow_run.name or flow_run_id[:8]}", logger)
    except BaseException as exc:
        outcome = f"failed ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        _publish(create_markdown_artifact, results, repo, metrics_files, run_id, url, overrides, outcome, experiment)
        _end(end_pipeline_run, repo, run_id, "FAILED", tracking)
        raise
    failures = [r for r in results if r["logging_failed"]]
    if tracking["failed"]:
        failures.append({"stage": "pipeline (parent run)", "logging_failed": tracking["failed"]})
    outcome = "succeeded" if not failures else "stages done, MLflow logging failed"
    metrics = _publish(create_markdown_artifact, results, repo, metrics_files, run_id, url, overrides, outcome,
                       experiment)
    _end(end_pipeline_run, repo, run_id, "FINISHED" if not failures else "FAILED", tracking)
    if failures:
        uri = os.environ.get("MLFLOW_TRACKING_URI", "(local store)")
        raise PipelineError(
            f"MLflow logging failed in stage(s) {', '.join(r['stage'] for r in failures)} "
            f"(MLFLOW_TRACKING_URI={uri}); their outputs are on disk and in dvc.lock:\n"
            + "\n".join(r["logging_failed"] for r in failures)
        )
    return {"mlflow_run_id": run_id, "mlflow_url": url, "stages": results, "metrics": metrics,
            "experiment": experiment}


def _tracking_failed(tracking: dict[str, str | None], what: str, exc: Exception) -> None:
    """Remember the first failure of the flow's own MLflow calls: later ones are skipped (no
    minutes of retries per call against a server that is gone); the flow reports it at the end."""
    from lmforge.tracking import LOGGING_FAILED_MARKER

    uri = os.environ.get("MLFLOW_TRACKING_URI", "(local store)")
    tracking["failed"] = f"{LOGGING_FAILED_MARKER}: {what}: {str(exc).splitlines()[0] if str(exc) else exc!r} " \
                         f"(MLFLOW_TRACKING_URI={uri})"
    get_run_logger().warning(tracking["failed"])


def _tag(repo: Path, run_id: str, tags: Mapping[str, str], tracking: dict[str, str | None]) -> None:
    from mlflow.tracking import MlflowClient

    from lmforge.tracking import tracking_uri

    if tracking["failed"]:
        return
    try:
        client = MlflowClient(tracking_uri(repo))
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
    except Exception as exc:  # noqa: BLE001 - a tracking outage must not stop the stages
        _tracking_failed(tracking, "tagging the pipeline run", exc)


def _end(end_pipeline_run: Any, repo: Path, run_id: str, status: str, tracking: dict[str, str | None]) -> None:
    if tracking["failed"]:
        return
    try:
        end_pipeline_run(repo, run_id, status)
    except Exception as exc:  # noqa: BLE001
        _tracking_failed(tracking, "closing the pipeline run", exc)


def _publish(create: Any, results: list[dict[str, Any]], repo: Path, metrics_files: Mapping[str, list[str]],
             run_id: str, url: str, overrides: list[str], outcome: str, experiment: str | None) -> dict:
    metrics = read_metrics(repo, metrics_files)
    create(markdown=summary_markdown(results, metrics, run_id, url, overrides, outcome, experiment),
           key=SUMMARY_KEY, description=f"lmforge pipeline: {outcome}")
    return metrics


def _exp_save(repo: Path, overrides: list[str], name: str, logger: Any) -> str | None:
    """Record the workspace (params with the overrides, dvc.lock, outputs) as the DVC experiment
    `name` (`dvc exp save`; it then shows in `dvc exp show`)."""
    result = subprocess.run([sys.executable, "-m", "dvc", "exp", "save", "-n", name], cwd=repo,
                            env=_stage_env({}), capture_output=True, text=True)
    if result.returncode != 0:
        logger.warning("dvc exp save failed (the run is done; params.yaml keeps the overrides): %s",
                       (result.stderr or result.stdout).strip().splitlines()[-1:])
        return None
    logger.info("overrides %s recorded as DVC experiment %s (dvc exp show)", overrides, name)
    return name


# ----------------------------------------------------------------------------------------- CLI


def check_prefect_api(timeout: float = 5.0) -> str | None:
    """None when PREFECT_API_URL is unset (temporary local server) or answers; else why not."""
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        return None
    import httpx

    try:
        response = httpx.get(url.rstrip("/") + "/health", timeout=timeout)
    except httpx.HTTPError as exc:
        return f"the Prefect server at PREFECT_API_URL={url} does not answer ({type(exc).__name__})"
    if response.status_code != 200:
        return f"the Prefect server at PREFECT_API_URL={url} answered HTTP {response.status_code} on /health"
    return None


def nightly_deployment(cron: str, root: str | None = None) -> Any:
    """The deployment `nightly` of the flow, on a cron schedule (what `serve` serves)."""
    return pipeline.to_deployment(
        name=DEPLOYMENT_NAME, cron=cron, parameters={"root": root} if root else None,
        description="The lmforge pipeline on a schedule: DVC reruns what changed.", tags=["lmforge"],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=FLOW_NAME)
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="run the pipeline once")
    run_p.add_argument("-S", "--set-param", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="param override, as in `dvc exp run -S` (repeatable)")
    run_p.add_argument("--force", action="store_true", help="rerun the stages even when DVC has them cached")
    run_p.add_argument("--stages", default=None, help="comma-separated stages to run (default: all)")
    run_p.add_argument("--stage-timeout", type=float, default=DEFAULT_STAGE_TIMEOUT_S, help="seconds per stage")
    serve_p = sub.add_parser("serve", help=f"serve the deployment `{DEPLOYMENT_NAME}` on a cron schedule")
    serve_p.add_argument("--cron", default="0 3 * * *", help='cron schedule (default "0 3 * * *")')
    args = parser.parse_args(argv)
    for key, value in (("DO_NOT_TRACK", "1"), ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
                       ("MLFLOW_DISABLE_TELEMETRY", "true"), ("DVC_NO_ANALYTICS", "1"),
                       # a tracking server gone mid-run costs seconds, not MLflow's minutes of retries
                       ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"), ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")):
        os.environ.setdefault(key, value)
    problem = check_prefect_api()
    if problem:
        print(f"error: {problem}: start it (`prefect server start`) or unset PREFECT_API_URL to use a "
              "temporary local server", file=sys.stderr)
        return 2
    if args.command == "serve":
        from prefect import serve

        serve(nightly_deployment(args.cron))
        return 0
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    state = pipeline(overrides=args.overrides, force=args.force, stages=stages, stage_timeout_s=args.stage_timeout,
                     return_state=True)
    if state.is_completed():
        result = state.result()
        for r in result["stages"]:
            print(f"{r['stage']:<14} {r['status']:<20} {r['seconds']:7.1f} s")
        print(f"MLflow run pipeline: {result['mlflow_url']}")
        return 0
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - the flow's error, printed first and plainly
        print(f"error: {exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
