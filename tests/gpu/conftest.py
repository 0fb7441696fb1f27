"""The CUDA tests (`make test-gpu`): skipped, never failed, where torch sees no GPU, so `make test`
and CI collect them at no cost."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run them with `make test-gpu` where one is lent)")
    for item in items:
        if "tests/gpu/" in item.nodeid.replace("\\", "/"):
            item.add_marker(skip)
