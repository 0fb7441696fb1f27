"""Champion and challenger: whether the newly fine-tuned model (the challenger) replaces the one in
use (alias `champion` of lmforge-finetune), rollback, and a person's promotion by hand. The decision
is a pure function; the registry (aliases, version tags) is read and written at the edge, through an
MlflowClient. Scores are finite numbers in their metric's range, wherever they are read from.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lmforge.core import paths
from lmforge.core.errors import LmforgeError
from lmforge.core.params import LOWER_IS_BETTER
from lmforge.core.paths import WEIGHTS_TAG

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
# A rolled-back version's weights are never promoted again (whatever version carries them) until a
# person promotes them by hand: PROMOTED_BY_HAND_TAG on that version, ROLLBACK_LIFTED_TAG on the
# rolled-back ones it clears (a later rollback of them removes it again).
PROMOTED_BY_HAND_TAG = "lmforge.promoted_by_hand"
ROLLBACK_LIFTED_TAG = "lmforge.rollback_lifted"
HAND_PROMOTION = "python -m flows.pipeline promote --version {version} --reason TEXT"
LINEAGE_PREFIX = "lineage."
# Floating-point slack: 0.30 - 0.29 is 0.00999...98, which must count as a gain of 0.01.
EPSILON = 1e-12


class ChampionUnavailable(LmforgeError):
    """The champion cannot be re-scored for a reason that says nothing about the model (its files
    are unreachable, or were never exported): not a beaten champion, so nothing is decided."""


def metric_range(metric: str) -> tuple[float, float]:
    """The values `metric` can take: [0, 1] for accuracy, F1 and ROUGE; >= 0 for a loss; a
    perplexity (exp of a loss) >= 1."""
    if metric.endswith("perplexity"):
        return 1.0, math.inf
    return (0.0, math.inf) if metric in LOWER_IS_BETTER else (0.0, 1.0)


def checked_score(value: Any, metric: str, where: str) -> float:
    """`value` as a score of `metric`, or one LmforgeError naming `where` it was read: a NaN or an
    infinity would win or lose every later comparison, and no JSON file can hold it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        shown = "null" if value is None else repr(value)
        raise LmforgeError(f"{where}: {metric} is {shown}, not a number")
    if not math.isfinite(value):
        shown = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
        raise LmforgeError(f"{where}: {metric} is {shown}, not a finite number")
    low, high = metric_range(metric)
    if not low <= value <= high:
        raise LmforgeError(f"{where}: {metric} is {value!r}, outside [{low:g}, {high:g}]")
    return float(value)


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
    """What promote decided; `decided` False when it could not (tracking down, model unregistered,
    champion unavailable). `fails_stage`: no decision, and the champion needs a person (its files
    are lost or were never exported): the stage fails, once its files say so."""

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
    fails_stage: bool = False
    # The registry's aliases once the decision is made (None: not read, tracking down), and when:
    # what a reader of the decision later needs, as the report evaluate wrote names only `candidate`.
    aliases: dict[str, str] | None = None
    at: str | None = None

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
    return f"{verdict}: {record.get('reason')}{aliases_note(record.get('aliases'))}"


def aliases_note(now: Mapping[str, str] | None) -> str:
    """` (aliases now: champion → v1, challenger → v2, candidate → v2)`; '' when they were not read."""
    if not now:
        return ""
    order = [paths.CHAMPION_ALIAS, paths.CHALLENGER_ALIAS, paths.CANDIDATE_ALIAS]
    named = sorted(now, key=lambda alias: (order.index(alias) if alias in order else len(order), alias))
    return " (aliases now: " + ", ".join(f"{alias} → v{now[alias]}" for alias in named) + ")"


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
    """A version's recorded score on this same test set, scored the same way; None otherwise, and
    None for a tag that is not a valid score (an older lmforge recorded NaN): re-scored instead."""
    if tags.get(TEST_SET_TAG) != test_set_md5 or tags.get(SCORED_WITH_TAG) != json.dumps(scored_with, sort_keys=True):
        return None
    value = tags.get(SCORE_TAG.format(metric=metric))
    try:
        return checked_score(float(value), metric, "tag") if value is not None else None
    except (ValueError, LmforgeError):
        return None


def rolled_back_twin(client: Any, name: str, version: str, weights: str | None) -> tuple[str, dict[str, Any]] | None:
    """(the rolled-back version, its rollback event) whose weights `version` carries (itself
    included), unless a person has promoted those weights by hand since; None when there is none."""
    for other in sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version)):
        tags = other.tags
        same = str(other.version) == version or (weights is not None and tags.get(WEIGHTS_TAG) == weights)
        if same and ROLLED_BACK_TAG in tags and ROLLBACK_LIFTED_TAG not in tags:
            try:
                event = json.loads(tags[ROLLED_BACK_TAG])
            except ValueError:  # set by hand in the MLflow UI: its words are the reason
                event = None
            return str(other.version), event if isinstance(event, dict) else {"reason": tags[ROLLED_BACK_TAG]}
    return None


def blocked_reason(version: str, twin: str, event: Mapping[str, Any]) -> str:
    """Why a challenger with rolled-back weights stays challenger, and how a person overrides it."""
    who = f"by {event.get('by')} at {event.get('at')}: {event.get('reason')}"
    what = f"v{version} was rolled back ({who})" if twin == version else \
        f"v{version} has the weights of rolled-back v{twin} ({who})"
    return f"{what}: stays challenger; to make it champion anyway: {HAND_PROMOTION.format(version=version)}"


def promote(client: Any, name: str, challenger_version: str, challenger_score: float, metric: str, min_delta: float,
            test_set_md5: str, scored_with: dict[str, Any], rescore: Callable[[str], float],
            run_id: str | None = None) -> Decision:
    """Compare the challenger with the champion and move the aliases: the champion re-scored with
    `rescore(version)` (on this run's test set) unless it has a stored score on the same one.
    - A challenger with the weights of a rolled-back version stays challenger (rolled_back_twin).
    - A champion `rescore` cannot reach (ChampionUnavailable: files lost, never exported) stays
      champion and nothing is decided (`fails_stage`).
    - A champion `rescore` cannot score otherwise (LmforgeError: another task, other labels) is not
      comparable: the challenger wins, with that reason.
    Records the decision on both versions (not when the challenger is already champion: promote runs
    on every `dvc repro`, and its tag keeps the comparison that made it champion) and returns it."""
    challenger_score = checked_score(challenger_score, metric, f"challenger v{challenger_version}")
    current = aliases(client, name).get(paths.CHAMPION_ALIAS)
    challenger_tags = client.get_model_version(name, challenger_version).tags
    challenger = Contender(challenger_version, challenger_score, True, lineage_of(challenger_tags))
    common = dict(metric=metric, min_delta=min_delta, challenger_score=challenger_score, test_set_md5=test_set_md5,
                  scored_with=scored_with, challenger=challenger, run_id=run_id)
    if current == challenger_version:  # nothing compared: the version keeps the decision that made it champion
        return _as_now(client, name, Decision(True, False, f"v{current} is already the champion", **common))
    if twin := rolled_back_twin(client, name, challenger_version, challenger_tags.get(WEIGHTS_TAG)):
        champion = None
        if current is not None:  # not re-scored: nothing depends on its score
            tags = client.get_model_version(name, current).tags
            champion = Contender(current, stored_score(tags, metric, test_set_md5, scored_with), False, lineage_of(tags))
        decision = Decision(True, False, blocked_reason(challenger_version, *twin), champion=champion, **common)
    else:
        decision = _compare(client, name, current, rescore, common)
    _record(client, name, decision)
    return _as_now(client, name, decision)


def _as_now(client: Any, name: str, decision: Decision) -> Decision:
    """The decision with the registry's aliases after it, and the time it was made."""
    return replace(decision, aliases=aliases(client, name), at=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def _compare(client: Any, name: str, current: str | None, rescore: Callable[[str], float],
             common: dict[str, Any]) -> Decision:
    """The challenger against champion `current` (None: there is none), scored on this test set."""
    metric, challenger = common["metric"], common["challenger"]
    if current is None:
        return Decision(True, True, "first model: it becomes champion", champion=None, **common)
    tags = client.get_model_version(name, current).tags
    score = stored_score(tags, metric, common["test_set_md5"], common["scored_with"])
    rescored, note = score is None, ""
    if rescored:
        try:
            score = checked_score(rescore(current), metric, f"champion v{current} re-scored")
        except ChampionUnavailable as exc:
            reason = (f"champion v{current} cannot be re-scored, so it stays champion: {exc}; to make "
                      f"v{challenger.version} champion anyway: {HAND_PROMOTION.format(version=challenger.version)}")
            champion = Contender(current, None, False, lineage_of(tags), str(exc))
            return Decision(False, False, reason, champion=champion, fails_stage=True, **common)
        except LmforgeError as exc:
            note = f"champion v{current} cannot be scored on this test set: {exc}"
    champion = Contender(current, score, rescored and score is not None, lineage_of(tags), note)
    promoted, delta, reason = decide(metric, challenger.score, champion.score, common["min_delta"])
    if note:
        reason = f"{note}; the challenger becomes champion"
    return Decision(True, promoted, reason, champion=champion, delta=delta, **common)


def _record(client: Any, name: str, decision: Decision) -> None:
    """The decision on both versions (each with its own score on this test set), then the aliases."""
    record = json.dumps(decision.record(), sort_keys=True, allow_nan=False)  # its scores are checked_score's
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
    if not decision.decided:  # the aliases stay as they are
        return
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
    if ROLLBACK_LIFTED_TAG in client.get_model_version(name, current).tags:  # rolled back again: blocked again
        client.delete_model_version_tag(name, current, ROLLBACK_LIFTED_TAG)
    client.set_model_version_tag(name, previous, RESTORED_TAG, json.dumps(event | {"from": current}))
    return current, previous


def promote_by_hand(client: Any, name: str, version: str, user: str, reason: str, when: str) -> str | None:
    """A person makes `version` champion, whatever the scores or a rollback said: records who, when
    and why on it (PROMOTED_BY_HAND_TAG), lifts the block on rolled-back versions with its weights,
    and keeps the chain rollback follows. Returns the champion it replaced (None: there was none)."""
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_model_version(name, version).tags
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise LmforgeError(f"{name} has no version {version}: pick one that `mlflow models` / the MLflow UI "
                           "lists") from None
    current = aliases(client, name).get(paths.CHAMPION_ALIAS)
    if current == version:
        raise LmforgeError(f"{name} version {version} is already `{paths.CHAMPION_ALIAS}`: nothing to do")
    event = {"by": user, "at": when, "reason": reason, "from": current}
    if current is not None:
        client.set_model_version_tag(name, version, PREVIOUS_CHAMPION_TAG, current)
    elif PREVIOUS_CHAMPION_TAG in tags:  # from an earlier reign: rollback must not go back there
        client.delete_model_version_tag(name, version, PREVIOUS_CHAMPION_TAG)
    client.set_model_version_tag(name, version, PROMOTED_BY_HAND_TAG, json.dumps(event))
    while twin := rolled_back_twin(client, name, version, tags.get(WEIGHTS_TAG)):
        client.set_model_version_tag(name, twin[0], ROLLBACK_LIFTED_TAG, json.dumps(event | {"via": version}))
    client.set_registered_model_alias(name, paths.CHAMPION_ALIAS, version)
    if aliases(client, name).get(paths.CHALLENGER_ALIAS) == version:
        client.delete_registered_model_alias(name, paths.CHALLENGER_ALIAS)
    return current


def exported_files(name: str, version: str, destination: Path) -> Path:
    """Download version `version`'s exported directory (model.safetensors, config.json, tokenizer.json,
    logged as the model's extra files) under `destination`; returns it. ChampionUnavailable when
    the artifact store cannot give the model (it names the URI and what the store said) or the
    model has no exported files; a storage problem is never worded as the model's."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = MlflowClient().get_model_version_download_uri(name, version)  # the registry: its errors stay its own
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(destination)))
    except Exception as exc:  # noqa: BLE001 - whatever the store's client raises (S3, HTTP, disk), storage failed
        detail = " ".join(str(exc).split())  # MLflow puts the per-file failures on the lines after its first
        detail = detail if len(detail) <= 300 else detail[:299] + "…"
        raise ChampionUnavailable(f"the artifacts of {name} version {version} at {uri} cannot be fetched "
                                  f"({type(exc).__name__}: {detail}): bring the artifact store back (or restore "
                                  "them), then rerun `dvc repro -f promote`") from exc
    if not (local / "MLmodel").is_file():  # a store restarted empty or cleaned lists nothing, without error
        raise ChampionUnavailable(f"the artifacts of {name} version {version} are missing from {uri} (the artifact "
                                  "store has no model there: restarted empty, or deleted): restore them, then rerun "
                                  "`dvc repro -f promote`")
    exported = local / "extra_files"
    if not (exported / "model.safetensors").is_file():
        raise ChampionUnavailable(f"{name} version {version} was registered without its exported files (by an "
                                  "lmforge older than the one that logs them as extra_files/), so nothing can "
                                  "re-score it")
    return exported
