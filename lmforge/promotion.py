"""Champion and challenger: whether the newly fine-tuned model (the challenger) replaces the one in
use (alias `champion` of lmforge-finetune), and rollback. The decision is a pure function; the
registry (aliases, version tags) is read and written at the edge, through an MlflowClient.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmforge import paths
from lmforge.errors import LmforgeError
from lmforge.params import LOWER_IS_BETTER

# Version tags. A version's own score on a test set, and which test set (a stored score is reused
# only for the same file and the same scoring knobs).
SCORE_TAG = "promote.score.{metric}"
TEST_SET_TAG = "promote.test_set_md5"
SCORED_WITH_TAG = "promote.scored_with"
DECISION_TAG = "promote.decision"  # the whole decision record as JSON, on both versions compared
# Set on a version when it becomes champion: the champion it replaced (rollback goes back to it;
# each champion's tag points at the one before, so the chain is the history).
PREVIOUS_CHAMPION_TAG = "lmforge.previous_champion"
ROLLED_BACK_TAG = "lmforge.rolled_back"  # on the champion rollback moved away from: who, when, why
RESTORED_TAG = "lmforge.restored"  # on the version rollback made champion again
LINEAGE_PREFIX = "lineage."
# Floating-point slack: 0.30 - 0.29 is 0.00999...98, which must count as a gain of 0.01.
EPSILON = 1e-12


def improvement(metric: str, challenger: float, champion: float) -> float:
    """How much better the challenger is on `metric` (negative: worse), in the metric's units."""
    return champion - challenger if metric in LOWER_IS_BETTER else challenger - champion


def decide(metric: str, challenger: float, champion: float | None, min_delta: float) -> tuple[bool, float | None, str]:
    """(promote?, improvement, why). No champion score (none yet, or it cannot be scored on this test
    set): the challenger wins."""
    if champion is None:
        return True, None, "no comparable champion: the challenger becomes champion"
    delta = improvement(metric, challenger, champion)
    comparison = f"{metric} {challenger:.4g} vs champion's {champion:.4g} (improvement {delta:+.4g}, min_delta {min_delta:g})"
    if delta >= min_delta - EPSILON:
        return True, delta, f"challenger wins: {comparison}"
    return False, delta, f"champion stays: {comparison}"


@dataclass(frozen=True)
class Contender:
    """One side of the comparison: a registered version, its score on this test set, its data."""

    version: str
    score: float | None
    rescored: bool = False  # scored in this run (False: its stored score on the same test set)
    lineage: dict[str, str] = field(default_factory=dict)
    note: str = ""  # why it has no score, when it has none


@dataclass(frozen=True)
class Decision:
    """What promote decided; `decided` False when it could not (tracking down, model unregistered)."""

    decided: bool
    promoted: bool
    reason: str
    metric: str
    min_delta: float
    challenger_score: float
    test_set_md5: str
    scored_with: dict[str, Any]
    challenger: Contender | None = None
    champion: Contender | None = None  # the champion before the decision (None: there was none)
    delta: float | None = None
    run_id: str | None = None

    def numbers(self) -> dict[str, float | int]:
        """reports/promotion.json (a DVC metric: numbers only; the words are in the decision file)."""
        out: dict[str, float | int] = {"decided": int(self.decided), "promoted": int(self.promoted),
                                       "challenger_score": self.challenger_score, "min_delta": self.min_delta}
        if self.challenger is not None:
            out["challenger_version"] = int(self.challenger.version)
        if self.champion is not None:
            out["champion_version"] = int(self.champion.version)
            out["champion_rescored"] = int(self.champion.rescored)
            if self.champion.score is not None:
                out["champion_score"] = self.champion.score
        if self.delta is not None:
            out["delta"] = self.delta
        return out

    def record(self) -> dict[str, Any]:
        """Everything, words included: reports/promotion_decision.json and the versions' DECISION_TAG."""
        return asdict(self)

    def line(self) -> str:
        return decision_line(self.record())


def decision_line(record: Mapping[str, Any]) -> str:
    """A decision record (Decision.record, reports/promotion_decision.json) in one line for people:
    the stage's log, its MLflow run, the flow's summary."""
    if not record.get("decided"):
        return f"no decision: {record.get('reason')}"
    version = (record.get("challenger") or {}).get("version")
    verdict = f"v{version} promoted to `champion`" if record.get("promoted") else f"v{version} stays `challenger`"
    if record.get("promoted") is False and (record.get("champion") or {}).get("version") is None:
        verdict = f"v{version} is `champion`"
    return f"{verdict}: {record.get('reason')}"


def undecided(reason: str, metric: str, min_delta: float, challenger_score: float, test_set_md5: str,
              scored_with: dict[str, Any]) -> Decision:
    return Decision(False, False, reason, metric, min_delta, challenger_score, test_set_md5, scored_with)


# ----------------------------------------------------------------------------------- the registry


def lineage_of(tags: Mapping[str, str]) -> dict[str, str]:
    """A version's `lineage.*` tags (training_run.record_lineage), without the prefix."""
    return {key[len(LINEAGE_PREFIX):]: value for key, value in tags.items() if key.startswith(LINEAGE_PREFIX)}


def aliases(client: Any, name: str) -> dict[str, str]:
    """alias -> version of registered model `name` ({} when it is not registered)."""
    from mlflow.exceptions import MlflowException

    try:
        return {alias: str(version) for alias, version in client.get_registered_model(name).aliases.items()}
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return {}
        raise


def stored_score(tags: Mapping[str, str], metric: str, test_set_md5: str, scored_with: Mapping[str, Any]) -> float | None:
    """A version's recorded score on this same test set, scored the same way; None otherwise."""
    if tags.get(TEST_SET_TAG) != test_set_md5 or tags.get(SCORED_WITH_TAG) != json.dumps(scored_with, sort_keys=True):
        return None
    value = tags.get(SCORE_TAG.format(metric=metric))
    return float(value) if value is not None else None


def promote(client: Any, name: str, challenger_version: str, challenger_score: float, metric: str, min_delta: float,
            test_set_md5: str, scored_with: dict[str, Any], rescore: Callable[[str], float],
            run_id: str | None = None) -> Decision:
    """Compare the challenger with the champion and move the aliases: the champion re-scored with
    `rescore(version)` (on this run's test set) unless it has a stored score on the same one. A
    champion `rescore` cannot score (LmforgeError: another task, other labels, no exported files)
    is not comparable and the challenger wins, with that reason. Records the decision on both
    versions and returns it."""
    current = aliases(client, name).get(paths.CHAMPION_ALIAS)
    challenger_tags = client.get_model_version(name, challenger_version).tags
    challenger = Contender(challenger_version, challenger_score, True, lineage_of(challenger_tags))
    champion: Contender | None = None
    if current is not None and current != challenger_version:
        tags = client.get_model_version(name, current).tags
        score, note = stored_score(tags, metric, test_set_md5, scored_with), ""
        rescored = score is None
        if rescored:
            try:
                score = rescore(current)
            except LmforgeError as exc:
                note = f"champion v{current} cannot be scored on this test set: {exc}"
        champion = Contender(current, score, rescored and score is not None, lineage_of(tags), note)
    common = dict(metric=metric, min_delta=min_delta, challenger_score=challenger_score, test_set_md5=test_set_md5,
                  scored_with=scored_with, challenger=challenger, champion=champion, run_id=run_id)
    if current == challenger_version:
        decision = Decision(True, False, f"v{current} is already the champion", **common)
    else:
        promoted, delta, reason = decide(metric, challenger_score, champion.score if champion else None, min_delta)
        if champion is None:
            reason = "first model: it becomes champion"
        elif champion.note:
            reason = f"{champion.note}; the challenger becomes champion"
        decision = Decision(True, promoted, reason, delta=delta, **common)
    _record(client, name, decision)
    return decision


def _record(client: Any, name: str, decision: Decision) -> None:
    """The decision on both versions (each with its own score on this test set), then the aliases."""
    record = json.dumps(decision.record(), sort_keys=True)
    for contender in (decision.challenger, decision.champion):
        if contender is None:
            continue
        tags = {DECISION_TAG: record}
        if contender.score is not None:
            tags |= {SCORE_TAG.format(metric=decision.metric): repr(contender.score),
                     TEST_SET_TAG: decision.test_set_md5,
                     SCORED_WITH_TAG: json.dumps(decision.scored_with, sort_keys=True)}
        for key, value in tags.items():
            client.set_model_version_tag(name, contender.version, key, value)
    new = decision.challenger.version
    if decision.promoted:
        if decision.champion is not None:
            client.set_model_version_tag(name, new, PREVIOUS_CHAMPION_TAG, decision.champion.version)
        client.set_registered_model_alias(name, paths.CHAMPION_ALIAS, new)
        if aliases(client, name).get(paths.CHALLENGER_ALIAS) == new:
            client.delete_registered_model_alias(name, paths.CHALLENGER_ALIAS)
    elif aliases(client, name).get(paths.CHAMPION_ALIAS) != new:
        client.set_registered_model_alias(name, paths.CHALLENGER_ALIAS, new)


def rollback(client: Any, name: str, user: str, reason: str, when: str) -> tuple[str, str]:
    """Move `champion` back to the champion before it (PREVIOUS_CHAMPION_TAG); record who, when and
    why on both versions. Returns (from version, to version)."""
    current = aliases(client, name).get(paths.CHAMPION_ALIAS)
    if current is None:
        raise LmforgeError(f"registered model {name} has no `{paths.CHAMPION_ALIAS}` alias: nothing to roll back "
                           "(the promote stage sets it on the first run with tracking)")
    previous = client.get_model_version(name, current).tags.get(PREVIOUS_CHAMPION_TAG)
    if not previous:
        raise LmforgeError(f"{name} version {current} was the first champion: there is no previous champion to roll "
                           f"back to (set the alias by hand: mlflow's set_registered_model_alias)")
    event = {"by": user, "at": when, "reason": reason}
    client.set_registered_model_alias(name, paths.CHAMPION_ALIAS, previous)
    client.set_model_version_tag(name, current, ROLLED_BACK_TAG, json.dumps(event | {"to": previous}))
    client.set_model_version_tag(name, previous, RESTORED_TAG, json.dumps(event | {"from": current}))
    return current, previous


def exported_files(name: str, version: str, destination: Path) -> Path:
    """Download version `version`'s exported directory (model.safetensors, config.json, tokenizer.json,
    logged as the model's extra files) under `destination`; returns it."""
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(destination)))
    exported = local / "extra_files"
    if not (exported / "model.safetensors").is_file():
        raise LmforgeError(f"{name} version {version} was registered without its exported files (registered by an "
                           "older lmforge), so it cannot be re-scored")
    return exported
