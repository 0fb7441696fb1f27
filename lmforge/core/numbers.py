"""Numbers as people read them, in every table lmforge writes (report.md, the flow's summary, the
parent MLflow run's description): one format, so a figure reads the same everywhere."""

from __future__ import annotations

import math


def human(value: float) -> str:
    """A number as people read it: integers with thousands separators, floats to 4 significant
    digits without an exponent (from 1,000 up, rounded to a whole number with separators; below
    0.0001, two significant digits: 0.0000038); an exponent only below 10^-8 or from 10^15 up."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    magnitude = abs(value)
    if magnitude == 0:
        return "0"
    if magnitude >= 1e15 or magnitude < 1e-8:
        return f"{value:.3e}"
    if magnitude < 1e-4:  # a relative change near zero (an int8 model's perplexity): still readable
        return f"{value:.{1 - math.floor(math.log10(magnitude))}f}"
    if magnitude >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"
