"""params.yaml is generated from the params models (lmforge/core/params_yaml.py), in the form DVC's
YAML editor writes back unchanged: the committed file cannot drift from the models' defaults and
descriptions, and an experiment's `dvc exp run -S key=value` changes the one line of its key."""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Any

import pytest
from dvc.utils.hydra import apply_overrides
from dvc.utils.serialize import modify_yaml

from conftest import REPO, make_repo, merged, run, tiny_params
from flows.dvc_repo import apply_param_overrides
from lmforge.core.params import Params
from lmforge.core.params_yaml import drift, params_yaml

COMMITTED = REPO / "params.yaml"
REGENERATE = "python -m lmforge.core.params_yaml > params.yaml"


def _changed_lines(before: str, after: str) -> list[str]:
    return [line for line in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]


def _leaves(values: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every key a `-S` can set: a map of int keys (clean's n-gram fractions)
    is one, since hydra sets it whole, not entry by entry."""
    for key, value in values.items():
        if isinstance(value, dict) and all(isinstance(name, str) for name in value):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _other_value(value: object) -> str:
    """An override (hydra syntax) that changes `value`, keeping its kind (a list keeps its length)."""
    if isinstance(value, bool):
        return str(not value).lower()
    if value is None or isinstance(value, (int, float)):
        return str((value or 0) * 3 + 1)
    if isinstance(value, str):
        return "'<|x|>'" if "|" in value else "'\\t'" if not value.isprintable() else f"{value}x"
    if isinstance(value, list):
        return "[" + ",".join(["changed", *(f"'{item}'" if isinstance(item, str) else str(item) for item in value[1:])]) + "]"
    return "{" + ",".join(f"{k}:{0.25 if i == 0 else v}" for i, (k, v) in enumerate(value.items())) + "}"


def test_the_committed_params_yaml_states_the_models_defaults_and_descriptions():
    keys = drift(COMMITTED.read_text(encoding="utf-8"))
    named = ", ".join(keys[:12]) + (f" and {len(keys) - 12} more keys" if len(keys) > 12 else "")
    assert not keys, (f"params.yaml differs from the params models at {named}: change the default or "
                      f"the description in lmforge/core/*_params.py, then regenerate with `{REGENERATE}`")


@pytest.mark.parametrize("edit, key", [(("min_chars: 16 ", "min_chars: 17 "), "clean.min_chars"),
                                       (("# rank of the adapters", "# the rank"), "finetune.lora.r"),
                                       (("  dim:  ", "  dim: 64"), "model.dim"),
                                       (("  - <|pad|>\n", ""), "tokenizer.special_tokens")])
def test_a_drifted_value_or_comment_is_named_by_its_key(edit, key):
    text = params_yaml()
    assert edit[0] in text
    assert drift(text.replace(edit[0], edit[1], 1)) == [key]


@pytest.mark.parametrize("text", [COMMITTED.read_text(encoding="utf-8"), params_yaml(tiny_params())],
                         ids=["committed", "tiny"])
def test_dvcs_yaml_editor_writes_params_yaml_back_unchanged(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    with modify_yaml(path):  # what `dvc exp run -S` and the flow's overrides load and dump
        pass
    assert path.read_text(encoding="utf-8") == text


def test_every_key_set_through_dvcs_editor_changes_its_own_line_only(tmp_path):
    """DVC's own override editor (what `dvc exp run -S` applies) setting every key at once: it
    rewrites every value from its parsed copy whichever keys are set, so one call shows each key's
    effect. Each key changes one line, its own; nothing else moves (comments, blank lines)."""
    path, before = tmp_path / "params.yaml", COMMITTED.read_text(encoding="utf-8")
    path.write_text(before, encoding="utf-8")
    leaves = dict(_leaves(Params().model_dump()))
    overrides = {key: _other_value(value) for key, value in leaves.items()}
    apply_overrides(path, [f"{key}={value}" for key, value in overrides.items()])
    after = path.read_text(encoding="utf-8")
    assert drift(after) == list(overrides)  # the keys whose lines differ, in the file's order
    # One line out, one in; an empty list (`data.sources: []`) given an item becomes its head and the item.
    expected = sum(3 if value == [] else 2 for value in leaves.values())
    assert len(_changed_lines(before, after)) == expected, _changed_lines(before, after)


def test_the_flows_overrides_change_one_line_each_and_keep_the_comments(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(params_yaml(tiny_params()), encoding="utf-8")
    apply_param_overrides(["finetune.method=frozen", "model.n_layers=2", "runtime.pretrain.nproc=2"], path)
    changed = merged(tiny_params(), {"finetune": {"method": "frozen"}, "model": {"n_layers": 2},
                                     "runtime": {"pretrain": {"nproc": 2}}})
    assert path.read_text(encoding="utf-8") == params_yaml(changed)


def test_a_list_followed_by_a_comment_is_refused_naming_its_key():
    # DVC's editor would drop the blank line and the next section's header after the list
    with pytest.raises(ValueError, match=r"^data\.files: a list followed by"):
        params_yaml({"data": {"files": ["a/*.txt"]}, "engine": {"workers": 1}})


def test_dvc_exp_run_set_param_changes_one_line_per_key(tmp_path):
    """The real command on a tiny repository, queued (nothing runs): the experiment's params.yaml is
    the generated file of the new values, so each key changed one line (a null, a nested key, a list)."""
    root = make_repo(tmp_path / "repo")
    run(["dvc", "exp", "run", "--queue", "-S", "model.n_layers=2", "-S", "promote.metric.classify=accuracy",
         "-S", "data.files=[data/other/*.txt]"], root)
    # The queued experiment is a commit on DVC's queue ref; the workspace is left as it was.
    queued = run(["git", "show", "refs/exps/celery/stash:params.yaml"], root).stdout
    expected = params_yaml(merged(tiny_params(), {"model": {"n_layers": 2}, "promote": {"metric": {"classify": "accuracy"}},
                                                  "data": {"files": ["data/other/*.txt"]}}))
    assert queued == expected
    assert len(_changed_lines(params_yaml(tiny_params()), queued)) == 6
    assert run(["git", "status", "--porcelain"], root).stdout == ""
