"""The built-in corpus: docstrings of the running Python's standard library, read with `ast`
from its source files (nothing imported), plus the language reference topics of `pydoc_data`.
"""

from __future__ import annotations

import ast
import logging
import os
import sysconfig
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from lmforge.data.documents import Document, make_document

logger = logging.getLogger(__name__)

# Test suites are code written to exercise the library, not prose about it (and
# lib2to3's test data holds files that are not valid Python on purpose).
SKIPPED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
TOPICS_PACKAGE = "pydoc_topics"

_Definition = ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef
# Statements whose bodies still belong to the enclosing scope (platform branches,
# optional imports with fallbacks): stdlib defines many functions inside them.
_Block = ast.If | ast.Try | ast.With | ast.AsyncWith


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def iter_builtin_files(files: list[str], topics: bool, counters: Counter) -> Iterator[Document]:
    """One partition of the built-in corpus: the documents of these stdlib files (paths relative to
    stdlib_dir(), in this order), then the topics if `topics`. The partitions of
    stdlib_source_files() in order, topics in the last, give the whole corpus in order
    (lmforge.data.sequential.iter_builtin_documents)."""
    root = stdlib_dir()
    for relative in files:
        yield from _module_documents(root / relative, module_name(Path(relative)), counters)
    if topics:
        yield from iter_topic_documents()


def stdlib_source_files(root: Path) -> list[Path]:
    """The stdlib's .py files that are importable library modules, sorted by relative path."""
    found: list[Path] = []
    for current, dirnames, filenames in os.walk(root):
        # Pruning in place stops os.walk descending; sorting keeps the walk reproducible.
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS and d.isidentifier())
        found.extend(
            Path(current, name)
            for name in filenames
            if name.endswith(".py") and name[:-3].isidentifier()
        )
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())


def module_name(relative: Path) -> str:
    """"json/decoder.py" -> "json.decoder"; "json/__init__.py" -> "json"."""
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _module_documents(path: Path, module: str, counters: Counter) -> Iterator[Document]:
    try:
        # Bytes, so that ast honours each file's own coding declaration.
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, RecursionError) as exc:
        counters["parse_errors"] += 1
        logger.debug("skipping %s: %s", path, exc)
        return
    counters["files_read"] += 1
    package = module.split(".")[0]

    def document(text: str, kind: str, name: str, signature: str | None = None) -> Document:
        return make_document(
            text, "stdlib", module=module, package=package, kind=kind, name=name, signature=signature
        )

    docstring = ast.get_docstring(tree, clean=True)
    if docstring and docstring.strip():
        yield document(docstring, "module", module)
    for node, qualname in _definitions(tree.body, prefix=""):
        docstring = ast.get_docstring(node, clean=True)
        if not docstring or not docstring.strip():
            continue
        if isinstance(node, ast.ClassDef):
            yield document(docstring, "class", qualname)
        else:
            yield document(docstring, "function", qualname, signature(node))


def _definitions(body: list[ast.stmt], prefix: str) -> Iterator[tuple[_Definition, str]]:
    """Classes and functions of a scope with their qualified names, methods and nested
    classes included; function bodies are not entered (their locals are implementation)."""
    for statement in body:
        if isinstance(statement, _Definition):
            qualname = prefix + statement.name
            yield statement, qualname
            if isinstance(statement, ast.ClassDef):
                yield from _definitions(statement.body, qualname + ".")
        elif isinstance(statement, _Block):
            yield from _definitions(_block_bodies(statement), prefix)


def _block_bodies(block: ast.stmt) -> list[ast.stmt]:
    statements = list(block.body)
    if isinstance(block, ast.If):
        statements += block.orelse
    elif isinstance(block, ast.Try):
        for handler in block.handlers:
            statements += handler.body
        statements += block.orelse + block.finalbody
    return statements


def signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """The source form of a def line: "def decode(self, s, _w=WHITESPACE.match) -> Any"."""
    keyword = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    returns = f" -> {ast.unparse(node.returns)}" if node.returns is not None else ""
    return f"{keyword} {node.name}({ast.unparse(node.args)}){returns}"


def iter_topic_documents() -> Iterator[Document]:
    """The language reference topics `help("assert")` shows, sorted by topic name."""
    # pydoc_data.topics is one dict literal with no imports: importing it runs nothing else.
    from pydoc_data.topics import topics

    for name in sorted(topics):
        text = topics[name].strip()
        if text:
            yield make_document(
                text, TOPICS_PACKAGE, module="pydoc_data.topics", package=TOPICS_PACKAGE,
                kind="topic", name=name,
            )
