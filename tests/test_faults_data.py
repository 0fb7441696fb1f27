"""Bad data is one clear error or a counted skip, never a traceback or a silent change: fine-tuning
files read by ingest's readers, an empty ingest that keeps the previous outputs, text that spells a
special token, and CSV cells a spreadsheet would run as formulas."""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.data.documents import make_document, split_of
from lmforge.core.io import spreadsheet_safe
from lmforge.data.documents import DocumentWriter
from lmforge.data.sequential import encode_to_shards
from lmforge.data.tokens.shards import ShardReader
from lmforge.data.sequential import iter_documents
from lmforge.data.tokens.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from lmforge.core.digests import file_sha256
from lmforge.core.errors import LmforgeError
from lmforge.evaluate.report import write_per_class_csv
from lmforge.finetune.examples import encode_sft, encode_texts, read_examples, special_ids
from lmforge.train.curves import write_curve_csv
from lmforge.core.params import DataParams, FinetuneParams, TokenizerParams

from conftest import make_repo, make_texts, run, write_params

SPECIALS = "<|endoftext|>", "<|pad|>"


def ft_params(path: Path, task: str = "classify") -> FinetuneParams:
    return FinetuneParams(task=task, train_file=str(path))


def write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- fine-tuning files, ingest's rules


def test_finetune_jsonl_with_invalid_utf8_is_read_with_replacement_and_a_warning(tmp_path, caplog):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "caf\xe9 au lait", "label": "a"}\n{"text": "tea", "label": "b"}\n')
    with caplog.at_level(logging.WARNING):
        rows = read_examples(path, ft_params(path))
    assert [r["text"] for r in rows] == ["caf\ufffd au lait", "tea"]
    assert "train.jsonl: 1 rows had invalid UTF-8" in caplog.text


def test_finetune_lone_surrogate_escape_is_replaced_so_the_tokenizer_can_read_it(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "bad \\ud800 half", "label": "a"}\n', encoding="utf-8")
    (row,) = read_examples(path, ft_params(path))
    assert row["text"] == "bad ? half"  # as ingest replaces them


def test_finetune_file_that_is_not_parquet_is_one_error_naming_the_file(tmp_path):
    path = tmp_path / "train.parquet"
    path.write_bytes(b"this is not parquet at all")
    with pytest.raises(LmforgeError, match=r"train\.parquet is not a readable Parquet file") as info:
        read_examples(path, ft_params(path))
    assert "\n" not in str(info.value)


def test_finetune_parquet_with_a_corrupt_page_is_one_error_naming_the_file(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(100)], "label": ["a", "b"] * 50}), path,
                   compression="none")
    data = bytearray(path.read_bytes())
    data[4:68] = b"\xff" * 64  # the first page header; the footer (schema) stays readable
    path.write_bytes(bytes(data))
    with pytest.raises(LmforgeError, match=r"train\.parquet is corrupt after row 0"):
        read_examples(path, ft_params(path))


def test_finetune_non_string_fields_are_skipped_counted_and_named_never_stringified(tmp_path, caplog):
    path = write_lines(tmp_path / "train.jsonl", [
        {"text": "good one", "label": "a"},
        {"text": ["a", "list"], "label": "a"},
        {"text": {"a": "dict"}, "label": "b"},
        {"text": 3.5, "label": "b"},
        {"text": "list label", "label": ["a"]},
        {"text": "   ", "label": "a"},
        {"label": "a"},
        {"text": "good two", "label": "b"},
    ])
    with caplog.at_level(logging.WARNING):
        rows = read_examples(path, ft_params(path))
    assert [(r["text"], r["label"]) for r in rows] == [("good one", "a"), ("good two", "b")]
    assert "train.jsonl:2: field 'text' is a list, not a string (finetune.text_field)" in caplog.text
    assert "train.jsonl:5: field 'label' is a list, not a string (finetune.label_field)" in caplog.text
    assert "2 rows kept, 6 skipped" in caplog.text


def test_finetune_sft_list_response_is_skipped_not_trained_on(tmp_path, caplog):
    path = write_lines(tmp_path / "sft.jsonl", [
        {"prompt": "def f()", "response": "Return f."},
        {"prompt": "def g()", "response": ["Return", "g."]},
    ])
    with caplog.at_level(logging.WARNING):
        rows = read_examples(path, ft_params(path, "sft"))
    assert rows == [{"id": None, "prompt": "def f()", "response": "Return f."}]
    assert "sft.jsonl:2: field 'response' is a list" in caplog.text


def test_finetune_parquet_list_column_is_one_error_naming_the_field_and_key(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"text": [["a", "b"], ["c"]], "label": ["x", "y"]}), path)
    with pytest.raises(LmforgeError, match=r"train\.parquet: no usable row .*train\.parquet row 1: field 'text' "
                                           r"is a list, not a string \(finetune\.text_field\)"):
        read_examples(path, ft_params(path))


def test_integer_labels_are_class_ids_but_booleans_and_floats_are_skipped(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", [
        {"text": "zero", "label": 0}, {"text": "one", "label": 1},
        {"text": "yes", "label": True}, {"text": "half", "label": 0.5},
    ])
    assert [(r["text"], r["label"]) for r in read_examples(path, ft_params(path))] == [("zero", "0"), ("one", "1")]


def test_finetune_bad_json_line_is_skipped_and_named_as_ingest_does(tmp_path, caplog):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "ok", "label": "a"}\n{"text": broken\n[1, 2]\n', encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        rows = read_examples(path, ft_params(path))
    assert [r["text"] for r in rows] == ["ok"]
    assert "train.jsonl:2: not valid JSON" in caplog.text and "train.jsonl:3: not a JSON object" in caplog.text


def test_csv_with_a_bare_carriage_return_is_one_error_naming_file_and_line(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(b"text,label\nfine,a\nold\rmac,b\n")
    with pytest.raises(LmforgeError, match=r"train\.csv:3: not valid CSV"):
        read_examples(path, ft_params(path))
    with pytest.raises(LmforgeError, match=r"train\.csv:3: not valid CSV"):
        list(iter_documents(DataParams(source="files", files=[str(path)]), Counter()))


def test_json_nested_too_deep_is_a_bad_line_for_ingest_not_a_recursion_error(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("[" * 100_000 + "\n" + '{"text": "kept"}\n', encoding="utf-8")
    counters: Counter = Counter()
    docs = list(iter_documents(DataParams(source="files", files=[str(path)]), counters))
    assert [d["text"] for d in docs] == ["kept"] and counters["bad_json_lines"] == 1


# ---------------------------------------------------------------- an ingest that finds nothing


def test_ingest_finding_no_documents_fails_and_keeps_the_previous_outputs(tmp_path):
    root = make_repo(tmp_path, n_docs=20)
    assert run(["python", "-m", "stages.ingest"], root, check=False).returncode == 0
    outputs = [root / "data/raw/part-00000.parquet", root / "data/raw/manifest.json", root / "data/raw/stats.json"]
    before = [path.read_bytes() for path in outputs]
    (root / "data/blank").mkdir()
    (root / "data/blank/a.txt").write_text("   \n\n", encoding="utf-8")
    write_params(root, data={"files": ["data/blank/*.txt"]})
    result = run(["python", "-m", "stages.ingest"], root, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert [path.read_bytes() for path in outputs] == before
    (error,) = [line for line in result.stderr.splitlines() if "error" in line]
    assert error.startswith("[ingest] error: data.files ['data/blank/*.txt'] gave no documents")


# ---------------------------------------------------------------- text that spells a special token


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(make_texts(200), TokenizerParams(vocab_size=400))


def special_id_set(tok) -> set[int]:
    return {tok.token_to_id(token) for token in SPECIALS}


def test_loaded_tokenizer_encodes_special_token_text_as_text(tokenizer, tmp_path):
    save_tokenizer(tokenizer, tmp_path / "tokenizer.json")
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    text = "a quote: <|endoftext|> and <|pad|>, then more"
    ids = loaded.encode(text).ids
    assert not special_id_set(loaded) & set(ids)
    assert loaded.decode(ids) == text


def test_packed_documents_spelling_eos_keep_one_eos_each_and_decode_back(tmp_path):
    texts = [f"{text} Quoted {SPECIALS[i % 2]} inside." for i, text in enumerate(make_texts(60, seed=3))]
    params = TokenizerParams(vocab_size=400, seq_len=16, shard_rows=8, encode_batch_size=16)
    with DocumentWriter(tmp_path / "documents.parquet") as writer:
        writer.write([make_document(text, "files") for text in texts])
    tok = train_tokenizer(texts, params)
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    encode_to_shards(tmp_path / "documents.parquet", tok, file_sha256(tmp_path / "tokenizer.json"), params, 0.2,
                     tmp_path / "shards")
    reader = ShardReader(tmp_path / "shards", "train")
    stream = np.concatenate([reader[i] for i in range(len(reader))]).tolist()
    assert tok.token_to_id("<|pad|>") not in stream
    pieces = " ".join(map(str, stream)).split(f" {reader.eos_id} ")  # the packer's EOS ends each document
    train = [t for t in texts if split_of(make_document(t, "files")["id"], 0.2) == "train"]
    decoded = [tok.decode([int(i) for i in piece.split()]) for piece in pieces[:-1]]
    assert len(decoded) > 10 and decoded == train[: len(decoded)]


def test_finetune_encoders_put_only_their_own_eos(tokenizer):
    eos, pad = special_ids(tokenizer)
    (ids,) = encode_texts(tokenizer, ["text that says <|endoftext|> and <|pad|>"], 64, eos)
    assert ids.count(eos) == 1 and ids[-1] == eos and pad not in ids
    ((ids, n_prompt),) = encode_sft(tokenizer, ["prompt <|endoftext|>"], ["answer <|pad|>"], 64, "\n", eos)
    assert ids.count(eos) == 1 and ids[-1] == eos and pad not in ids
    assert tokenizer.decode(ids[:n_prompt]) == "prompt <|endoftext|>\n"


def test_sample_prompts_encode_special_token_text_as_text(tokenizer, monkeypatch):
    import lmforge.model.generate as generate_module

    seen = []

    def fake_generate(model, ids, *args, **kwargs):
        seen.append(ids[0].tolist())
        return ids

    monkeypatch.setattr(generate_module, "generate", fake_generate)
    gen = SimpleNamespace(prompts=["Say <|endoftext|> please"], max_new_tokens=1, temperature=0.0, top_k=None,
                          top_p=None, seed=0)
    model = SimpleNamespace(eval=lambda: None)
    generate_module.sample_prompts(model, tokenizer, gen, eos_id=0)
    (ids,) = seen
    assert not special_id_set(tokenizer) & set(ids) and tokenizer.decode(ids) == "Say <|endoftext|> please"


# ---------------------------------------------------------------- CSV cells that are formulas


@pytest.mark.parametrize(
    ("value", "cell"),
    [
        ('=HYPERLINK("http://x","y")', '\'=HYPERLINK("http://x","y")'),
        ("+1", "'+1"), ("-1", "'-1"), ("@SUM(A1)", "'@SUM(A1)"), ("\tx", "'\tx"), ("\rx", "'\rx"),
        ("plain", "plain"), ("a=b", "a=b"), ("", ""),
        (-0.5, -0.5), (-3, -3), (None, None),
    ],
)
def test_spreadsheet_safe_neutralizes_formula_strings_and_keeps_numbers(value, cell):
    assert spreadsheet_safe(value) == cell


def read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def test_per_class_csv_writes_a_formula_label_as_text(tmp_path):
    report = {"per_class": {
        '=HYPERLINK("http://evil","x")': {"precision": 0.5, "recall": 1.0, "f1": 0.6, "support": 2},
        "cat": {"precision": 1.0, "recall": 0.5, "f1": 0.7, "support": 3},
    }}
    write_per_class_csv(tmp_path / "per_class.csv", report)
    rows = read_csv(tmp_path / "per_class.csv")
    assert rows[1] == ["'=HYPERLINK(\"http://evil\",\"x\")", "0.5", "1.0", "0.6", "2"]
    assert rows[2][0] == "cat"


def test_metrics_csv_keeps_negative_numbers_and_neutralizes_strings(tmp_path):
    records = [{"step": 1, "value": -0.5, "note": "-cmd|' /C calc'!A0"}]
    write_curve_csv(tmp_path / "curve.csv", records, ["step", "value", "note"])
    assert read_csv(tmp_path / "curve.csv") == [["step", "value", "note"], ["1", "-0.5", "'-cmd|' /C calc'!A0"]]
