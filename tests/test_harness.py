"""lm-evaluation-harness in the evaluate stage: lmforge's shipped offline tasks, built from held-out
documents, score the tiny pipeline's exported model the same every time; the scores reach
reports/harness.json, `dvc metrics`, MLflow and report.md; without lm-eval the stage says how to
install it and finishes."""

from __future__ import annotations

import json
import sys

from mlflow.tracking import MlflowClient

from conftest import run
from lmforge.core.params import load_params
from lmforge.evaluate import harness
from lmforge.evaluate.report import harness_section
from lmforge.evaluate.shipped_tasks import (
    CHOICES, CONTEXT_WORDS, ENDING_WORDS, cloze_items, continuation_items, held_out_documents,
)

SHIPPED = ("lmforge_cloze", "lmforge_continuation")


def _docs(n: int, words: int = 30) -> list[dict]:
    return [{"id": f"{i:032x}", "text": " ".join(f"w{i}x{j}" if j < words - 1 else f"end{'abcdefghij'[i % 10]}."
                                                 for j in range(words))} for i in range(n)]


def test_the_cloze_asks_a_documents_last_word_given_the_words_before_it():
    doc = {"id": "a" * 32, "text": " ".join(["word"] * 60) + " the final answer."}
    short = {"id": "b" * 32, "text": "too short to ask."}
    number = {"id": "c" * 32, "text": " ".join(["word"] * 20) + " ends in 42."}
    [item] = cloze_items([doc, short, number])
    assert item["target"] == "answer"  # its closing punctuation is no part of the word
    words = item["context"].split()
    assert len(words) == CONTEXT_WORDS and words[-2:] == ["the", "final"]


def test_the_continuation_hides_a_documents_own_ending_among_other_documents_endings():
    docs = _docs(6)
    items = continuation_items(docs)
    assert len(items) == len(docs) and {item["label"] for item in items} <= set(range(CHOICES))
    for doc, item in zip(docs, items):
        endings = item["endings"]
        assert len(endings) == CHOICES == len(set(endings))
        assert endings[item["label"]] == " ".join(doc["text"].split()[-ENDING_WORDS:])
        assert doc["text"].startswith(item["context"]) and len(item["context"].split()) <= CONTEXT_WORDS
    # the right ending's place comes from the document's id alone, whatever the other documents
    assert [item["label"] for item in continuation_items(docs[1:])] == [item["label"] for item in items[1:]]


def test_the_tasks_are_built_from_held_out_documents_only(tiny_repo):
    from lmforge.data.documents import split_of
    from lmforge.data.partitions import iter_dataset_batches

    val_fraction = load_params(tiny_repo / "params.yaml").data.val_fraction
    docs = held_out_documents(tiny_repo / "data/clean", val_fraction)
    every = [d for b in iter_dataset_batches(tiny_repo / "data/clean", 64, "clean") for d in b]
    assert docs and all(split_of(d["id"], val_fraction) == "val" for d in docs)
    assert [d["id"] for d in docs] == sorted(d["id"] for d in every if split_of(d["id"], val_fraction) == "val")
    assert [d["id"] for d in held_out_documents(tiny_repo / "data/clean", val_fraction, limit=3)] == \
        [d["id"] for d in docs[:3]]


def test_the_shipped_tasks_score_the_tiny_model_the_same_twice(tiny_repo, tmp_path, monkeypatch):
    """The stage's scores (tiny_repo's `dvc repro`) and an in-process rerun on a copy agree exactly."""
    from conftest import copy_repo

    root = copy_repo(tiny_repo, tmp_path / "repo")
    by_stage = json.loads((root / "reports/harness.json").read_text())
    data = {name: (root / "reports/harness" / name).read_bytes() for name in ("cloze.jsonl", "continuation.jsonl")}
    monkeypatch.chdir(root)
    again = harness.run(load_params(), finetuned=None)
    assert again == by_stage
    assert {name: (root / "reports/harness" / name).read_bytes() for name in data} == data
    for task in SHIPPED:
        figures = by_stage["pretrained"][task]
        assert figures["samples"] == 16  # TINY_PARAMS' evaluate.harness.limit
        assert 0 <= figures["acc"] <= 1
    assert by_stage["pretrained"]["lmforge_cloze"]["perplexity"] > 1


def test_harness_scores_reach_dvc_metrics_mlflow_and_the_report(tiny_repo):
    scores = json.loads((tiny_repo / "reports/harness.json").read_text())
    assert set(scores) == {"pretrained"}  # the tiny pipeline fine-tunes a classifier: no causal LM
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], tiny_repo).stdout)
    assert "reports/harness.json" in json.dumps(shown)
    client = MlflowClient(tracking_uri=f"sqlite:///{tiny_repo}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("lmforge").experiment_id])
    evaluate = next(r for r in runs if r.data.tags["lmforge.stage"] == "evaluate")
    for task in SHIPPED:
        for metric, value in scores["pretrained"][task].items():
            assert evaluate.data.metrics[f"evaluate/harness/{task}/{metric}"] == value
    report = (tiny_repo / "reports/report.md").read_text()
    assert "## lm-evaluation-harness" in report and "| pretrained | lmforge_continuation | acc |" in report


def test_without_lm_eval_the_harness_says_how_to_install_it_and_the_step_finishes(tiny_repo, tmp_path, monkeypatch,
                                                                                   caplog):
    from conftest import copy_repo

    root = copy_repo(tiny_repo, tmp_path / "repo")
    monkeypatch.chdir(root)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    with caplog.at_level("WARNING", logger="lmforge.evaluate"):
        results = harness.run(load_params(), finetuned=None)
    assert "pip install --upgrade pip && pip install 'lmforge[eval]'" in caplog.text
    assert json.loads((root / "reports/harness.json").read_text()) == {}  # a DVC metric: no words
    assert "pip install" in results["skipped"] and harness.metrics(results) == {}
    assert "Not run: lm-eval is not installed" in "\n".join(harness_section(results))
    assert (root / "reports/harness/cloze.jsonl").stat().st_size > 0  # the stage's outputs all there


def test_no_harness_tasks_turn_the_harness_off_quietly(tiny_repo, tmp_path, monkeypatch, caplog):
    from conftest import copy_repo

    monkeypatch.chdir(copy_repo(tiny_repo, tmp_path / "repo"))
    params = load_params()
    evaluate = params.evaluate
    off = params.model_copy(update={"evaluate": evaluate.model_copy(
        update={"harness": evaluate.harness.model_copy(update={"tasks": []})})})
    with caplog.at_level("WARNING", logger="lmforge.evaluate"):
        assert harness.run(off, finetuned=None) == {"skipped": "evaluate.harness.tasks is empty"}
    assert caplog.text == ""


def test_the_shipped_task_yamls_are_the_ones_dvc_tracks():
    from conftest import REPO
    from lmforge.core import paths

    assert harness.TASKS_DIR.resolve() == (REPO / paths.HARNESS_TASKS).resolve()
    assert sorted(p.stem for p in harness.TASKS_DIR.glob("*.yaml")) == sorted(SHIPPED)


def test_scores_are_named_by_task_and_metric():
    out = {"results": {"lmforge_cloze": {"alias": "lmforge_cloze", "acc,none": 0.5, "acc_stderr,none": "N/A",
                                         "perplexity,none": 12.5},
                       "gsm8k": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1}},
           "n-samples": {"lmforge_cloze": {"original": 40, "effective": 16}}}
    scores = harness.task_scores(out)
    assert scores == {"lmforge_cloze": {"acc": 0.5, "perplexity": 12.5, "samples": 16},
                      "gsm8k": {"exact_match_strict-match": 0.25}}
    assert harness.metrics({"pretrained": scores, "sft": {"gsm8k": scores["gsm8k"]}}) == {
        "harness/lmforge_cloze/acc": 0.5, "harness/lmforge_cloze/perplexity": 12.5,
        "harness/lmforge_cloze/samples": 16, "harness/gsm8k/exact_match_strict-match": 0.25,
        "harness_sft/gsm8k/exact_match_strict-match": 0.25}


def test_the_log_line_writes_numbers_without_an_exponent():
    line = harness.summary({"lmforge_cloze": {"perplexity": 13674.2, "acc": 0.0, "samples": 16},
                            "lmforge_continuation": {"acc": 0.29, "acc_norm": 0.355}})
    assert line == "lmforge_cloze perplexity 13,674, acc 0; lmforge_continuation acc 0.29, acc_norm 0.355"
