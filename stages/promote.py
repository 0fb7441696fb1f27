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

import logging
from pathlib import Path

from lmforge.core import paths
from lmforge.core.digests import content_hash
from lmforge.core.errors import LmforgeError
from lmforge.core.io import write_json
from lmforge.core.params import load_params
from lmforge.core.paths import WEIGHTS_TAG
from lmforge.core.stage import run_stage
from lmforge.model.files import WEIGHTS
from lmforge.track.promotion import Decision, promote, undecided
from lmforge.track.run_handle import tracking_guard
from lmforge.track.runs import stage_run
from lmforge.track.scoring import evaluated_score, score_version, scoring_knobs
from lmforge.track.store import tracking_uri

log = logging.getLogger("stages.promote")


def main() -> None:
    params = load_params()
    task, test_file = params.finetune.task, Path(params.finetune.test_file)
    metric = params.promote.metric_for(task)
    challenger_score = evaluated_score(paths.REPORTS / "metrics.json", metric, task)
    test_set = content_hash(test_file)  # the file as it is now; for a file this is DVC's md5 too
    knobs = scoring_knobs(params)
    decision: Decision | None = None
    with stage_run("promote", {"promote": params.promote}, inputs=[paths.FINETUNED, test_file,
                                                                   paths.REPORTS / "metrics.json"],
                   scored=params) as run:
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
