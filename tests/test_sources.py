"""Behaviour of the ingest sources: the built-in stdlib corpus, local files, the Hub source."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import types
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.data.sequential import iter_builtin_documents
from lmforge.data.documents import DOCUMENT_SCHEMA, document_id, to_record_batch
from lmforge.data.sources.configured import COUNTER_KEYS
from lmforge.data.sequential import iter_documents
from lmforge.core.errors import LmforgeError
from lmforge.core.params import DataParams, HfSourceParams

REPO_ROOT = Path(__file__).resolve().parents[1]
# Modules nobody imports by accident: if iterating the corpus put them in sys.modules,
# the corpus imported the stdlib instead of parsing it (`this` prints, `antigravity`
# opens a browser).
NEVER_IMPORTED = ["tkinter", "turtle", "this", "antigravity", "mailbox", "turtledemo", "idlelib"]

_CORPUS_IN_SUBPROCESS = f"""
import json, sys
from collections import Counter
from lmforge.data.sequential import iter_builtin_documents
ids = [doc["id"] for doc in iter_builtin_documents(Counter())]
print(json.dumps({{"ids": ids, "imported": [m for m in {NEVER_IMPORTED!r} if m in sys.modules]}}))
"""


# ---------------------------------------------------------------- built-in corpus


@pytest.fixture(scope="module")
def builtin_corpus() -> tuple[list[dict[str, Any]], Counter]:
    counters: Counter = Counter()
    return list(iter_documents(DataParams(source="builtin"), counters)), counters


@pytest.fixture(scope="module")
def corpus_in_fresh_interpreter() -> dict[str, Any]:
    # A different hash seed too: iteration order must not depend on set/dict hashing.
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONHASHSEED": "12345"}
    result = subprocess.run(
        [sys.executable, "-c", _CORPUS_IN_SUBPROCESS],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, check=True,
    )
    return json.loads(result.stdout)


def test_builtin_corpus_has_module_class_function_and_topic_documents(builtin_corpus):
    docs, _ = builtin_corpus
    assert {doc["kind"] for doc in docs} == {"module", "class", "function", "topic"}
    assert all(doc["module"] and doc["package"] and doc["name"] for doc in docs)
    assert {doc["source"] for doc in docs} == {"stdlib", "pydoc_topics"}
    assert all(doc["package"] == "pydoc_topics" for doc in docs if doc["kind"] == "topic")


def test_builtin_functions_and_methods_carry_their_signature(builtin_corpus):
    docs, _ = builtin_corpus
    functions = [doc for doc in docs if doc["kind"] == "function"]
    assert all(doc["signature"].startswith(("def ", "async def ")) for doc in functions)
    assert all(doc["signature"] is None for doc in docs if doc["kind"] != "function")
    decode = next(doc for doc in docs if doc["name"] == "JSONDecoder.decode")
    assert (decode["module"], decode["package"]) == ("json.decoder", "json")
    assert decode["signature"] == "def decode(self, s, _w=WHITESPACE.match)"
    assert any(doc["signature"].startswith("async def ") for doc in functions)


def test_builtin_corpus_is_megabytes_of_docstrings_without_test_suites(builtin_corpus):
    docs, counters = builtin_corpus
    assert 1_000_000 < counters["bytes"] < 20_000_000
    assert counters["documents"] == len(docs) > 5000
    assert counters["files_read"] > 500
    skipped = {"test", "tests", "idle_test"}
    assert not [doc["module"] for doc in docs if skipped & set(doc["module"].split("."))]


def test_builtin_corpus_imports_no_stdlib_module(corpus_in_fresh_interpreter):
    assert corpus_in_fresh_interpreter["imported"] == []


def test_builtin_corpus_is_identical_in_another_process(builtin_corpus, corpus_in_fresh_interpreter):
    docs, _ = builtin_corpus
    assert [doc["id"] for doc in docs] == corpus_in_fresh_interpreter["ids"]


def test_builtin_package_filter_keeps_only_those_packages():
    docs = list(iter_builtin_documents(Counter(), packages={"json"}))
    assert docs and {doc["package"] for doc in docs} == {"json"}


def test_builtin_documents_fit_the_document_schema():
    docs = list(iter_builtin_documents(Counter(), packages={"json", "pydoc_topics"}))
    assert to_record_batch(docs).schema == DOCUMENT_SCHEMA


# ---------------------------------------------------------------- local files


def ingest(files: list[str], **params: Any) -> tuple[list[dict[str, Any]], Counter]:
    counters: Counter = Counter()
    docs = list(iter_documents(DataParams(source="files", files=files, **params), counters))
    return docs, counters


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # Globs are relative to the working directory, as in a DVC stage.
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_jsonl(path: Path, rows: list[Any]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def test_txt_file_is_one_stripped_document_named_by_its_path(tmp_path):
    (tmp_path / "a.txt").write_text("\n  Hello world.\nSecond line.\n\n", encoding="utf-8")
    docs, counters = ingest(["*.txt"])
    assert [doc["text"] for doc in docs] == ["Hello world.\nSecond line."]
    assert docs[0]["source"] == "files" and docs[0]["name"] == "a.txt"
    assert docs[0]["id"] == document_id("Hello world.\nSecond line.")
    assert docs[0]["module"] is None and docs[0]["kind"] is None
    assert counters["files_read"] == 1


def test_txt_separator_splits_documents_and_counts_empty_pieces(tmp_path):
    (tmp_path / "a.txt").write_text("one\n===\n two \n===\n  \n===\nthree", encoding="utf-8")
    docs, counters = ingest(["a.txt"], txt_separator="===")
    assert [doc["text"] for doc in docs] == ["one", "two", "three"]
    assert counters["empty_pieces"] == 1


def test_txt_separator_split_across_read_chunks_is_exact(tmp_path, monkeypatch):
    monkeypatch.setattr("lmforge.data.sources.readers.READ_CHUNK_BYTES", 4)
    (tmp_path / "a.txt").write_text("first piece<SEP>second piece<SEP>third", encoding="utf-8")
    docs, _ = ingest(["a.txt"], txt_separator="<SEP>")
    assert [doc["text"] for doc in docs] == ["first piece", "second piece", "third"]


def test_files_are_read_in_sorted_order_once_across_globs(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ["b.txt", "a.txt", "sub/c.txt"]:
        (tmp_path / name).write_text(f"text of {name}", encoding="utf-8")
    docs, counters = ingest(["b.txt", "**/*.txt", "./a.txt"])
    assert [doc["name"] for doc in docs] == ["a.txt", "b.txt", "sub/c.txt"]
    assert counters["files_read"] == 3


_RESOLVE_IN_SUBPROCESS = """
import json, sys
from lmforge.data.sources.locations import resolve_files
print(json.dumps(resolve_files(sys.argv[1:])))
"""


def test_symlink_loops_under_a_recursive_glob_end_and_each_file_is_read_once(tmp_path):
    (tmp_path / "corpus" / "d").mkdir(parents=True)
    (tmp_path / "corpus" / "a.txt").write_text("alpha text", encoding="utf-8")
    (tmp_path / "corpus" / "d" / "b.txt").write_text("beta text", encoding="utf-8")
    os.symlink("..", tmp_path / "corpus" / "d" / "loop")  # d/loop/d/loop/... forever
    os.symlink("..", tmp_path / "corpus" / "d" / "loop2")  # two loops: glob's ** branches 2^depth
    # In a subprocess: a walk that never ends must fail the test, not hang it.
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}  # this checkout's lmforge, from any cwd
    result = subprocess.run([sys.executable, "-c", _RESOLVE_IN_SUBPROCESS, "corpus/**/*.txt"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30, check=True)
    assert json.loads(result.stdout) == ["corpus/a.txt", "corpus/d/b.txt"]
    docs, counters = ingest(["corpus/**/*.txt"])
    assert sorted(doc["text"] for doc in docs) == ["alpha text", "beta text"] and counters["files_read"] == 2


def test_symlinked_directory_is_followed_and_its_files_read_once(tmp_path):
    (tmp_path / "corpus" / "real").mkdir(parents=True)
    (tmp_path / "corpus" / "real" / "a.txt").write_text("alpha text", encoding="utf-8")
    os.symlink("real", tmp_path / "corpus" / "alias")
    docs, _ = ingest(["corpus/**/*.txt"])
    assert [doc["name"] for doc in docs] == ["corpus/alias/a.txt"]  # the first spelling in sorted order


def test_glob_matching_more_than_the_cap_names_the_glob_and_says_narrow_it(tmp_path, monkeypatch):
    monkeypatch.setattr("lmforge.data.sources.locations.MAX_GLOB_MATCHES", 3)
    for i in range(4):
        (tmp_path / f"{i}.txt").write_text("text", encoding="utf-8")
    with pytest.raises(LmforgeError, match=r"'\*\*/\*\.txt' matches more than 3 files; narrow the glob"):
        ingest(["**/*.txt"])


def test_jsonl_bad_lines_are_counted_and_named_by_file_and_line(tmp_path, caplog):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "good one"}\n{not json\n[1, 2]\n\n{"text": "good two"}\n')
    with caplog.at_level(logging.WARNING):
        docs, counters = ingest(["d.jsonl"])
    assert [doc["text"] for doc in docs] == ["good one", "good two"]
    assert counters["bad_json_lines"] == 2
    assert "d.jsonl:2" in caplog.text and "d.jsonl:3" in caplog.text


def test_jsonl_rows_missing_text_are_counted_and_extra_fields_ignored(tmp_path):
    rows = [
        {"body": "the text", "lang": "en"},
        {"body": 7}, {"body": "   "}, {"other": "x"}, {"body": None},
    ]
    write_jsonl(tmp_path / "d.jsonl", rows)
    docs, counters = ingest(["d.jsonl"], text_field="body")
    assert [doc["text"] for doc in docs] == ["the text"]
    assert set(docs[0]) == set(DOCUMENT_SCHEMA.names)
    assert counters["rows_missing_text"] == 4


def test_jsonl_lone_surrogate_is_replaced_and_counted(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "bad \\ud800 escape"}\n', encoding="utf-8")
    docs, counters = ingest(["d.jsonl"])
    assert docs[0]["text"] == "bad ? escape"
    assert counters["decode_replaced_docs"] == 1
    to_record_batch(docs)  # writable to Arrow


def test_utf8_byte_order_mark_does_not_break_the_first_row(tmp_path):
    (tmp_path / "d.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "first"}\n')
    (tmp_path / "d.csv").write_bytes(b"\xef\xbb\xbftext\nsecond\n")
    docs, counters = ingest(["d.*"])
    assert sorted(doc["text"] for doc in docs) == ["first", "second"]
    assert counters["bad_json_lines"] == 0


def test_parquet_text_column_is_read_batch_by_batch(tmp_path):
    texts = [f"document number {i}" for i in range(5)]
    table = pa.table({"id": list(range(5)), "text": texts})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=2)
    docs, counters = ingest(["d.parquet"], batch_size=2)
    assert [doc["text"] for doc in docs] == texts
    assert counters["documents"] == 5


def test_parquet_null_and_empty_texts_are_counted(tmp_path):
    pq.write_table(pa.table({"text": ["kept", None, ""]}), tmp_path / "d.parquet")
    docs, counters = ingest(["d.parquet"])
    assert [doc["text"] for doc in docs] == ["kept"]
    assert counters["rows_missing_text"] == 2


def test_parquet_without_the_text_column_names_file_columns_and_key(tmp_path):
    pq.write_table(pa.table({"content": ["x"], "label": [1]}), tmp_path / "d.parquet")
    with pytest.raises(LmforgeError) as error:
        ingest(["d.parquet"])
    message = str(error.value)
    assert "d.parquet" in message and "content" in message and "data.text_field" in message


def test_csv_text_column_is_read_with_quoted_newlines(tmp_path):
    (tmp_path / "d.csv").write_text(
        'id,text\n1,"line one\nline two"\n2,\n3,plain\n', encoding="utf-8"
    )
    docs, counters = ingest(["d.csv"])
    assert [doc["text"] for doc in docs] == ["line one\nline two", "plain"]
    assert counters["rows_missing_text"] == 1


def test_csv_field_of_10_megabytes_is_read(tmp_path):
    big = "word " * 2_000_000
    (tmp_path / "d.csv").write_text(f"text\n{big.strip()}\n", encoding="utf-8")
    docs, _ = ingest(["d.csv"])
    assert docs[0]["text"] == big.strip()


def test_csv_without_the_text_column_names_file_and_key(tmp_path):
    (tmp_path / "d.csv").write_text("title,body\na,b\n", encoding="utf-8")
    with pytest.raises(LmforgeError, match=r"d\.csv.*'title', 'body'.*data\.text_field"):
        ingest(["d.csv"])


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("d.txt", b"caf\xe9 latte", "caf\ufffd latte"),
        ("d.jsonl", b'{"text": "caf\xe9 latte"}\n{"text": "clean"}\n', "caf\ufffd latte"),
        ("d.csv", b"text\ncaf\xe9 latte\nclean\n", "caf\ufffd latte"),
    ],
)
def test_invalid_utf8_is_replaced_not_skipped_and_counted(tmp_path, name, content, expected):
    (tmp_path / name).write_bytes(content)
    docs, counters = ingest([name])
    assert docs[0]["text"] == expected
    assert counters["decode_replaced_docs"] == 1


def test_binary_file_is_skipped_with_a_warning(tmp_path, caplog):
    (tmp_path / "blob.txt").write_bytes(b"PK\x03\x04\x00\x00binary")
    (tmp_path / "ok.txt").write_text("real text", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        docs, counters = ingest(["*.txt"])
    assert [doc["name"] for doc in docs] == ["ok.txt"]
    assert counters["binary_files_skipped"] == 1 and counters["files_read"] == 1
    assert "blob.txt" in caplog.text


def test_empty_file_is_counted_and_skipped(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "ok.txt").write_text("real text", encoding="utf-8")
    docs, counters = ingest(["*"])
    assert len(docs) == 1 and counters["empty_files"] == 1


def test_glob_matching_nothing_names_the_glob_and_data_files(tmp_path):
    (tmp_path / "ok.txt").write_text("real text", encoding="utf-8")
    with pytest.raises(LmforgeError, match=r"'corpus/\*\*/\*\.txt'.*data\.files"):
        ingest(["ok.txt", "corpus/**/*.txt"])


def test_unknown_extension_fails_before_any_document_is_read(tmp_path):
    (tmp_path / "a.txt").write_text("real text", encoding="utf-8")
    (tmp_path / "b.md").write_text("# notes", encoding="utf-8")
    documents = iter_documents(DataParams(source="files", files=["*"]), Counter())
    with pytest.raises(LmforgeError, match=r"b\.md.*\.txt, \.jsonl, \.parquet, \.csv"):
        next(documents)


def test_10_megabyte_single_line_txt_is_one_intact_document(tmp_path):
    line = "".join(f"token{i} " for i in range(1_200_000)).strip()
    assert len(line) > 10_000_000
    (tmp_path / "big.txt").write_text(line + "\n", encoding="utf-8")
    docs, counters = ingest(["big.txt"])
    assert len(docs) == 1 and docs[0]["text"] == line
    assert counters["bytes"] == len(line)


def test_every_counter_key_is_reported_even_when_zero(tmp_path):
    (tmp_path / "a.txt").write_text("real text", encoding="utf-8")
    _, counters = ingest(["a.txt"])
    assert set(COUNTER_KEYS) <= set(counters)


# ---------------------------------------------------------------- Hugging Face Hub


class FakeStream:
    column_names = ["text", "meta"]

    def __init__(self, rows: list[dict[str, Any]]):
        self.rows = rows

    def __iter__(self):
        return iter(self.rows)


def fake_datasets(monkeypatch: pytest.MonkeyPatch, load_dataset: Any) -> list[tuple]:
    calls: list[tuple] = []

    def recording_load(*args: Any, **kwargs: Any) -> Any:
        calls.append((args, kwargs))
        return load_dataset(*args, **kwargs)

    # A stand-in module: the tests stay offline and skip importing `datasets`.
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=recording_load))
    return calls


def test_hf_stream_stops_at_max_documents_and_counts_rows_without_text(monkeypatch):
    rows = [{"text": ""}, {"text": "a"}, {"meta": 1}, {"text": "b"}, {"text": "c"}]
    calls = fake_datasets(monkeypatch, lambda *a, **k: FakeStream(rows))
    params = DataParams(source="hf", hf=HfSourceParams(name="org/set", max_documents=2))
    counters: Counter = Counter()
    docs = list(iter_documents(params, counters))
    assert [(doc["text"], doc["source"], doc["name"]) for doc in docs] == [
        ("a", "hf", "org/set"), ("b", "hf", "org/set"),
    ]
    assert counters["rows_missing_text"] == 2
    assert calls[0][1]["streaming"] is True


def test_hf_load_failure_names_the_dataset_and_the_offline_alternative(monkeypatch):
    def offline(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("no network")

    fake_datasets(monkeypatch, offline)
    params = DataParams(source="hf", hf=HfSourceParams(name="org/set"))
    with pytest.raises(LmforgeError, match=r"data\.hf\.name 'org/set'.*no network.*data\.source: files"):
        list(iter_documents(params, Counter()))
