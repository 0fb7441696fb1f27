"""The flow's summary: the metrics files dvc.yaml lists, read into numbers, the markdown artifact
`lmforge-pipeline-summary` (the model against its baselines first, then the stages, the MLflow links
and every stage's figures collapsed), and the same on the parent `pipeline` MLflow run (its figures,
key params, and a link to the run that produced each stage's outputs), redacted."""

from __future__ import annotations

import html
import json
import math
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import get_run_logger

from lmforge.core.numbers import human
from lmforge.core.redact import redact
from lmforge.core.verdict import majority_warning

if TYPE_CHECKING:
    from lmforge.track.pipeline_run import PipelineRun

SUMMARY_KEY = "lmforge-pipeline-summary"


@dataclass(frozen=True)
class Figure:
    """A headline figure: its label, the stage whose metrics file has it, its (flattened) key, and
    its baselines as (name, key) in the same file; `exp`: the baselines are entropies (nats/token)
    and the figure a perplexity, so exp(baseline) is shown."""

    label: str
    stage: str
    key: str
    baselines: tuple[tuple[str, str], ...] = ()
    exp: bool = False


_UNIGRAM_EVAL = (("unigram", "baselines.unigram_entropy"),)
_UNIGRAM_PRETRAIN = (("unigram", "unigram_entropy"),)
# What evaluate (reports/metrics.json; an SFT run has sft_* keys instead of accuracy and F1),
# pretrain (reports/pretrain/metrics.json) and finetune (reports/finetune/metrics.json) write.
HEADLINE = (
    Figure("test accuracy", "evaluate", "accuracy",
           (("majority class", "baselines.majority_accuracy"), ("bag of words", "baselines.bag_of_words_accuracy"),
            ("from scratch", "baselines.scratch_accuracy"))),
    Figure("test macro F1", "evaluate", "macro_f1",
           (("majority class", "baselines.majority_macro_f1"), ("bag of words", "baselines.bag_of_words_macro_f1"),
            ("from scratch", "baselines.scratch_macro_f1"))),
    # the fine-tuned model minus the same recipe from random weights (evaluate.scratch_baseline)
    Figure("pretraining gain (test accuracy)", "evaluate", "pretraining_gain.accuracy"),
    Figure("pretraining gain (test macro F1)", "evaluate", "pretraining_gain.macro_f1"),
    Figure("SFT exact match", "evaluate", "sft_exact_match"),
    Figure("SFT token F1", "evaluate", "sft_token_f1"),
    Figure("SFT ROUGE-L", "evaluate", "sft_rouge_l"),
    Figure("val loss (nats/token)", "evaluate", "val_loss", _UNIGRAM_EVAL),
    Figure("val perplexity", "evaluate", "perplexity", _UNIGRAM_EVAL, exp=True),
    Figure("SFT model val perplexity", "evaluate", "sft_val_perplexity", _UNIGRAM_EVAL, exp=True),
    Figure("val loss at the end of pretraining", "pretrain", "val_loss", _UNIGRAM_PRETRAIN),
    Figure("val perplexity at the end of pretraining", "pretrain", "val_perplexity", _UNIGRAM_PRETRAIN, exp=True),
    Figure("pretraining tokens/s", "pretrain", "tokens_per_s"),
    Figure("fine-tuning best val loss", "finetune", "best_val_loss"),
    Figure("fine-tuning best val accuracy", "finetune", "best_val_accuracy"),
)


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


# ----------------------------------------------------------------------------------- MLflow links


@dataclass(frozen=True)
class MlflowLinks:
    """Where the pipeline's MLflow run is shown: its page, the experiment's runs table (the UI's
    machine-learning view), and, for a local store, the command that serves it at LOCAL_UI."""

    run_id: str
    run: str
    runs: str
    serve: str | None = None  # None: a tracking server already serves them

    def __str__(self) -> str:
        return self.run if self.serve is None else f"{self.run} (local store: `{self.serve}` first)"


def mlflow_links(run_id: str, experiment_id: str, uri: str, root: Path) -> MlflowLinks:
    """The links for tracking URI `uri` (redacted, in the UI's runs view: lmforge.track.ui). An http(s)
    URI is the server's UI; anything else is a store `mlflow ui` serves, the repository's own
    `sqlite:///<root>/mlflow.db` from its root."""
    from lmforge.track.ui import ui_link

    serve = None
    if not uri.startswith(("http://", "https://")):
        default = f"sqlite:///{root.resolve()}/mlflow.db"
        serve = (f"cd {shlex.quote(str(root.resolve()))} && mlflow ui --backend-store-uri sqlite:///mlflow.db"
                 if uri == default else f"mlflow ui --backend-store-uri {shlex.quote(uri)}")
    return MlflowLinks(run_id=run_id, run=ui_link(uri, experiment_id, run_id), runs=ui_link(uri, experiment_id),
                       serve=redact(serve) if serve else None)


def mlflow_run_links(run_id: str, experiment_id: str, root: Path) -> MlflowLinks:
    """mlflow_links for the tracking URI in use (MLFLOW_TRACKING_URI, else the repository's store)."""
    from lmforge.track.store import tracking_uri

    return mlflow_links(run_id, experiment_id, tracking_uri(root), root)


# ------------------------------------------------------------------------------------- markdown


def _exp(value: float) -> float:
    try:
        return math.exp(value)
    except OverflowError:
        return math.inf


def headline_rows(metrics: Mapping[str, Mapping[str, float]]) -> list[tuple[str, str, str, str]]:
    """(figure, the model's value, its baselines, stage) for each HEADLINE figure the metrics have."""
    rows = []
    for figure in HEADLINE:
        values = metrics.get(figure.stage) or {}
        if figure.key not in values:
            continue
        baselines = [f"{name} {human(_exp(values[key]) if figure.exp else values[key])}"
                     for name, key in figure.baselines if key in values]
        rows.append((figure.label, human(values[figure.key]), " · ".join(baselines) or "—", figure.stage))
    return rows


def baseline_warning(metrics: Mapping[str, Mapping[str, float]]) -> str | None:
    """The evaluate stage's warning, from its metrics: test accuracy at or below the majority class."""
    accuracy = HEADLINE[0]  # test accuracy, beside its majority-class baseline
    values = metrics.get(accuracy.stage) or {}
    return majority_warning(values.get(accuracy.key), values.get(dict(accuracy.baselines)["majority class"]))


def _stats_block(stage: str, values: Mapping[str, float]) -> str:
    """One stage's figures as an HTML table in a <details> block, on consecutive lines: a markdown
    renderer takes it as one raw HTML block (Prefect's UIs sanitize it and keep details/summary)."""
    rows = "".join(f'<tr><td>{html.escape(key)}</td><td align="right">{html.escape(human(value))}</td></tr>'
                   for key, value in values.items())
    return (f"<details><summary>{html.escape(stage)} ({len(values)} figures)</summary>\n"
            f"<table><tr><th>figure</th><th>value</th></tr>{rows}</table>\n</details>")


def summary_markdown(results: list[dict[str, Any]], metrics: Mapping[str, Mapping[str, float]],
                     links: MlflowLinks, overrides: list[str], outcome: str, experiment: str | None,
                     promotion: str | None = None) -> str:
    """The artifact's markdown: the headline table (the model against its baselines), the promote
    stage's decision, the MLflow links, the stages (ran or cache hit, seconds), then every stage's
    figures, collapsed."""
    lines = [f"# lmforge pipeline: {outcome}", ""]
    headline = headline_rows(metrics)
    if headline:
        lines += ["| figure | model | baseline | from stage |", "|---|---:|---|---|"]
        lines += [f"| {figure} | **{value}** | {baselines} | {stage} |" for figure, value, baselines, stage in headline]
    else:
        lines.append("No model figures yet: evaluate, pretrain and finetune have not written their metrics.")
    lines.append("")
    warning = baseline_warning(metrics)
    if warning:
        lines += [f"> **Warning:** {warning}", ""]
    if promotion:
        lines += [f"**Promotion:** {promotion}", ""]
    if links.serve is None:
        lines.append(f"MLflow: [run `pipeline` {links.run_id}]({links.run}) · [the experiment's runs]({links.runs})")
    else:
        lines.append(f"MLflow (local store): `{links.serve}`, then open {links.runs} "
                     f"(this run: {links.run})")
    lines += [
        "",
        f"Overrides: {', '.join(f'`{o}`' for o in overrides) if overrides else 'none'}"
        + (f" (DVC experiment `{experiment}`)" if experiment else ""),
        "",
        "## Stages",
        "",
        "| stage | result | seconds |",
        "|---|---|---:|",
    ]
    lines += [f"| {r['stage']} | {r['status']} | {r['seconds']:.1f} |" for r in results] or ["| (none finished) | | |"]
    stats = [_stats_block(stage, values) for stage, values in metrics.items() if values]
    if stats:
        lines += ["", "## Every stage's figures", ""]
        for block in stats:
            lines += [block, ""]
    return redact("\n".join(lines).rstrip("\n") + "\n")  # the URL, the overrides and the outcome may carry one


def promotion_line(repo: Path, results: list[dict[str, Any]]) -> str | None:
    """The promote stage's decision in one line (reports/promotion_decision.json), None without one.
    When promote did not run in this flow (`results`), the file is an earlier run's: said so, with
    that run and its time, so an old decision never reads as this flow's."""
    from lmforge.core.paths import PROMOTION_DECISION
    from lmforge.track.promotion import decision_line

    try:
        record = json.loads((repo / PROMOTION_DECISION).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict):
        return None
    if any(r["stage"] == "promote" and r["status"] == "ran" for r in results):
        return decision_line(record)
    made = ", ".join(f"{what} {value}" for what, value in (("promote run", f"`{record.get('run_id')}`"),
                                                           ("at", record.get("at"))) if value and value != "`None`")
    return f"not decided in this flow; an earlier run's ({made or 'run unknown'}): {decision_line(record)}"


def publish_summary(results: list[dict[str, Any]], repo: Path, metrics_files: Mapping[str, list[str]],
                    links: MlflowLinks, overrides: list[str], outcome: str,
                    experiment: str | None) -> dict[str, dict[str, float]]:
    """Publish the summary artifact of this flow run; returns the metrics it shows."""
    from prefect.artifacts import create_markdown_artifact

    metrics = read_metrics(repo, metrics_files)
    try:
        create_markdown_artifact(markdown=summary_markdown(results, metrics, links, overrides, outcome, experiment,
                                                           promotion_line(repo, results)),
                                 key=SUMMARY_KEY, description=redact(f"lmforge pipeline: {outcome}"))
    except Exception as exc:  # noqa: BLE001 - a lost summary must not hide the run's own outcome or error
        get_run_logger().warning("summary artifact %s not published: %s", SUMMARY_KEY, redact(str(exc)))
    return metrics


# ------------------------------------------------------------------------------ the parent run


def parent_figures(metrics: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Every DVC metric as `<stage>/<key>`: the names the stages' own runs use, so one MLflow chart
    holds a figure from the stage runs and from the pipeline runs alike."""
    return {f"{stage}/{key}": value for stage, values in metrics.items() for key, value in values.items()
            if math.isfinite(value)}


def key_params(repo: Path, overrides: list[str]) -> dict[str, str]:
    """KEY_PARAMS and every overridden key, with their values in params.yaml as the stages read it."""
    from lmforge.core.params import flatten, load_params
    from lmforge.track.ui import KEY_PARAMS

    flat = flatten(load_params(repo / "params.yaml").model_dump(mode="json"))
    keys = list(KEY_PARAMS) + [o.partition("=")[0].strip() for o in overrides]
    return {key: redact(json.dumps(flat[key]) if isinstance(flat[key], (list, dict)) else str(flat[key]))
            for key in dict.fromkeys(keys) if key in flat}


def parent_description(order: list[str], results: list[dict[str, Any]], producing: Mapping[str, str | None],
                       metrics: Mapping[str, Mapping[str, float]], experiment_id: str, outcome: str) -> str:
    """The parent run's description (markdown): the headline, then each stage with what it did in this
    flow and a link to the run that produced its outputs (UI-relative: right on any host)."""
    lines = [f"lmforge pipeline: {outcome}.", ""]
    headline = headline_rows(metrics)
    if headline:
        lines += ["| figure | model | baseline |", "|---|---:|---|"]
        lines += [f"| {figure} | {value} | {baselines} |" for figure, value, baselines, _ in headline]
        lines.append("")
    status = {r["stage"]: r["status"] for r in results}
    from lmforge.track.ui import ui_page

    lines += ["| stage | in this flow | run that produced its outputs |", "|---|---|---|"]
    for stage in order:
        run_id = producing.get(stage)
        link = f"[{run_id[:8]}]({ui_page(experiment_id, run_id)})" if run_id else "none recorded"
        lines.append(f"| {stage} | {status.get(stage, 'not run')} | {link} |")
    return redact("\n".join(lines) + "\n")


def record_parent_run(run: PipelineRun, repo: Path, order: list[str], results: list[dict[str, Any]],
                      metrics_files: Mapping[str, list[str]], overrides: list[str], outcome: str) -> None:
    """Put the headline figures, the key params and the stages' producing runs on the parent run:
    tags `stage.<name>.run_id` and a description that links them (ran or cached alike)."""
    metrics = read_metrics(repo, metrics_files)
    producing = run.producing_runs(order) or {}
    run.tag({f"stage.{stage}.run_id": run_id for stage, run_id in producing.items() if run_id})
    try:
        params = key_params(repo, overrides)
    except Exception:  # noqa: BLE001 - a params.yaml the stages rejected: the run keeps its figures
        params = {}
    run.record(parent_figures(metrics), params,
               parent_description(order, results, producing, metrics, run.experiment_id, outcome))
