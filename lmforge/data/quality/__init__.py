"""The clean stage's per-document work: normalization, quality filters and deduplication."""
