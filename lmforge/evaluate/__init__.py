"""Evaluation: metrics, baselines, the report and its plots."""
