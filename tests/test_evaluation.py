"""The evaluation library: metrics agree with sklearn and with hand-computed values, the LM
loss equals a direct cross-entropy, baselines behave, and the writers produce valid outputs."""

import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge.data.tokens.shards import ShardReader, ShardWriter, SplitSummary, token_dtype, write_shards_manifest
from lmforge.core.errors import LmforgeError
from lmforge.evaluate.metrics import (
    bag_of_words_baseline,
    classification_report,
    exact_match,
    language_model_loss,
    majority_baseline,
    rouge_l,
    sft_report,
    token_f1,
)
from lmforge.evaluate.report import plot_confusion_matrix, render_report_md, write_confusion_json, write_per_class_csv
from lmforge.evaluate.evaluation import warn_if_no_better_than_majority
from lmforge.core.verdict import WARNING_TAG, majority_warning
from lmforge.model.decoder import ModelConfig, Transformer

LABELS = ["ant", "bee", "cat", "dog"]
# "dog" is never predicted (precision 0/0) and "ant" has one wrong prediction.
Y_TRUE = ["ant", "ant", "bee", "bee", "bee", "cat", "cat", "dog", "dog", "ant"]
Y_PRED = ["ant", "bee", "bee", "bee", "cat", "cat", "cat", "cat", "bee", "ant"]


# --- classification ----------------------------------------------------------------------------


def test_classification_report_matches_sklearn_including_a_never_predicted_class():
    from sklearn import metrics as skm  # here: collection imports every test module in every xdist worker

    report = classification_report(Y_TRUE, Y_PRED, LABELS)
    p, r, f, s = skm.precision_recall_fscore_support(Y_TRUE, Y_PRED, labels=LABELS, zero_division=0)
    assert report["n"] == 10
    assert report["accuracy"] == pytest.approx(skm.accuracy_score(Y_TRUE, Y_PRED)) == 0.6
    assert report["macro_f1"] == pytest.approx(skm.f1_score(Y_TRUE, Y_PRED, labels=LABELS, average="macro", zero_division=0))
    assert report["weighted_f1"] == pytest.approx(
        skm.f1_score(Y_TRUE, Y_PRED, labels=LABELS, average="weighted", zero_division=0)
    )
    for i, label in enumerate(LABELS):
        row = report["per_class"][label]
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx((p[i], r[i], f[i], s[i]))
    assert report["per_class"]["dog"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert report["confusion"] == {
        "labels": LABELS,
        "matrix": skm.confusion_matrix(Y_TRUE, Y_PRED, labels=LABELS).tolist(),
    }
    json.dumps(report)  # plain Python types only: goes straight into metrics.json


def test_never_predicted_class_gives_zero_precision_without_a_warning():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sklearn's UndefinedMetricWarning would fail here
        report = classification_report(["a", "b"], ["a", "a"], ["a", "b"])
    assert report["per_class"]["b"]["precision"] == 0.0


def test_prediction_outside_the_labels_is_wrong_and_counted_as_invalid():
    report = classification_report(["a", "b", "b"], ["a", "b", "banana"], ["a", "b"])
    assert report["accuracy"] == pytest.approx(2 / 3)
    assert report["invalid_predictions"] == 1
    assert report["per_class"]["b"]["recall"] == 0.5
    assert report["confusion"]["matrix"] == [[1, 0], [0, 1]]


def test_true_label_outside_the_labels_is_an_error():
    with pytest.raises(LmforgeError, match="not in the task's labels"):
        classification_report(["zebra"], ["a"], ["a", "b"])


def test_majority_baseline_predicts_the_most_frequent_training_label():
    result = majority_baseline(["x", "y", "y", "z"], ["y", "x", "y", "z"], labels=["x", "y", "z"])
    assert result["label"] == "y"
    assert result["predictions"] == ["y"] * 4
    assert result["accuracy"] == 0.5
    # F1 of y: P = 2/4, R = 1 -> 2/3; x and z: 0. Macro = (2/3) / 3.
    assert result["macro_f1"] == pytest.approx(2 / 9)


def test_majority_baseline_breaks_ties_alphabetically():
    assert majority_baseline(["b", "a", "b", "a"], ["a"])["label"] == "a"


def test_bag_of_words_beats_majority_on_a_separable_task():
    topics = {"sport": "ball goal team match score", "code": "python function class module error",
              "food": "bread cheese soup salad pasta"}
    rng = np.random.default_rng(0)

    def make(n):
        texts, labels = [], []
        for i in range(n):
            label = list(topics)[i % 3]
            words = list(rng.choice(topics[label].split(), 4)) + list(rng.choice(["the", "a", "of", "and"], 3))
            texts.append(" ".join(rng.permutation(words)))
            labels.append(label)
        return texts, labels

    (train_x, train_y), (test_x, test_y) = make(60), make(30)
    bow = bag_of_words_baseline(train_x, train_y, test_x, test_y, seed=0)
    majority = majority_baseline(train_y, test_y)
    assert bow["accuracy"] > 0.9 > majority["accuracy"]
    assert bow["macro_f1"] > majority["macro_f1"]
    assert len(bow["predictions"]) == 30 and set(bow["predictions"]) <= set(topics)


def test_bag_of_words_needs_two_training_labels():
    with pytest.raises(LmforgeError, match="at least 2"):
        bag_of_words_baseline(["a b", "c d"], ["x", "x"], ["a"], ["x"])


# --- SFT text metrics --------------------------------------------------------------------------


def test_exact_match_ignores_case_and_whitespace_but_not_punctuation():
    assert exact_match("  The  Cat\n sat ", "the cat sat") == 1.0
    assert exact_match("the cat sat.", "the cat sat") == 0.0


def test_token_f1_is_squad_style_bag_of_tokens():
    # common = {the: 1, cat: 1} = 2; P = 2/3, R = 2/4 -> F1 = 2 * (2/3 * 1/2) / (2/3 + 1/2) = 4/7
    assert token_f1("the cat sat", "a cat and the") == pytest.approx(4 / 7)
    assert token_f1("cat cat", "cat") == pytest.approx(2 * 0.5 * 1 / 1.5)  # repeated tokens count once each
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0 and token_f1("x", "y") == 0.0


def test_rouge_l_is_the_lcs_f_measure():
    # LCS = "the cat on the mat" (5 of 6 tokens each side): P = R = F = 5/6.
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # Order matters, unlike token F1: LCS of "a b c" and "c b a" is 1 -> P = R = 1/3.
    assert rouge_l("a b c", "c b a") == pytest.approx(1 / 3)
    assert token_f1("a b c", "c b a") == 1.0
    assert rouge_l("", "") == 1.0 and rouge_l("a", "b") == 0.0


def test_sft_report_averages_the_three_metrics():
    report = sft_report(["the cat sat", "x"], ["The cat sat", "y"])
    assert report == {"n": 2, "exact_match": 0.5, "token_f1": 0.5, "rouge_l": 0.5}
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        sft_report(["a", "b"], ["a"])


# --- language model loss -----------------------------------------------------------------------


@pytest.fixture
def shard_reader(tmp_path):
    """A val split of 11 random rows of seq_len+1 ids over 2 shards (the last batch is short)."""
    vocab, seq_len = 50, 12
    dtype = token_dtype(vocab)
    rows = np.random.default_rng(0).integers(0, vocab, size=(11, seq_len + 1)).astype(dtype)
    writer = ShardWriter(tmp_path, "val", seq_len, dtype, shard_rows=6)
    writer.add(rows)
    summary = SplitSummary(rows=len(rows), tokens=int(rows.size), shards=writer.close())
    write_shards_manifest(tmp_path, tokenizer_sha256="x", vocab_size=vocab, eos_id=0, seq_len=seq_len, dtype=dtype,
                      splits={"val": summary})
    return ShardReader(tmp_path, "val"), rows.astype(np.int64)


def tiny_model(vocab: int = 50) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, max_seq_len=16))


def test_language_model_loss_equals_a_direct_cross_entropy(shard_reader):
    reader, rows = shard_reader
    model = tiny_model()
    model.train()
    result = language_model_loss(model, reader, micro_batch_size=4)
    ids = torch.from_numpy(rows)
    with torch.no_grad():
        model.eval()
        logits = model(ids[:, :-1])
        expected = F.cross_entropy(logits.reshape(-1, 50), ids[:, 1:].reshape(-1)).item()
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert result["tokens"] == 11 * 12 and result["rows"] == 11


def test_language_model_loss_reads_the_first_max_rows_and_restores_train_mode(shard_reader):
    reader, rows = shard_reader
    model = tiny_model()
    model.train()
    capped = language_model_loss(model, reader, micro_batch_size=3, max_rows=5)
    assert model.training
    ids = torch.from_numpy(rows[:5])
    with torch.no_grad():
        expected = F.cross_entropy(model.eval()(ids[:, :-1]).reshape(-1, 50), ids[:, 1:].reshape(-1)).item()
    assert capped["loss"] == pytest.approx(expected, rel=1e-5)
    assert capped["tokens"] == 5 * 12


def test_language_model_loss_rejects_a_model_with_too_small_a_vocabulary(shard_reader):
    reader, _ = shard_reader
    with pytest.raises(LmforgeError, match="embeds only 40"):
        language_model_loss(tiny_model(vocab=40), reader, micro_batch_size=4)


# --- writers and report ------------------------------------------------------------------------


def test_confusion_matrix_png_is_written(tmp_path):
    report = classification_report(Y_TRUE, Y_PRED, LABELS)
    path = tmp_path / "plots" / "confusion.png"
    plot_confusion_matrix(path, report["confusion"], "classification (test)")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    assert [p.name for p in path.parent.iterdir()] == ["confusion.png"]  # no temp file left


def test_per_class_csv_and_confusion_json_for_dvc_plots(tmp_path):
    report = classification_report(Y_TRUE, Y_PRED, LABELS)
    write_per_class_csv(tmp_path / "per_class.csv", report)
    with (tmp_path / "per_class.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["label"] for r in rows] == LABELS
    assert list(rows[0]) == ["label", "precision", "recall", "f1", "support"]
    assert float(rows[3]["precision"]) == 0.0 and int(rows[3]["support"]) == 2
    write_confusion_json(tmp_path / "confusion.json", report)
    records = json.loads((tmp_path / "confusion.json").read_text())
    assert len(records) == 10
    assert records.count({"actual": "dog", "predicted": "cat"}) == 1
    assert sorted(r["actual"] for r in records) == sorted(Y_TRUE)


def test_report_md_has_the_tables_and_escapes_cells():
    classification = classification_report(Y_TRUE, Y_PRED, LABELS)
    md = render_report_md(
        lm={"pretrained": {"loss": 2.0, "perplexity": math.exp(2.0), "tokens": 1000},
            "unigram baseline": {"loss": 4.5, "perplexity": math.exp(4.5)}},
        classification=classification,
        baselines={"majority": {"accuracy": 0.3, "macro_f1": 0.1}, "tf-idf + logreg": {"accuracy": 0.5, "macro_f1": 0.4}},
        sft=sft_report(["a b"], ["a b"]),
        sft_examples=[{"prompt": "say | hi", "response": "x | y\nz <|endoftext|>", "reference": "x y"}],
        samples=[{"prompt": "def", "text": "code ```fenced``` here"}],
        sampling={"prompts": ["def", "class"], "temperature": 0.8, "top_k": 50},
        images={"confusion_matrix": "plots/confusion.png", "loss curve": "plots/loss.png"},
    )
    assert "| model | loss (nats/token) | perplexity | tokens |" in md
    assert "| pretrained | 2.000 | 7.4 | 1,000 |" in md
    assert "| unigram baseline | 4.500 | 90.0 | – |" in md
    assert "| fine-tuned model | 0.600 |" in md and "| majority | 0.300 | 0.100 | – |" in md
    assert "| dog | 0.000 | 0.000 | 0.000 | 2 |" in md
    assert "![confusion matrix](plots/confusion.png)" in md and "![loss curve](plots/loss.png)" in md
    assert "| 1 | say \\| hi | x \\| y<br>z &lt;\\|endoftext\\|> | x y |" in md
    assert "| temperature | top_k |" in md and "| 0.8 | 50 |" in md  # each sample shows its own prompt
    assert "**1.** prompt: def" in md and "['" not in md  # prompts as text, never a Python list
    assert "````text\ncode ```fenced``` here\n````" in md
    for line in md.splitlines():  # every table row has as many cells as its header
        if line.startswith("| 1 | say"):
            assert len([c for c in line.replace("\\|", "").split("|")]) == 7


def test_report_md_skips_sections_not_given():
    md = render_report_md(lm={"pretrained": {"loss": 1.0, "perplexity": math.e, "tokens": 10}})
    assert "## Language modelling" in md
    assert "Classification" not in md and "SFT" not in md and "Samples" not in md


def test_report_md_leads_with_the_headline_table_then_its_provenance_and_names_the_system():
    md = render_report_md(provenance={"git commit": "abc123", "model": "`lmforge-finetune` version 3"},
                          classification={"n": 2, "accuracy": 1.0, "macro_f1": 1.0, "weighted_f1": 1.0, "per_class": {}},
                          system="fine-tuned lmforge (lora)")
    lines = md.splitlines()
    assert lines[0] == "# lmforge evaluation" and lines[2] == "## Headline" and lines[8].startswith("| fine-tuned lmforge (lora) | 1.000 |")
    assert lines[10].startswith("| provenance |") and "| git commit | abc123 |" in md
    assert render_report_md(provenance={"git commit": "abc123"}).splitlines()[2].startswith("| provenance |")


def test_report_tables_give_one_format_per_column_kind():
    classification = {"n": 20, "accuracy": 0.03171, "macro_f1": 0.5, "weighted_f1": 1,
                      "per_class": {"a": {"precision": 1.0, "recall": 0.3, "f1": 0.46153, "support": 1234}}}
    text = render_report_md(
        lm={"pretrained": {"loss": 4.84761, "perplexity": 127.4348, "tokens": 512},
            "unigram baseline": {"loss": 4.1822, "perplexity": 65.5123, "tokens": 27753}},
        classification=classification, baselines={"majority class": {"accuracy": 0.7709, "macro_f1": 0.1, "weighted_f1": None}})
    assert "| fine-tuned model | 0.032 | 0.500 | 1.000 |" in text  # not 0.03171 beside 0.7709
    assert "| majority class | 0.771 | 0.100 | – |" in text
    assert "| a | 1.000 | 0.300 | 0.462 | 1,234 |" in text
    assert "| pretrained | 4.848 | 127.4 | 512 |" in text and "| unigram baseline | 4.182 | 65.5 | 27,753 |" in text


def test_a_model_at_or_below_the_majority_class_is_flagged_first_in_the_report():
    assert majority_warning(0.771, 0.145) is None and majority_warning(None, 0.145) is None
    for accuracy in (0.128, 0.145):
        warning = majority_warning(accuracy, 0.145)
        assert warning and f"{accuracy:.3f}" in warning and "0.145" in warning and "majority" in warning
    text = render_report_md(title="t", warning=majority_warning(0.128, 0.145))
    assert text.splitlines()[2] == f"> **Warning:** {majority_warning(0.128, 0.145)}"
    assert "Warning" not in render_report_md(title="t")


def test_evaluate_tags_logs_and_returns_the_warning_only_for_a_model_no_better_than_majority(caplog):
    class Run:
        tags: dict[str, str] = {}

        def set_tags(self, tags):
            self.tags.update(tags)

    weak, strong, run = {"accuracy": 0.128}, {"accuracy": 0.771}, Run()
    baselines = {"majority class": {"accuracy": 0.145}}
    assert warn_if_no_better_than_majority(run, strong, baselines) is None and run.tags == {}
    assert warn_if_no_better_than_majority(run, None, None) is None  # an SFT run
    warning = warn_if_no_better_than_majority(run, weak, baselines)
    assert run.tags == {WARNING_TAG: warning} and warning in caplog.text


# --- what pretraining bought ---------------------------------------------------------------------


def _report(accuracy: float, macro_f1: float) -> dict:
    return {"n": 4, "accuracy": accuracy, "macro_f1": macro_f1, "weighted_f1": macro_f1, "per_class": {}}


def test_pretraining_gain_is_pretrained_minus_scratch_and_a_lower_loss_counts_as_a_gain():
    from lmforge.evaluate.gain import pretraining_gain

    assert pretraining_gain("classify", _report(0.771, 0.769), _report(0.777, 0.786)) == {
        "accuracy": 0.771 - 0.777, "macro_f1": 0.769 - 0.786}
    sft = pretraining_gain("sft", {"n": 2, "exact_match": 0.5, "token_f1": 0.6, "rouge_l": 0.7, "loss": 2.0},
                           {"n": 2, "exact_match": 0.25, "token_f1": 0.6, "rouge_l": 0.5, "loss": 3.0})
    assert sft == {"sft_exact_match": 0.25, "sft_token_f1": 0.0, "sft_rouge_l": 0.7 - 0.5, "sft_loss": 1.0}


def test_label_efficiency_subsets_are_seeded_and_nested():
    from lmforge.evaluate.gain import subset

    small, large = subset(100, 10, seed=7), subset(100, 40, seed=7)
    assert len(small) == 10 and len(set(large)) == 40 and set(small) <= set(large)
    assert small == subset(100, 10, seed=7) != subset(100, 10, seed=8)


def test_the_report_splits_pretrainings_drop_in_loss_at_the_unigram_entropy():
    from lmforge.evaluate.report import FIRST_STEP, beyond_word_frequencies

    lm = {"pretrained": {"loss": 5.0}, "unigram baseline": {"loss": 6.68}, FIRST_STEP: {"loss": 9.0}}
    text = beyond_word_frequencies(lm)
    assert "from 9.000 to 5.000" in text and "account for 2.320" in text and "**1.680 nats/token (42%)**" in text
    assert "no more than word frequencies" in beyond_word_frequencies(lm | {"pretrained": {"loss": 6.9}})
    assert beyond_word_frequencies({k: v for k, v in lm.items() if k != FIRST_STEP}) is None
    md = render_report_md(lm=lm)
    assert f"| {FIRST_STEP} | 9.000 |" in md and text in md


def test_the_headline_table_leads_with_the_model_then_the_same_recipe_from_scratch_then_the_baselines():
    from types import SimpleNamespace

    from lmforge.evaluate.report import SCRATCH

    pretraining = SimpleNamespace(scratch=_report(0.5, 0.4), gain={"accuracy": 0.25, "macro_f1": -0.1},
                                  label_efficiency=[])
    md = render_report_md(classification=_report(0.75, 0.3), system="fine-tuned lmforge (full)",
                          baselines={"bag of words": _report(0.9, 0.9), "majority class": _report(0.25, 0.1)},
                          provenance={"git commit": "abc"}, pretraining=pretraining)
    rows = [line.split(" | ")[0].lstrip("| ") for line in md.split("## Headline")[1].split("| provenance |")[0].splitlines()
            if line.startswith("| ") and not line.startswith(("| system", "| ---"))]
    assert rows == ["fine-tuned lmforge (full)", SCRATCH, "bag of words", "majority class"]
    assert "accuracy +0.250, macro F1 -0.100" in md
    assert SCRATCH not in render_report_md(classification=_report(0.75, 0.3))  # the baseline off: no row


def test_label_efficiency_is_a_table_a_csv_and_a_plot(tmp_path):
    from types import SimpleNamespace

    from lmforge.evaluate.report import plot_label_efficiency, write_label_efficiency_csv

    rows = [{"train_examples": 64, "pretrained": _report(0.5, 0.4), "scratch": _report(0.25, 0.2), "bag of words": None},
            {"train_examples": 2201, "pretrained": _report(0.75, 0.7), "scratch": _report(0.7, 0.6),
             "bag of words": _report(0.875, 0.85)}]
    write_label_efficiency_csv(tmp_path / "le.csv", rows, "classify")
    table = list(csv.DictReader((tmp_path / "le.csv").open()))
    assert [r["train_examples"] for r in table] == ["64", "2201"]
    assert table[0]["pretrained_accuracy"] == "0.5" and table[0]["bag_of_words_accuracy"] == "nan"
    assert table[1]["scratch_macro_f1"] == "0.6"
    plot_label_efficiency(tmp_path / "le.png", rows, "classify")
    assert (tmp_path / "le.png").read_bytes().startswith(b"\x89PNG")
    md = render_report_md(classification=_report(0.75, 0.7), images={"label_efficiency": "figures/le.png"},
                          pretraining=SimpleNamespace(scratch=_report(0.7, 0.6), gain={}, label_efficiency=rows))
    section = md.split("## Label efficiency")[1]
    assert "| 64 | 0.500 / 0.400 | 0.250 / 0.200 | – |" in section
    assert "| all (2,201) | 0.750 / 0.700 | 0.700 / 0.600 | 0.875 / 0.850 |" in section
    assert "![label efficiency](figures/le.png)" in section and "## Figures" not in md


def test_the_scratch_run_takes_the_rows_per_step_finetune_took_over_many_processes():
    from lmforge.core.params import Params
    from lmforge.evaluate.gain import one_process_recipe

    params = Params()
    assert one_process_recipe(params, 1) is params
    four = one_process_recipe(params, 4).finetune
    assert (four.grad_accum_steps, four.eval_batches) == (4 * params.finetune.grad_accum_steps, 4 * params.finetune.eval_batches)
    assert four.micro_batch_size == params.finetune.micro_batch_size and params.finetune.grad_accum_steps == 1
