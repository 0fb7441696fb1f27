"""What a logged model declares of its environment (its pip requirements), and MLflow's logging
without re-checking this environment against them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock


def model_requirements() -> list[str]:
    """A logged model's pip requirements: the torch it was exported with or newer, and numpy (MLflow
    adds its own pin). Every one is met by this environment, which they are read from."""
    import torch

    return [f"torch>={torch.__version__.split('+')[0]}", "numpy"]


@contextmanager
def no_requirements_check() -> Iterator[None]:
    """MLflow's log_model without its check that this environment meets the model's requirements:
    model_requirements are read from this environment, so the check can only pass, and it maps every
    installed distribution to its modules first (importlib.metadata.packages_distributions: about a
    second a model). The files logged are the same; a newer MLflow without the hook just checks."""
    from mlflow.utils import environment

    if not hasattr(environment, "warn_dependency_requirement_mismatches"):
        yield
        return
    with mock.patch.object(environment, "warn_dependency_requirement_mismatches", lambda requirements: None):
        yield
