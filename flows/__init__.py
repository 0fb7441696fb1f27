"""Prefect flows that drive the DVC pipeline (flows/pipeline.py)."""
