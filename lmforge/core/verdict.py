"""Whether a classifier beats the trivial baseline, in one line a person reads: the one rule behind
the evaluate stage's warning (report.md, its log, the MLflow tag WARNING_TAG) and the flow's summary,
which reads metrics.json and may not import lmforge.evaluate."""

from __future__ import annotations

WARNING_TAG = "lmforge.warning"


def majority_warning(accuracy: float | None, majority_accuracy: float | None) -> str | None:
    """The warning for a model whose test accuracy is at or below always answering the most frequent
    training label; None when it does better, or when either figure is missing (an SFT run)."""
    if accuracy is None or majority_accuracy is None:
        return None
    if accuracy > majority_accuracy + 1e-9:  # equal counts of right answers give equal floats
        return None
    return (f"accuracy {accuracy:.3f} is at or below the majority-class baseline ({majority_accuracy:.3f}): "
            "the model does no better than always answering the most frequent label")
