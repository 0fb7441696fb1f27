"""Evaluation as pure functions: LM loss/perplexity over shards, classification metrics and
baselines (scikit-learn), SFT text metrics, a fine-tuned model scored on its test set.

Nothing here reads params, opens MLflow or writes files (lmforge.evaluate.report writes them).
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from lmforge.core.errors import LmforgeError
from lmforge.train.batches import RowDataset

from lmforge.model.loss import lm_loss
from lmforge.train.validation import perplexity, summed_loss

# --- language modelling ------------------------------------------------------------------------


def _row_batches(rows: RowDataset, n_rows: int, size: int, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """Rows 0 .. n_rows-1 in order, `size` at a time: input row[:-1], target row[1:]."""
    for start in range(0, n_rows, size):
        block = torch.from_numpy(np.stack([np.asarray(rows[i]) for i in range(start, min(start + size, n_rows))])
                                 .astype(np.int64)).to(device)
        yield {"inputs": block[:, :-1], "targets": block[:, 1:]}


def language_model_loss(
    model: nn.Module,
    rows: RowDataset,
    micro_batch_size: int,
    max_rows: int | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, float | int]:
    """Mean next-token cross-entropy (nats/token) and perplexity over the rows of a split.

    `rows` is a `ShardReader` (or anything indexable whose rows are seq_len+1 ids): input
    row[:-1], target row[1:]. Rows are read in index order (rows 0 .. max_rows-1), so two
    models evaluated with the same `max_rows` see exactly the same tokens. The loss is summed
    in float64 and divided once by the token count, so it does not depend on the batch size.
    Returns {"loss", "perplexity", "tokens", "rows"}.
    """
    if micro_batch_size <= 0:
        raise LmforgeError(f"micro_batch_size must be positive (got {micro_batch_size})")
    n_rows = len(rows) if max_rows is None else min(len(rows), max_rows)
    if n_rows <= 0:
        raise LmforgeError(
            f"nothing to evaluate: the split has {len(rows)} rows and max_rows is {max_rows}; "
            "rerun `dvc repro tokenize` or raise max_rows"
        )
    config = getattr(model, "config", None)
    vocab = getattr(rows, "vocab_size", None)
    if config is not None and vocab is not None:
        config.check_vocab(int(vocab))  # an id past the embedding table is an opaque index error
    device = torch.device(device)
    (loss_total, tokens), _ = summed_loss(model, _row_batches(rows, n_rows, micro_batch_size, device), lm_loss, device)
    loss = float(loss_total / tokens)
    return {"loss": loss, "perplexity": perplexity(loss), "tokens": int(tokens), "rows": n_rows}


# --- classification ----------------------------------------------------------------------------


def classification_report(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro/weighted F1, per-class precision/recall/F1/support and the confusion
    matrix (rows true, columns predicted, in `labels` order), all from sklearn.metrics.

    A class never predicted has precision 0 (zero_division=0), not a warning and not NaN, so
    the report stays valid JSON. A prediction outside `labels` (a generated label the task does
    not know) counts as wrong for accuracy and for the recall of its true class, belongs to no
    column of the matrix, and is counted in `invalid_predictions`. Plain Python types only.
    """
    from sklearn import metrics as skm  # here, not at the top: SFT and promote's usual path never score labels

    labels = list(labels)
    known = set(labels)
    if not labels:
        raise ValueError("labels is empty: pass the task's label set")
    unknown_true = sorted(set(y_true) - known)
    if unknown_true:
        raise LmforgeError(f"true labels {unknown_true[:5]} are not in the task's labels {labels[:10]}")
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    matrix = skm.confusion_matrix(y_true, y_pred, labels=labels)
    return {
        "n": len(y_true),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "macro_f1": float(skm.f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "weighted_f1": float(skm.f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)),
        "invalid_predictions": sum(1 for p in y_pred if p not in known),
        "per_class": {
            label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for label, p, r, f, s in zip(labels, precision, recall, f1, support)
        },
        "confusion": {"labels": labels, "matrix": matrix.tolist()},
    }


def _baseline_summary(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    report = classification_report(y_true, y_pred, labels)
    return {k: report[k] for k in ("n", "accuracy", "macro_f1", "weighted_f1")} | {"predictions": list(y_pred)}


def majority_baseline(
    train_labels: Sequence[str], test_labels: Sequence[str], labels: Sequence[str] | None = None
) -> dict[str, Any]:
    """Always predict the most frequent training label (ties: the alphabetically first, as
    sklearn's DummyClassifier does), scored on the test split. The floor a classifier must beat.

    `labels` is the label set for macro F1; pass the one the model's report used so the
    numbers compare (default: every label seen in train or test).
    """
    if not train_labels:
        raise LmforgeError("the train split has no labelled examples: nothing to take a majority of")
    counts = Counter(train_labels)
    top = max(counts.values())
    majority = min(label for label, c in counts.items() if c == top)
    labels = sorted(set(train_labels) | set(test_labels)) if labels is None else labels
    return {"label": majority} | _baseline_summary(test_labels, [majority] * len(test_labels), labels)


def bag_of_words_baseline(
    train_texts: Sequence[str],
    train_labels: Sequence[str],
    test_texts: Sequence[str],
    test_labels: Sequence[str],
    seed: int = 0,
    labels: Sequence[str] | None = None,
) -> dict[str, Any]:
    """TF-IDF word uni+bigrams -> logistic regression, trained on train, scored on test.

    The classic strong-and-cheap text classifier: if a fine-tuned LM does not beat it, the LM
    adds nothing. class_weight="balanced" so a skewed label set does not reduce it to the
    majority baseline. lbfgs is deterministic; `seed` is passed for solvers that are not.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    if len(set(train_labels)) < 2:
        raise LmforgeError(
            f"the train split has {len(set(train_labels))} distinct label(s): a classifier needs at least 2"
        )
    pipeline = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1),
        LogisticRegression(max_iter=1000, class_weight="balanced", random_state=seed),
    )
    pipeline.fit(list(train_texts), list(train_labels))
    predictions = [str(p) for p in pipeline.predict(list(test_texts))]
    labels = sorted(set(train_labels) | set(test_labels)) if labels is None else labels
    return _baseline_summary(test_labels, predictions, labels)


# --- SFT text metrics --------------------------------------------------------------------------


def normalize_text(text: str) -> str:
    """NFKC, case-folded, whitespace runs collapsed to one space, stripped.

    Punctuation and articles are kept (unlike SQuAD's normalizer): responses here are often
    code and docstrings, where `f(x)` and `fx` differ.
    """
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def exact_match(pred: str, ref: str) -> float:
    """1.0 when the normalized texts (see `normalize_text`) are equal, else 0.0."""
    return float(normalize_text(pred) == normalize_text(ref))


def token_f1(pred: str, ref: str) -> float:
    """SQuAD-style F1 over bags of normalized whitespace tokens (order ignored, counts kept).

    Two empty texts agree (1.0); one empty text against a non-empty one scores 0.0.
    """
    p, r = normalize_text(pred).split(), normalize_text(ref).split()
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def _lcs_length(a: list[str], b: list[str]) -> int:
    """Longest common subsequence by dynamic programming, one row at a time (O(len(b)) memory)."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 (Lin 2004, beta=1): LCS of the normalized whitespace tokens, P = LCS/len(pred),
    R = LCS/len(ref), F = 2PR/(P+R). Empty texts as in `token_f1`.

    Hand-written (rouge-score is not a dependency) and tokenized like the other two metrics, so
    the three are comparable; rouge-score's own tokenizer would also drop punctuation.
    """
    p, r = normalize_text(pred).split(), normalize_text(ref).split()
    if not p or not r:
        return float(p == r)
    lcs = _lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def sft_report(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float | int]:
    """Means of exact match, token F1 and ROUGE-L over paired generations and references."""
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references")
    if not preds:
        raise LmforgeError("no SFT examples to score: the eval split is empty")
    return {
        "n": len(preds),
        "exact_match": float(np.mean([exact_match(p, r) for p, r in zip(preds, refs)])),
        "token_f1": float(np.mean([token_f1(p, r) for p, r in zip(preds, refs)])),
        "rouge_l": float(np.mean([rouge_l(p, r) for p, r in zip(preds, refs)])),
    }


# --- a fine-tuned model on its test set (evaluate scores the new model, promote re-scores the champion)


def score_classifier(finetuned: Any, texts: Sequence[str], truth: Sequence[str]) -> dict[str, Any]:
    """classification_report of a loaded classifier (lmforge.finetune.inference.FinetunedModel) on test rows."""
    return classification_report(truth, finetuned.predict(list(texts)), finetuned.labels)


@torch.no_grad()
def score_sft(finetuned: Any, prompts: Sequence[str], refs: Sequence[str], max_new_tokens: int,
              seed: int) -> tuple[dict[str, Any], list[str]]:
    """(sft_report + test loss and perplexity, the generations) of a loaded SFT model. Greedy
    decoding: the figures do not depend on a sampling seed."""
    loss_sum, n_tokens = finetuned.lm_loss(list(prompts), list(refs))
    preds = finetuned.generate(list(prompts), max_new_tokens=max_new_tokens, temperature=0.0,
                               top_k=None, top_p=None, seed=seed)
    loss = loss_sum / max(n_tokens, 1)
    return sft_report(preds, refs) | {"loss": loss, "perplexity": perplexity(loss)}, preds


def model_scores(task: str, report: Mapping[str, Any]) -> dict[str, float]:
    """The model's own test figures, named as in reports/metrics.json (promote.metric picks one)."""
    if task == "classify":
        return {key: report[key] for key in ("accuracy", "macro_f1", "weighted_f1")}
    return {f"sft_{key}": value for key, value in report.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}
