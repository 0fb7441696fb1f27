"""params.yaml, generated from the params models: their defaults, each field's description as the
key's comment, each section's docstring above it (`python -m lmforge.core.params_yaml > params.yaml`;
tests/test_params_yaml.py fails naming the key when the committed file drifts from the models).

Written in the form DVC's YAML editor (ruamel round-trip, what `dvc exp run -S` rewrites the file
with) writes back unchanged: block lists and maps, null as an empty value, comments that survive
its round trip. So an experiment's `git diff params.yaml` is the one line it changed.
"""

from __future__ import annotations

import difflib
import inspect
import json
import sys
import textwrap
from collections.abc import Iterator, Mapping
from typing import Any

import yaml
from pydantic import BaseModel

from lmforge.core.params import Params
from lmforge.core.section import Section

# Where a key's comment starts (a longer line puts it two spaces after), and the widest a line
# gets where a comment can wrap.
COMMENT_COLUMN = 36
WIDTH = 118
INDENT = "  "  # DVC's editor: mappings indented by 2, a list's dashes at its key's indentation


def params_yaml(values: Mapping[str, Any] | None = None) -> str:
    """The text of params.yaml holding `values` (default: the models' defaults), commented from the
    models. A key the models do not know is written without a comment (tests write bad files too)."""
    if values is None:
        values = Params().model_dump()
    written = list(lines(values))
    for (key, line), (_, after) in zip(written, written[1:]):
        # DVC's editor replaces every list with a new one, dropping what ruamel attached to its last item
        if line.lstrip().startswith("- ") and after.lstrip()[:1] in ("", "#"):
            raise ValueError(f"{key}: a list followed by a comment or a blank line in params.yaml, which "
                             "`dvc exp run -S` would drop: move the field up in its section")
    return "".join(text + "\n" for _, text in written)


def drift(text: str) -> list[str]:
    """The keys whose lines in `text` (a params.yaml) differ from the generated file of the defaults:
    a value other than the model's default, a comment other than its description or docstring
    ('(header)' for the file's own comment)."""
    expected = list(lines(Params().model_dump()))
    keys: list[str] = []
    matcher = difflib.SequenceMatcher(None, [line for _, line in expected], text.splitlines(), autojunk=False)
    for tag, start, end, _, _ in matcher.get_opcodes():
        if tag != "equal":  # an inserted line is charged to the key it precedes
            for key, _ in expected[start:end] or expected[start:start + 1] or expected[-1:]:
                keys.append(key or "(header)")
    return list(dict.fromkeys(keys))


def lines(values: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(dotted key, line) for every line of the file; '' for the file's own header."""
    for line in _comment_block(_doc(Params), ""):
        yield "", line
    for name, value in values.items():
        yield "", ""
        yield from _entry(name, value, _field(Params, name), "", "")


def _entry(key: Any, value: Any, field: tuple[type[BaseModel] | None, str], prefix: str, indent: str
           ) -> Iterator[tuple[str, str]]:
    section, description = field
    dotted = f"{prefix}{key}"
    if section is not None and isinstance(value, Mapping):  # a section: its docstring above it
        for line in _comment_block(_doc(section), indent):
            yield dotted, line
        yield dotted, f"{indent}{key}:"
        for name, sub in value.items():
            yield from _entry(name, sub, _field(section, name), f"{dotted}.", indent + INDENT)
        return
    head = f"{indent}{key}:"
    if isinstance(value, Mapping) and value:
        body = [f"{indent}{INDENT}{_scalar(k)}: {_scalar(v)}" for k, v in value.items()]
    elif isinstance(value, list) and value:
        body = [f"{indent}- {_scalar(item)}" for item in value]
    else:
        head, body = f"{head} {_scalar(value)}".rstrip(), []
    for line in _commented(head, description):
        yield dotted, line
    for line in body:
        yield dotted, line


def _field(model: type[BaseModel] | None, name: str) -> tuple[type[BaseModel] | None, str]:
    """(the section class the field holds, or None; its description) of `model.name`."""
    field = model.model_fields.get(name) if model is not None else None
    if field is None:
        return None, ""
    annotation = field.annotation
    section = annotation if isinstance(annotation, type) and issubclass(annotation, Section) else None
    return section, field.description or ""


def _doc(model: type[BaseModel]) -> str:
    return inspect.cleandoc(model.__doc__ or "")


def _comment_block(text: str, indent: str) -> list[str]:
    """Full-line comments: each paragraph of `text` wrapped to WIDTH."""
    out: list[str] = []
    for paragraph in text.split("\n\n") if text else []:
        out += [f"{indent}#"] if out else []
        out += textwrap.wrap(" ".join(paragraph.split()), WIDTH - len(indent) - 2,
                             initial_indent=f"{indent}# ", subsequent_indent=f"{indent}# ",
                             break_long_words=False, break_on_hyphens=False)
    return out


def _commented(line: str, comment: str) -> list[str]:
    """`line` with `comment` after it at COMMENT_COLUMN, wrapped onto comment lines at that column."""
    if not comment:
        return [line]
    column = max(COMMENT_COLUMN, len(line) + 2)
    wrapped = textwrap.wrap(" ".join(comment.split()), max(WIDTH - column - 2, 40),
                            break_long_words=False, break_on_hyphens=False)
    return [line.ljust(column) + f"# {wrapped[0]}"] + [" " * column + f"# {rest}" for rest in wrapped[1:]]


def _scalar(value: Any) -> str:
    """A scalar as DVC's editor writes it: YAML plain where it reads back the same, quoted otherwise;
    null as nothing."""
    if value is None:
        return ""
    if isinstance(value, str) and not value.isprintable():
        return json.dumps(value)  # "\n" on one line, double-quoted, as ruamel writes it
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, allow_unicode=True)
    text = text.removesuffix("\n").removesuffix("\n...").strip()
    if yaml.safe_load(text) != value:
        raise ValueError(f"{value!r} does not read back from YAML as itself ({text!r})")
    return text


if __name__ == "__main__":
    sys.stdout.write(params_yaml())
