"""The partitioned-dataset contract: manifest in global order, clear errors, publish from staging."""

from __future__ import annotations

import pytest

from lmforge.data.documents import make_document
from lmforge.data.documents import DocumentWriter
from lmforge.data.partitions import (iter_dataset_batches, part_name, publish, read_parts_manifest, write_parts_manifest)
from lmforge.core.errors import LmforgeError


def _write_parts(directory, texts_per_part):
    parts = []
    for index, texts in enumerate(texts_per_part):
        with DocumentWriter(directory / part_name(index)) as writer:
            writer.write([make_document(text, "test") for text in texts])
        parts.append({"name": part_name(index), "documents": writer.documents, "bytes": writer.bytes})
    return parts


def test_documents_come_back_in_global_order_and_published_parts_replace_old_ones(tmp_path):
    staging, out = tmp_path / "staging", tmp_path / "out"
    staging.mkdir()
    out.mkdir()
    (out / "part-00007.parquet").write_bytes(b"from an earlier run")
    parts = _write_parts(staging, [["a b c", "d e f"], ["g h i"]])
    publish([staging / part["name"] for part in parts], out)
    write_parts_manifest(out, parts)
    assert sorted(p.name for p in out.glob("part-*")) == ["part-00000.parquet", "part-00001.parquet"]
    texts = [doc["text"] for batch in iter_dataset_batches(out, 1, "ingest") for doc in batch]
    assert texts == ["a b c", "d e f", "g h i"]
    assert read_parts_manifest(out, "ingest")["documents"] == 3


def test_missing_or_damaged_manifest_and_parts_name_the_stage_to_rerun(tmp_path):
    with pytest.raises(LmforgeError, match=r"manifest.json not found: run `dvc repro ingest`"):
        read_parts_manifest(tmp_path, "ingest")
    (tmp_path / "manifest.json").write_text("{nope")
    with pytest.raises(LmforgeError, match=r"damaged .*dvc repro -f ingest"):
        read_parts_manifest(tmp_path, "ingest")
    write_parts_manifest(tmp_path, [{"name": part_name(0), "documents": 1, "bytes": 1}])
    with pytest.raises(LmforgeError, match=r"part-00000.parquet is listed .* but missing"):
        list(iter_dataset_batches(tmp_path, 10, "ingest"))
    (tmp_path / part_name(0)).write_bytes(b"not parquet")
    with pytest.raises(LmforgeError, match=r"not a readable Parquet file"):
        list(iter_dataset_batches(tmp_path, 10, "ingest"))
