"""docs/reference/params.md, generated from the params models' field descriptions and dvc.yaml:
`python -m lmforge.core.params_reference > docs/reference/params.md` (tests/test_params_reference.py
fails when the committed page differs, or when a params.yaml key has no description).
"""

from __future__ import annotations

import inspect
import json
import re
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from lmforge.core.params import Params
from lmforge.core.section import Section

UNTRACKED = ("runtime", "engine")
HEADER = """# Params reference

Every key of `params.yaml`, generated from the typed params (`lmforge/core/data_params.py`,
`lmforge/core/model_params.py`) by `python -m lmforge.core.params_reference > docs/reference/params.md`:
edit a description there, never here. **Tracked by**: the stages whose `dvc.yaml` `params:` hold
the key, which rerun when it changes ([what reruns](../guides/what-reruns.md)). `runtime:` and
`engine:` change how stages run, never what they compute: no stage tracks them.
"""


def tracked_by(dvc_yaml: Path) -> dict[str, list[str]]:
    """stage -> the params entries it declares: `params:` entries and keys its paths interpolate."""
    stages = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))["stages"]
    entries: dict[str, list[str]] = {}
    for name, spec in stages.items():
        listed = [e for entry in spec.get("params", [])
                  for e in ([entry] if isinstance(entry, str) else [k for keys in entry.values() for k in keys])]
        paths = [spec["cmd"], *map(str, spec.get("deps", [])), *map(str, spec.get("outs", []))]
        entries[name] = listed + [key for path in paths for key in re.findall(r"\$\{([\w.]+)\}", path)]
    return entries


def sections(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, type[Section]]]:
    """(dotted name, section class) for every section, depth first."""
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, Section):
            yield f"{prefix}{name}", field.annotation
            yield from sections(field.annotation, f"{prefix}{name}.")


def type_text(annotation: Any, field: FieldInfo) -> str:
    """The annotation as a reader says it, with the field's bounds (`int > 0`, `` `a` | `b` ``)."""
    text = _annotation_text(annotation)
    bounds = []
    for item in field.metadata:
        for kind, symbol in ((annotated_types.Gt, ">"), (annotated_types.Ge, ">="), (annotated_types.Lt, "<"),
                             (annotated_types.Le, "<=")):
            if isinstance(item, kind):
                bounds.append(f"{symbol} {getattr(item, kind.__name__.lower())}")
        if isinstance(item, annotated_types.MinLen):
            bounds.append(f"at least {item.min_length} long")
    return " ".join([text, ", ".join(bounds)]).strip()


def _annotation_text(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _annotation_text(a) for a in args)
    if origin is list:
        return f"list of {_annotation_text(args[0])}"
    if origin is dict:
        return f"map {_annotation_text(args[0])} -> {_annotation_text(args[1])}"
    return getattr(annotation, "__name__", str(annotation))


def value_text(value: Any) -> str:
    """A default as params.yaml writes it (YAML flow style)."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, str) and not value.isprintable():
        return f"`{json.dumps(value)}`"  # "\n" as written, not a line break
    return "`" + yaml.safe_dump(value, default_flow_style=True, width=10_000).removesuffix("...\n").strip() + "`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") if "\\|" not in text else text


def _item_fields(annotation: Any) -> Iterator[tuple[str, FieldInfo]]:
    """The fields of the section a `list[...]` field holds (data.sources' entries), else nothing."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is list and isinstance(args[0], type) and issubclass(args[0], Section):
        yield from args[0].model_fields.items()


def reference(dvc_yaml: Path = Path("dvc.yaml")) -> str:
    """The page: one table per section (nested sections after their parent)."""
    declared = tracked_by(dvc_yaml)
    parts = [HEADER]
    for name, section in sections(Params):
        about = inspect.cleandoc(section.__doc__ or "").split("\n\n")[0].replace("\n", " ")
        lines = [f"## `{name}`", "", about, "", "| key | type | default | description | tracked by |",
                 "| --- | --- | --- | --- | --- |"]
        for key, sub in section.model_fields.items():
            if isinstance(sub.annotation, type) and issubclass(sub.annotation, Section):
                continue  # its own table follows
            dotted = f"{name}.{key}"
            stages = [stage for stage, entries in declared.items()
                      if any(dotted == e or dotted.startswith(f"{e}.") for e in entries)]
            tracked = ", ".join(stages) if stages else ("none (run-time)" if name.startswith(UNTRACKED) else "none")
            lines.append(f"| `{dotted}` | {type_text(sub.annotation, sub)} | {_cell(value_text(sub.default))} | "
                         f"{_cell(sub.description or '')} | {tracked} |")
            for item_key, item in _item_fields(sub.annotation):  # a list of sections: each item's keys
                default = "required" if item.is_required() else _cell(value_text(item.default))
                lines.append(f"| `{dotted}[].{item_key}` | {type_text(item.annotation, item)} | {default} | "
                             f"{_cell(item.description or '')} | {tracked} |")
        parts.append("\n".join(lines if len(lines) > 6 else lines[:3]) + "\n")  # a section of sections: no table
    return "\n".join(parts)


if __name__ == "__main__":
    sys.stdout.write(reference(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("dvc.yaml")))
