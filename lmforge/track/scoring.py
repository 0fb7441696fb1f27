"""Scores the registry's decisions rest on: the `candidate` alias on the version evaluate scored (its
figures as tags), the challenger's score read strictly from evaluate's metrics.json, and a registered
version re-scored on this run's test set as evaluate scores it (promote's champion).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from lmforge.core import paths
from lmforge.core.digests import content_hash
from lmforge.core.errors import LmforgeError
from lmforge.core.params import Params
from lmforge.core.paths import WEIGHTS_TAG
from lmforge.model.files import WEIGHTS
from lmforge.track.promotion import checked_score, exported_files
from lmforge.track.run_handle import StageRun


def tag_candidate(run: StageRun, metrics: dict[str, Any]) -> str | None:
    """Point the `candidate` alias at the registered version of the weights evaluated here, and
    attach the figures; None when none is registered (or tracking is down)."""
    version = run.find_model_version(paths.FINETUNED_MODEL, WEIGHTS_TAG, content_hash(paths.FINETUNED / WEIGHTS))
    if version is None:
        return None
    run.set_model_alias(paths.FINETUNED_MODEL, paths.CANDIDATE_ALIAS, version)
    # The fine-tuned model's own test figures only: val_loss/perplexity are the pretrained LM's.
    own = {key: value for key, value in metrics.items()
           if (key in ("accuracy", "macro_f1", "weighted_f1") or key.startswith("sft_")) and isinstance(value, (int, float))}
    tags = {f"eval.{key}": f"{value:.6g}" for key, value in own.items()}
    run.tag_model_version(paths.FINETUNED_MODEL, version, {**tags, "eval.run_id": str(run.run_id)})
    run.set_tags({"lmforge.evaluated_model": f"models:/{paths.FINETUNED_MODEL}/{version}"})
    return version


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
    # Here, not at the top: they import torch and sklearn (seconds), and promote scores a champion
    # only when it has no score on this test set; evaluate has them imported already.
    from lmforge.evaluate.metrics import model_scores, score_classifier, score_sft
    from lmforge.finetune.examples import check_labels, read_examples
    from lmforge.finetune.inference import load_finetuned

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
