"""The evaluate stage's files: the confusion matrix (PNG and JSON), per-class CSV, label efficiency (CSV
and PNG), and report.md (the models beside the same recipe from scratch and their baselines, what produced
the figures, examples and samples), all written atomically.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.core.io import atomic_path, save_figure, strict_json, write_csv
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
    save_figure(fig, path)


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


# The figures of the label-efficiency table and plot (the first is plotted), per task: keys of a
# classification_report or an SFT report.
LABEL_EFFICIENCY_FIGURES = {"classify": ("accuracy", "macro_f1"), "sft": ("rouge_l", "token_f1", "exact_match", "loss")}
LABEL_EFFICIENCY_SYSTEMS = {"pretrained": "fine-tuned from pretrained", "scratch": "same recipe from scratch",
                            "bag of words": "bag of words"}


def write_label_efficiency_csv(path: str | Path, rows: Sequence[dict[str, Any]], task: str) -> None:
    """train_examples, then <system>_<figure> for each system and figure: one row per training-set
    size (the last: all), for `dvc plots` (nan where a system has no figure, e.g. no bag of words for SFT)."""
    figures = LABEL_EFFICIENCY_FIGURES[task]
    systems = [name for name in LABEL_EFFICIENCY_SYSTEMS if task == "classify" or name != "bag of words"]
    header = ["train_examples"] + [f"{name.replace(' ', '_')}_{figure}" for name in systems for figure in figures]
    write_csv(path, header, [[row["train_examples"], *(_figure(row.get(name), figure) for name in systems
                                                       for figure in figures)] for row in rows])


def _figure(report: dict[str, Any] | None, key: str) -> float:
    value = (report or {}).get(key)
    return math.nan if value is None else float(value)


def plot_label_efficiency(path: str | Path, rows: Sequence[dict[str, Any]], task: str) -> None:
    """PNG: the first of the task's figures against the training-set size (log scale), one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = LABEL_EFFICIENCY_FIGURES[task][0]
    sizes = [row["train_examples"] for row in rows]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for name, label in LABEL_EFFICIENCY_SYSTEMS.items():
        values = [_figure(row.get(name), figure) for row in rows]
        if any(math.isfinite(v) for v in values):
            ax.plot(sizes, values, "o-", label=label, markersize=4)
    ax.set_xscale("log")
    ax.set_xticks(sizes, [human(n) for n in sizes])
    ax.minorticks_off()
    ax.set_xlabel("training examples (the last: all)")
    ax.set_ylabel(f"test {figure.replace('_', ' ')}")
    ax.set_title("label efficiency: what pretraining buys at each training-set size")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, path)


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


# The language-modelling table's rows the report explains: evaluate_lm names them.
PRETRAINED, UNIGRAM = "pretrained", "unigram baseline"
# The loss pretraining started from: its curve's first train loss (the initial weights, on one training
# batch), the top of the drop that the unigram entropy splits in two.
FIRST_STEP = "pretraining's first step (initial weights, one train batch)"
SCRATCH = "same recipe from scratch (random initial weights)"
SFT_FIGURES = {"exact_match": "exact match", "token_f1": "token F1", "rouge_l": "ROUGE-L", "loss": "loss (nats/token)"}
FIGURE_NAMES = {"accuracy": "accuracy", "macro_f1": "macro F1", **SFT_FIGURES,
                **{f"sft_{key}": name for key, name in SFT_FIGURES.items()}}


def beyond_word_frequencies(lm: dict[str, dict[str, Any]]) -> str | None:
    """A sentence splitting pretraining's drop in loss (first step -> pretrained) at the unigram
    entropy: what word frequencies alone give, and what is learning beyond them; None without the rows."""
    try:
        first, unigram, final = (float(lm[name]["loss"]) for name in (FIRST_STEP, UNIGRAM, PRETRAINED))
    except (KeyError, TypeError, ValueError):
        return None
    drop = first - final
    if not all(math.isfinite(v) for v in (first, unigram, final)) or drop <= 0:
        return None
    if final >= unigram:
        return (f"Pretraining took the loss from {first:.3f} to {final:.3f} nats/token, not below the unigram "
                f"entropy {unigram:.3f}: it learned no more than word frequencies.")
    beyond = unigram - final
    return (f"Pretraining took the loss from {first:.3f} to {final:.3f} nats/token. Word frequencies alone (the "
            f"unigram entropy, {unigram:.3f}) account for {first - unigram:.3f} of that drop; the other "
            f"**{beyond:.3f} nats/token ({beyond / drop:.0%})** is learning beyond word frequencies (context).")


def _gain_line(gain: dict[str, float] | None) -> list[str]:
    if not gain:
        return []
    figures = ", ".join(f"{FIGURE_NAMES.get(key, key)} {value:+.3f}" for key, value in gain.items())
    return [f"**What pretraining bought** (the fine-tuned model against the same recipe from scratch; "
            f"positive: better with pretraining): {figures}."]


def _headline(classification: dict[str, Any] | None, baselines: dict[str, dict[str, Any]] | None,
              sft: dict[str, Any] | None, pretraining: Any, system: str) -> list[str]:
    """The table the report leads with: the fine-tuned model, the same recipe from scratch, the baselines."""
    scratch = getattr(pretraining, "scratch", None)
    gain = _gain_line(getattr(pretraining, "gain", None))
    if classification:
        systems = {system: classification, **({SCRATCH: scratch} if scratch else {}), **(baselines or {})}
        return ["## Headline", f"Test split: {classification['n']} examples.",
                md_table(["system", "accuracy", "macro F1", "weighted F1"],
                         [[name, *(fixed(r.get(key)) for key in ("accuracy", "macro_f1", "weighted_f1"))]
                          for name, r in systems.items()]), *gain]
    if sft:
        systems = {system: sft, **({SCRATCH: scratch} if scratch else {})}
        return ["## Headline", f"Test split: {sft.get('n')} examples, greedy generation.",
                md_table(["system", *SFT_FIGURES.values()],
                         [[name, *(fixed(r.get(key)) for key in SFT_FIGURES)] for name, r in systems.items()]), *gain]
    return []


def _label_efficiency(rows: list[dict[str, Any]] | None, task: str, image: str | None) -> list[str]:
    if not rows:
        return []
    first, second = LABEL_EFFICIENCY_FIGURES[task][:2]
    systems = [name for name in LABEL_EFFICIENCY_SYSTEMS if task == "classify" or name != "bag of words"]

    def cell(report: dict[str, Any] | None) -> str:
        return "–" if not report else f"{fixed(report.get(first))} / {fixed(report.get(second))}"

    table = [[f"all ({human(row['train_examples'])})" if i == len(rows) - 1 else row["train_examples"],
              *(cell(row.get(name)) for name in systems)] for i, row in enumerate(rows)]
    return ["## Label efficiency",
            f"The same recipe on the first *n* of a seeded shuffle of the training examples (nested subsets), "
            f"each scored on the same test split: {FIGURE_NAMES[first]} / {FIGURE_NAMES[second]}."
            + (" Bag of words at *all* fits every row of the training file, as in the headline." if task == "classify"
               else ""),
            md_table(["training examples", *(LABEL_EFFICIENCY_SYSTEMS[name] for name in systems)], table)] \
        + ([f"![label efficiency]({image})"] if image else [])


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
    quantized: dict[str, Any] | None = None,
    pretraining: Any = None,
) -> str:
    """The human-readable report: a section per argument given, skipped when it is None.

    lm: name -> {"loss", "perplexity", "tokens"} (e.g. "pretrained", "fine-tuned (SFT)",
        "unigram baseline", FIRST_STEP); classification: a `classification_report`; baselines:
        name -> {"accuracy", "macro_f1", ...}, tabled beside the model; sft: an `sft_report`;
        sft_examples: [{"prompt", "response", "reference"}]; samples: [{"prompt", "text"}]
        generated with `sampling` params; images: caption -> path relative to the report
        ("confusion_matrix" and "label_efficiency" are placed in their sections, the rest under Figures);
        provenance: what produced the figures (commit, runs, model version, method);
        system: the fine-tuned model's name in the tables (e.g. "fine-tuned lmforge (full)");
        warning: a line shown first (a model no better than its majority baseline);
        mixture: named sources -> {"weight", "share", "tokens", "documents", "epochs", "val_loss"}, the
        train split's realised mixture beside the asked weights.
        harness: reports/harness.json ({model: {task: {metric: value}}} or {"skipped": why}).
        quantized: reports/quantization.json (lmforge.evaluate.quantized), the int8 trade as a table.
        pretraining: what pretraining bought (lmforge.evaluate.gain.PretrainingGain: `scratch`, the same
        recipe from scratch's report, tabled beside the model; `gain`; `label_efficiency`'s rows).
    The report leads with the headline table (the model, the same recipe from scratch, the baselines),
    then the provenance.
    """
    images = dict(images or {})
    parts = [f"# {title}"] + ([f"> **Warning:** {md_cell(warning)}"] if warning else [])
    parts += _headline(classification, baselines, sft, pretraining, system)
    if provenance:
        parts += [md_table(["provenance", ""], [[key, value] for key, value in provenance.items()])]
    if lm:
        explained = beyond_word_frequencies(lm)
        parts += ["## Language modelling", "Mean next-token cross-entropy on held-out rows (lower is better).",
                  md_table(["model", "loss (nats/token)", "perplexity", "tokens"],
                           [[name, fixed(r.get("loss")), fixed(r.get("perplexity"), 1), r.get("tokens")]
                            for name, r in lm.items()])] + ([explained] if explained else [])
    if mixture:
        parts += ["## Training mixture", "Share of train tokens each source asked for (mix.weights) and got; "
                  "epochs above 1: the source was repeated, below 1: subsampled. Val loss: the pretrained model "
                  "on that source's own val rows.",
                  md_table(["source", "asked weight", "realised share", "tokens", "documents", "epochs", "val loss"],
                           [[name, fixed(r["weight"]), fixed(r["share"]), r["tokens"], r["documents"],
                             fixed(r["epochs"], 2), fixed(r.get("val_loss")) if r.get("val_loss") is not None
                             else "no val row"] for name, r in mixture.items()])]
    if classification:
        parts += ["## Classification"]
        if classification.get("invalid_predictions"):
            parts.append(f"{classification['invalid_predictions']} predictions were not a known label (counted as wrong).")
        parts += ["### Per class",
                  md_table(["label", "precision", "recall", "F1", "support"],
                           [[label, fixed(r["precision"]), fixed(r["recall"]), fixed(r["f1"]), r["support"]]
                            for label, r in classification["per_class"].items()])]
        if "confusion_matrix" in images:
            parts.append(f"![confusion matrix]({images.pop('confusion_matrix')})")
    parts += _label_efficiency(getattr(pretraining, "label_efficiency", None), "classify" if classification else "sft",
                               images.pop("label_efficiency", None))
    if sft:
        parts.append("## Instruction following (SFT)")
        if classification:  # the headline is the classifier's: the SFT figures here
            parts.append(md_table(["examples", *list(SFT_FIGURES.values())[:3]],
                                  [[sft.get("n"), *(fixed(sft.get(key)) for key in list(SFT_FIGURES)[:3])]]))
    if sft_examples:
        parts += ["### Generated responses beside the reference",
                  md_table(["#", "prompt", "generated", "reference", "token F1"],
                           [[i + 1, e.get("prompt", ""), e["response"], e["reference"], fixed(token_f1(e["response"], e["reference"]))]
                            for i, e in enumerate(sft_examples)])]
    if harness:
        parts += harness_section(harness)
    if quantized:
        parts.append(quantized_section(quantized))
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


def quantized_section(result: dict[str, Any]) -> str:
    """report.md's section: the trade as one table, and a flag when int8 lost more than allowed."""
    lines = [f"## int8 quantization ({result['mode']})", "",
             "Linear layers of the blocks in int8 (torchao); embeddings, norms and head in fp32. Same val rows, "
             "same test set; generation speed is greedy decoding on this machine's CPU.", "",
             "| model | weights | val loss | perplexity | test accuracy | generation tokens/s |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in result["rows"]:
        accuracy = f"{row['accuracy']:.4f}" if row.get("accuracy") is not None else "–"
        lines.append(f"| {row['model']} | {row['bytes'] / 1e6:.2f} MB | {row['val_loss']:.4f} | {row['perplexity']:.2f} "
                     f"| {accuracy} | {row['tokens_per_s']:.0f} |")
    increase, allowed = result["perplexity_increase"], result["max_perplexity_increase"]
    lines += ["", f"Perplexity {increase:+.2%} against fp32 (allowed: {allowed:.2%})."
              + (" **Flagged: int8 loses more than `evaluate.int8_max_perplexity_increase` allows.**"
                 if result["flagged"] else "")]
    return "\n".join(lines) + "\n"
