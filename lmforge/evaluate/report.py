"""The evaluate stage's files: the confusion matrix (PNG and JSON), per-class CSV, and report.md (what
produced the figures, the models beside their baselines, examples and samples), all written atomically.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.core.io import atomic_path, strict_json, write_csv
from lmforge.core.numbers import human
from lmforge.evaluate.metrics import token_f1


# --- writers -----------------------------------------------------------------------------------


def plot_confusion_matrix(path: str | Path, confusion: dict[str, Any], title: str) -> None:
    """PNG heat map of {"labels", "matrix"}: rows true, columns predicted, a count in each cell.

    Colors are row-normalized (the share of each true class), so a rare class's errors are as
    visible as a frequent one's; the counts printed in the cells keep the absolute numbers.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [str(label) if len(str(label)) <= 24 else str(label)[:23] + "…" for label in confusion["labels"]]
    counts = np.asarray(confusion["matrix"], dtype=np.int64).reshape(len(labels), len(labels))
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape, dtype=float), where=totals > 0)
    side = min(20.0, max(4.0, 0.6 * len(labels) + 2.5))
    fig, ax = plt.subplots(figsize=(side, side * 0.85), dpi=110)
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if len(labels) <= 30:  # beyond that the numbers overlap and only the colors are readable
        for i in range(len(labels)):
            for j in range(len(labels)):
                color = "white" if shares[i, j] > 0.5 else "black"
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", color=color, fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_per_class_csv(path: str | Path, report: dict[str, Any]) -> None:
    """label,precision,recall,f1,support: one row per class in label order, for `dvc plots`."""
    columns = ["precision", "recall", "f1", "support"]
    rows = [[label, *(row[c] for c in columns)] for label, row in report["per_class"].items()]
    write_csv(path, ["label", *columns], rows)


def write_confusion_json(path: str | Path, report: dict[str, Any]) -> None:
    """One {"actual", "predicted"} record per example, expanded from the matrix: the input of
    DVC's built-in `confusion` template (it counts records per cell), e.g. in dvc.yaml
    `plots: - reports/confusion.json: {template: confusion, x: predicted, y: actual}`.
    """
    labels, matrix = report["confusion"]["labels"], report["confusion"]["matrix"]
    records = [
        {"actual": actual, "predicted": predicted}
        for actual, row in zip(labels, matrix)
        for predicted, count in zip(labels, row)
        for _ in range(int(count))
    ]
    with atomic_path(path) as tmp:
        tmp.write_text(strict_json(records, path, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


# --- report.md ---------------------------------------------------------------------------------


def md_cell(value: Any, max_chars: int = 400) -> str:
    """One table cell: numbers as people read them (lmforge.core.numbers.human), a list as its items'
    text, text truncated, and `|`, newlines and `<` escaped so the cell cannot break the table row
    or be swallowed as HTML (`<|endoftext|>`)."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    if isinstance(value, (int, float)):
        return human(value)
    if isinstance(value, (list, tuple)):  # text, not a Python repr: `a, b`
        return ", ".join(md_cell(item, max_chars) for item in value)
    text = str(value)
    if len(text) > max_chars:
        text = text[: max_chars - 1] + "…"
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;")
    return re.sub(r"\r\n|\r|\n", "<br>", text)


def fixed(value: Any, decimals: int = 3) -> Any:
    """A number to `decimals` places, for a column of one kind of figure (scores, losses): every row
    alike, 0.032 beside 0.771, not 0.03171 beside 0.7709; anything else left to md_cell."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return value
    return f"{value:,.{decimals}f}"


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavored markdown table; every cell goes through `md_cell`."""
    lines = ["| " + " | ".join(md_cell(h) for h in header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(md_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _fenced(text: str) -> str:
    """A code block whose fence is longer than any backtick run in the text, so it cannot close early."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def render_report_md(
    *,
    lm: dict[str, dict[str, Any]] | None = None,
    classification: dict[str, Any] | None = None,
    baselines: dict[str, dict[str, Any]] | None = None,
    sft: dict[str, Any] | None = None,
    sft_examples: list[dict[str, str]] | None = None,
    samples: list[dict[str, str]] | None = None,
    sampling: dict[str, Any] | None = None,
    images: dict[str, str] | None = None,
    provenance: dict[str, Any] | None = None,
    system: str = "fine-tuned model",
    title: str = "lmforge evaluation",
    warning: str | None = None,
    mixture: dict[str, dict[str, Any]] | None = None,
    harness: dict[str, Any] | None = None,
) -> str:
    """The human-readable report: a section per argument given, skipped when it is None.

    lm: name -> {"loss", "perplexity", "tokens"} (e.g. "pretrained", "fine-tuned (SFT)",
        "unigram baseline"); classification: a `classification_report`; baselines:
        name -> {"accuracy", "macro_f1", ...}, tabled beside the model; sft: an `sft_report`;
        sft_examples: [{"prompt", "response", "reference"}]; samples: [{"prompt", "text"}]
        generated with `sampling` params; images: caption -> path relative to the report
        ("confusion_matrix" is placed in the classification section, the rest under Figures);
        provenance: what produced the figures (commit, runs, model version, method), tabled first;
        system: the fine-tuned model's name in the tables (e.g. "fine-tuned lmforge (full)");
        warning: a line shown first (a model no better than its majority baseline);
        mixture: named sources -> {"weight", "share", "tokens", "documents", "epochs", "val_loss"}, the
        train split's realised mixture beside the asked weights.
        harness: reports/harness.json ({model: {task: {metric: value}}} or {"skipped": why}).
    """
    images = dict(images or {})
    parts = [f"# {title}"] + ([f"> **Warning:** {md_cell(warning)}"] if warning else [])
    if provenance:
        parts += [md_table(["provenance", ""], [[key, value] for key, value in provenance.items()])]
    if lm:
        parts += ["## Language modelling", "Mean next-token cross-entropy on held-out rows (lower is better).",
                  md_table(["model", "loss (nats/token)", "perplexity", "tokens"],
                           [[name, fixed(r.get("loss")), fixed(r.get("perplexity"), 1), r.get("tokens")]
                            for name, r in lm.items()])]
    if mixture:
        parts += ["## Training mixture", "Share of train tokens each source asked for (mix.weights) and got; "
                  "epochs above 1: the source was repeated, below 1: subsampled. Val loss: the pretrained model "
                  "on that source's own val rows.",
                  md_table(["source", "asked weight", "realised share", "tokens", "documents", "epochs", "val loss"],
                           [[name, fixed(r["weight"]), fixed(r["share"]), r["tokens"], r["documents"],
                             fixed(r["epochs"], 2), fixed(r.get("val_loss")) if r.get("val_loss") is not None
                             else "no val row"] for name, r in mixture.items()])]
    if classification:
        systems = {system: classification, **(baselines or {})}
        parts += ["## Classification", f"Test split: {classification['n']} examples.",
                  md_table(["system", "accuracy", "macro F1", "weighted F1"],
                           [[name, *(fixed(r.get(key)) for key in ("accuracy", "macro_f1", "weighted_f1"))]
                            for name, r in systems.items()])]
        if classification.get("invalid_predictions"):
            parts.append(f"{classification['invalid_predictions']} predictions were not a known label (counted as wrong).")
        parts += ["### Per class",
                  md_table(["label", "precision", "recall", "F1", "support"],
                           [[label, fixed(r["precision"]), fixed(r["recall"]), fixed(r["f1"]), r["support"]]
                            for label, r in classification["per_class"].items()])]
        if "confusion_matrix" in images:
            parts.append(f"![confusion matrix]({images.pop('confusion_matrix')})")
    if sft:
        parts += ["## Instruction following (SFT)",
                  md_table(["examples", "exact match", "token F1", "ROUGE-L"],
                           [[sft.get("n"), *(fixed(sft.get(key)) for key in ("exact_match", "token_f1", "rouge_l"))]])]
    if sft_examples:
        parts += ["### Generated responses beside the reference",
                  md_table(["#", "prompt", "generated", "reference", "token F1"],
                           [[i + 1, e.get("prompt", ""), e["response"], e["reference"], fixed(token_f1(e["response"], e["reference"]))]
                            for i, e in enumerate(sft_examples)])]
    if harness:
        parts += harness_section(harness)
    if samples:
        parts.append("## Samples")
        shown = {key: value for key, value in (sampling or {}).items() if key != "prompts"}  # each sample's below
        if shown:
            parts.append(md_table(list(shown), [list(shown.values())]))
        for i, sample in enumerate(samples, 1):
            parts += [f"**{i}.** prompt: {md_cell(sample.get('prompt') or '(empty)')}", _fenced(sample["text"])]
    if images:
        parts += ["## Figures", *(f"![{caption}]({path})" for caption, path in images.items())]
    return "\n\n".join(parts) + "\n"


def harness_section(harness: dict[str, Any]) -> list[str]:
    """report.md's lm-evaluation-harness section: a row per model, task and metric, or why none."""
    parts = ["## lm-evaluation-harness"]
    if "skipped" in harness:
        return parts + [f"Not run: {md_cell(harness['skipped'])}."]
    rows = [[model, task, metric, fixed(value, 4), figures.get("samples")]
            for model, tasks in harness.items() for task, figures in tasks.items()
            for metric, value in figures.items() if metric != "samples"]
    return parts + ["Each task's first `evaluate.harness.limit` examples, `num_fewshot` solved ones before each "
                    "(params.yaml). lmforge's own tasks are built from held-out documents: `lmforge_cloze` their "
                    "last word, `lmforge_continuation` their ending among four (chance 0.25).",
                    md_table(["model", "task", "metric", "value", "examples"], rows)]
