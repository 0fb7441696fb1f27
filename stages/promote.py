"""DVC stage `promote`: the model evaluate scored (the challenger) against the registry's `champion`
on the same test set -> reports/promotion.json (numbers, a DVC metric), reports/promotion_decision.json
(the words), the aliases `champion`/`challenger` and the decision on both versions' tags.

The champion is re-scored on this run's test set unless it has a score recorded on the same one.
Without tracking nothing can be decided: the files say so, one warning, and the pipeline goes on.
A champion whose files the artifact store cannot give is kept and nothing is decided: the files
(and both versions' tags) say why, then the stage fails with that line. The decision metric is read
strictly: a finite number in its range, or one error naming reports/metrics.json and the key,
before anything is written.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from lmforge.core import paths
from lmforge.core.stage import run_stage
from lmforge.core.io import write_json
from lmforge.core.errors import LmforgeError
from lmforge.evaluate.metrics import model_scores, score_classifier, score_sft
from lmforge.model.export import WEIGHTS
from lmforge.finetune.tuning import check_labels, load_finetuned, read_examples
from lmforge.track.lineage import content_hash
from lmforge.core.params import Params, load_params
from lmforge.track.promotion import Decision, checked_score, exported_files, promote, undecided
from lmforge.track.runs import stage_run, tracking_guard
from lmforge.track.store import tracking_uri
from lmforge.core.paths import WEIGHTS_TAG

log = logging.getLogger("stages.promote")


def scoring_knobs(params: Params) -> dict[str, object]:
    """What, beyond the test file, changes a score: a stored score counts only when these match."""
    ft, cfg = params.finetune, params.evaluate
    knobs: dict[str, object] = {"task": ft.task}
    if ft.task == "sft":
        knobs |= {"max_examples": cfg.sft_max_examples, "max_new_tokens": cfg.sft_max_new_tokens,
                  "seed": params.generate.seed}
    return knobs


def score_version(params: Params, metric: str, version: str) -> float:
    """`metric` of registered version `version` on this run's test set, as evaluate scores it."""
    ft = params.finetune
    rows = read_examples(Path(ft.test_file), ft, ft.task)
    with tempfile.TemporaryDirectory(prefix="lmforge-champion-") as tmp:
        model = load_finetuned(exported_files(paths.FINETUNED_MODEL, version, Path(tmp)))
        if model.task != ft.task:
            raise LmforgeError(f"it is a {model.task} model and this run's task is {ft.task}")
        if ft.task == "classify":
            check_labels(rows, model.labels, "label", ft.test_file)
            report = score_classifier(model, [r["text"] for r in rows], [r["label"] for r in rows])
        else:
            rows = rows[: params.evaluate.sft_max_examples]
            report, _ = score_sft(model, [r["prompt"] for r in rows], [r["response"] for r in rows],
                                  params.evaluate.sft_max_new_tokens, params.generate.seed)
    return model_scores(ft.task, report)[metric]


def evaluated_score(path: Path, metric: str, task: str) -> float:
    """The challenger's `metric` from evaluate's `path`: a finite number in the metric's range, or
    one LmforgeError naming the file and the key (the other figures are not the decision's)."""
    rerun = "rerun evaluate (`dvc repro -f evaluate`)"
    if not path.is_file():
        raise LmforgeError(f"{path} is missing, so there is no {metric} to decide on: {rerun}")
    try:
        evaluated = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise LmforgeError(f"{path} is not valid JSON ({exc}), so there is no {metric} to decide on: {rerun}") from None
    if not isinstance(evaluated, dict) or metric not in evaluated:
        raise LmforgeError(f"{path} has no {metric!r} (promote.metric.{task}): "
                           f"rerun evaluate for task {task}, or pick one of its figures")
    try:
        return checked_score(evaluated[metric], metric, str(path))
    except LmforgeError as exc:
        raise LmforgeError(f"{exc}: no decision can rest on it; {rerun}, and check the model it scored") from None


def main() -> None:
    params = load_params()
    task, test_file = params.finetune.task, Path(params.finetune.test_file)
    metric = params.promote.metric_for(task)
    challenger_score = evaluated_score(paths.REPORTS / "metrics.json", metric, task)
    test_set = content_hash(test_file)  # the file as it is now; for a file this is DVC's md5 too
    knobs = scoring_knobs(params)
    decision: Decision | None = None
    with stage_run("promote", {"promote": params.promote}, inputs=[paths.FINETUNED, test_file,
                                                                   paths.REPORTS / "metrics.json"]) as run:
        why_not = "tracking is down (see the warning above): rerun `dvc repro -f promote` once it is up"
        if not run.failed:
            with tracking_guard(run):
                from mlflow.tracking import MlflowClient

                version = run.find_model_version(paths.FINETUNED_MODEL, WEIGHTS_TAG,
                                                 content_hash(paths.FINETUNED / WEIGHTS))
                if version is not None:
                    decision = promote(MlflowClient(tracking_uri()), paths.FINETUNED_MODEL, version, challenger_score,
                                       metric, params.promote.min_delta, test_set, knobs,
                                       lambda v: score_version(params, metric, v), run_id=run.run_id)
            if decision is None and not run.failed:  # the store answers, the model is not in it
                why_not = ("the fine-tuned model is not registered (its finetune run had no tracking): "
                           "rerun finetune with tracking up")
        decision = decision or undecided(why_not, metric, params.promote.min_delta, challenger_score, test_set, knobs)
        write_json(paths.PROMOTION, decision.numbers())
        write_json(paths.PROMOTION_DECISION, decision.record())
        run.log_metrics(decision.numbers())
        run.set_tags({"lmforge.promotion": decision.line()[:5000]})
        run.describe(f"Promote on `{metric}` (min_delta {params.promote.min_delta:g}), test set "
                     f"{test_file} ({test_set}): {decision.line()}")
        log.info("%s", decision.line())
        if decision.fails_stage:  # after the files and the run say why: the report and the registry agree
            raise LmforgeError(decision.line())


if __name__ == "__main__":
    run_stage("promote", main)
