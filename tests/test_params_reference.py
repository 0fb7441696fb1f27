"""The params reference (docs/reference/params.md) is generated from the typed params' field
descriptions, so it cannot drift from the code: these tests fail when the committed page is not
what the generator writes, or when a key of params.yaml has no description to generate it from."""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel

from conftest import REPO
from lmforge.core.params import Params
from lmforge.core.params_reference import reference

PAGE = REPO / "docs/reference/params.md"


def undescribed(values: dict[str, Any], model: type[BaseModel], prefix: str = "") -> list[str]:
    """The keys of `values` (params.yaml, walked alongside the models) whose field has no description."""
    missing = []
    for key, value in values.items():
        field = model.model_fields[key]
        if not (field.description or "").strip():
            missing.append(f"{prefix}{key}")
        annotation = field.annotation
        if isinstance(value, dict) and isinstance(annotation, type) and issubclass(annotation, BaseModel):
            missing += undescribed(value, annotation, f"{prefix}{key}.")
    return missing


def test_the_committed_params_reference_is_the_generated_one():
    assert PAGE.read_text(encoding="utf-8") == reference(REPO / "dvc.yaml"), (
        f"{PAGE.relative_to(REPO)} is stale: regenerate it with "
        "`python -m lmforge.core.params_reference > docs/reference/params.md`")


def test_every_params_yaml_key_has_a_description():
    missing = undescribed(yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8")), Params)
    assert not missing, f"give these fields a Field(description=...) in lmforge/core/*_params.py: {missing}"
