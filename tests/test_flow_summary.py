"""The flow's summary artifact as a pure function: metrics and results in, markdown out. What a
person reads first is the model against its baselines; numbers read as numbers; nothing that a
stage has not written yet can break it."""

from __future__ import annotations

import json
import re
from pathlib import Path

from flows.summary import human, mlflow_links, read_metrics, summary_markdown
from lmforge.core.redact import MASK

CLASSIFY = {
    "ingest": {"documents": 2248890, "bytes": 123456789},
    "clean": {"kept": 7968, "dropped.short": 12, "kept_fraction": 0.981234},
    "pretrain": {"steps": 600, "val_loss": 3.41234, "val_perplexity": 30.33, "unigram_entropy": 5.1234,
                 "tokens_per_s": 2248890.3},
    "finetune": {"best_val_loss": 1.2345, "best_val_accuracy": 0.5},
    "evaluate": {"val_loss": 3.4, "perplexity": 29.96, "accuracy": 0.81234, "macro_f1": 0.7, "weighted_f1": 0.8,
                 "baselines.unigram_entropy": 5.12, "baselines.majority_accuracy": 0.21,
                 "baselines.majority_macro_f1": 0.03, "baselines.bag_of_words_accuracy": 0.76,
                 "baselines.bag_of_words_macro_f1": 0.6},
}
RESULTS = [{"stage": "ingest", "status": "ran", "seconds": 3.21},
           {"stage": "clean", "status": "skipped (cache hit)", "seconds": 0.01}]
SERVER = mlflow_links("0123abcd", "7", "http://127.0.0.1:5000", Path("/repo"))


def _markdown(metrics, results=RESULTS, links=SERVER) -> str:
    return summary_markdown(results, metrics, links, [], "succeeded", None)


def _tables(markdown: str) -> list[list[str]]:
    """The markdown tables, each as its lines (header, rule, rows)."""
    tables, current = [], []
    for line in markdown.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables + ([current] if current else [])


def _row(table: list[str], first_cell: str) -> list[str]:
    (row,) = [line for line in table if line.split("|")[1].strip() == first_cell]
    return [cell.strip() for cell in row.strip("|").split("|")]


def test_the_first_table_is_the_headline_of_the_model_against_its_baselines():
    markdown = _markdown(CLASSIFY)
    headline = _tables(markdown)[0]
    assert headline[0] == "| figure | model | baseline | from stage |"
    assert _row(headline, "test accuracy") == ["test accuracy", "**0.8123**", "majority class 0.21 · bag of words 0.76",
                                               "evaluate"]
    assert _row(headline, "test macro F1")[2] == "majority class 0.03 · bag of words 0.6"
    assert _row(headline, "val loss (nats/token)")[1:3] == ["**3.4**", "unigram 5.12"]
    assert _row(headline, "val perplexity")[2] == "unigram 167.3"  # exp(5.12): a perplexity beside a perplexity
    assert _row(headline, "pretraining tokens/s")[1] == "**2,248,890**"
    assert _row(headline, "fine-tuning best val accuracy")[1] == "**0.5**"
    assert markdown.index("| figure |") < markdown.index("| stage | result | seconds |") < markdown.index("<details>")


def test_the_same_recipe_from_scratch_sits_among_the_baselines_and_the_gain_has_its_rows():
    evaluate = {**CLASSIFY["evaluate"], "baselines.scratch_accuracy": 0.7988, "baselines.scratch_macro_f1": 0.6784,
                "pretraining_gain.accuracy": 0.01354, "pretraining_gain.macro_f1": 0.0216}
    headline = _tables(_markdown({**CLASSIFY, "evaluate": evaluate}))[0]
    assert "from scratch 0.7988" in _row(headline, "test accuracy")[2]
    assert "from scratch 0.6784" in _row(headline, "test macro F1")[2]
    assert _row(headline, "pretraining gain (test accuracy)")[1:] == ["**0.01354**", "—", "evaluate"]
    assert _row(headline, "pretraining gain (test macro F1)")[1] == "**0.0216**"


def test_the_stage_table_follows_with_ran_or_cache_hit_and_seconds():
    stages = _tables(_markdown(CLASSIFY))[1]
    assert stages[0] == "| stage | result | seconds |"
    assert stages[2:] == ["| ingest | ran | 3.2 |", "| clean | skipped (cache hit) | 0.0 |"]


def test_numbers_read_as_numbers_without_an_exponent():
    markdown = _markdown(CLASSIFY)
    assert not re.search(r"\b\d+(\.\d+)?[eE][+-]?\d+\b", markdown)
    assert "2,248,890" in markdown and "123,456,789" in markdown and "2.24889e+06" not in markdown
    assert [human(v) for v in (7968, 2248890.3, 1234.5, 999.95, 30.3312, 0.812345, 6.0, 0.0, -3.14159)] == [
        "7,968", "2,248,890", "1,234", "1000", "30.33", "0.8123", "6", "0", "-3.142"]
    assert human(1e-5) == "0.000010" and human(-3.815e-06) == "-0.0000038"  # small, still without an exponent
    assert human(1e-9) == "1.000e-09" and human(float("inf")) == "inf"  # beyond ordinary magnitudes


def test_each_stage_s_figures_are_collapsed_in_one_raw_html_block():
    markdown = _markdown(CLASSIFY | {"clean": {"dropped.<script>": 1}})
    blocks = re.findall(r"<details>.*?</details>", markdown, flags=re.S)
    assert [re.search(r"<summary>(\w+)", b).group(1) for b in blocks] == list(CLASSIFY)
    assert all("\n\n" not in b for b in blocks)  # one HTML block to a markdown renderer: no blank line inside
    assert "<td>dropped.&lt;script&gt;</td>" in markdown and "<script>" not in markdown
    assert '<td>documents</td><td align="right">2,248,890</td>' in markdown


def test_missing_files_and_keys_do_not_break_it():
    assert "No model figures yet" in _markdown({})
    assert "No model figures yet" in _markdown({"ingest": {"documents": 3}, "evaluate": {}}, results=[])
    partial = _markdown({"evaluate": {"accuracy": 0.5}, "pretrain": {"val_loss": 4.0}})  # no baselines written
    headline = _tables(partial)[0]
    assert _row(headline, "test accuracy")[2] == "—" and _row(headline, "val loss at the end of pretraining")[2] == "—"
    assert "val perplexity" not in partial


def test_an_sft_run_leads_with_its_sft_figures():
    sft = {"val_loss": 3.4, "perplexity": 29.96, "sft_n": 40, "sft_exact_match": 0.125, "sft_token_f1": 0.4567,
           "sft_rouge_l": 0.41, "sft_val_perplexity": 35.2, "baselines.unigram_entropy": 5.12}
    headline = _tables(_markdown({"evaluate": sft, "finetune": {"best_val_loss": 2.5}}))[0]
    assert [row.split("|")[1].strip() for row in headline[2:]] == [
        "SFT exact match", "SFT token F1", "SFT ROUGE-L", "val loss (nats/token)", "val perplexity",
        "SFT model val perplexity", "fine-tuning best val loss"]
    assert _row(headline, "SFT model val perplexity")[2] == "unigram 167.3"


def test_a_tracking_server_gets_links_to_the_run_and_the_runs_table_without_credentials():
    links = mlflow_links("0123abcd", "7", "https://lmforge:s3cr3t@mlflow.example:5000/", Path("/repo"))
    assert links.run == f"https://lmforge:{MASK}@mlflow.example:5000/#/experiments/7/runs/0123abcd?workflowType=machine_learning"
    assert links.runs == f"https://lmforge:{MASK}@mlflow.example:5000/#/experiments/7/runs?workflowType=machine_learning"
    markdown = _markdown(CLASSIFY, links=links)
    assert f"({links.run})" in markdown and f"({links.runs})" in markdown and "s3cr3t" not in markdown
    assert "mlflow ui" not in markdown and str(links) == links.run


def test_the_local_store_says_how_to_open_it(tmp_path):
    links = mlflow_links("0123abcd", "7", f"sqlite:///{tmp_path.resolve()}/mlflow.db", tmp_path)
    assert links.serve == f"cd {tmp_path.resolve()} && mlflow ui --backend-store-uri sqlite:///mlflow.db"
    assert links.runs == "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
    markdown = _markdown(CLASSIFY, links=links)
    assert f"`{links.serve}`, then open {links.runs}" in markdown and "sqlite:////" not in markdown
    other = mlflow_links("0123abcd", "7", "postgresql://lmforge:s3cr3t@db/mlflow", tmp_path)
    assert other.serve == f"mlflow ui --backend-store-uri postgresql://lmforge:{MASK}@db/mlflow"


def test_read_metrics_skips_missing_and_unreadable_files(tmp_path):
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports/metrics.json").write_text(json.dumps({"accuracy": 0.5, "task": "classify", "ok": True,
                                                               "baselines": {"majority_accuracy": 0.2}}))
    (tmp_path / "reports/broken.json").write_text("{not json")
    metrics = read_metrics(tmp_path, {"evaluate": ["reports/metrics.json", "reports/broken.json"],
                                      "pretrain": ["reports/pretrain/metrics.json"]})
    assert metrics == {"evaluate": {"accuracy": 0.5, "baselines.majority_accuracy": 0.2}, "pretrain": {}}


def test_a_model_no_better_than_the_majority_class_is_flagged_under_the_headline():
    weak = {**CLASSIFY, "evaluate": {**CLASSIFY["evaluate"], "accuracy": 0.128, "baselines.majority_accuracy": 0.145}}
    lines = _markdown(weak).splitlines()
    (flag,) = [i for i, line in enumerate(lines) if line.startswith("> **Warning:**")]
    assert "0.128" in lines[flag] and "majority" in lines[flag]
    assert flag > max(i for i, line in enumerate(lines[:flag]) if line.startswith("| test accuracy"))
    assert "Warning" not in _markdown(CLASSIFY)
