"""Packing, shard writing and the memory-mapped reader (the contract with training)."""

import glob
import json
import re

import numpy as np
import pyarrow as pa
import pytest

from lmforge.data.documents import make_document, split_of
from lmforge.data.documents import DocumentWriter
from lmforge.data.tokens.pack import Packer
from lmforge.data.sequential import encode_to_shards
from lmforge.data.tokens.shards import ShardReader, rows_view, token_dtype
from lmforge.data.tokens.tokenizer import save_tokenizer, train_tokenizer
from lmforge.core.digests import file_sha256
from lmforge.core.errors import LmforgeError
from lmforge.core.params import TokenizerParams

from conftest import make_texts
from test_lazy_imports import imported_after

PARAMS = TokenizerParams(vocab_size=400, seq_len=16, shard_rows=8, encode_batch_size=32)
VAL_FRACTION = 0.2


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Clean documents -> tokenizer -> shards, as the tokenize stage does it."""
    root = tmp_path_factory.mktemp("shards")
    texts = make_texts(150, seed=1)
    with DocumentWriter(root / "documents.parquet") as writer:
        writer.write([make_document(text, "files") for text in texts])
    tokenizer = train_tokenizer(texts, PARAMS)
    save_tokenizer(tokenizer, root / "tokenizer.json")
    stats = encode_to_shards(
        root / "documents.parquet", tokenizer, file_sha256(root / "tokenizer.json"), PARAMS, VAL_FRACTION, root / "shards"
    )
    return root, texts, tokenizer, stats


def test_packer_loses_no_token():
    packer = Packer(seq_len=4, eos_id=0, dtype=np.dtype(np.uint16))
    rows = np.concatenate([packer.add([[1, 2, 3], [4, 5]]), packer.add([[6, 7, 8, 9, 10, 11]])])
    assert rows.shape == (2, 5)
    assert rows.ravel().tolist() == [1, 2, 3, 0, 4, 5, 0, 6, 7, 8]
    assert packer.tokens == rows.size + packer.tail_tokens == 14  # 11 ids + 3 EOS


def test_dtype_is_uint16_only_when_the_vocabulary_fits():
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_no_token_lost_between_encoding_and_shards(built):
    root, texts, tokenizer, _ = built
    manifest = json.loads((root / "shards" / "manifest.json").read_text())
    for split in ("train", "val"):
        docs = [make_document(t, "files") for t in texts]
        expected = sum(len(tokenizer.encode(d["text"]).ids) + 1 for d in docs if split_of(d["id"], VAL_FRACTION) == split)
        summary = manifest["splits"][split]
        assert summary["tokens_encoded"] == expected
        assert summary["tokens"] + summary["tail_tokens_dropped"] == expected
        assert summary["tail_tokens_dropped"] < PARAMS.seq_len + 1


def test_rows_hold_the_documents_in_order_separated_by_eos(built):
    root, texts, tokenizer, _ = built
    reader = ShardReader(root / "shards", "train", tokenizer_path=root / "tokenizer.json")
    stream = np.concatenate([reader[i] for i in range(len(reader))]).tolist()
    train = [t for t in texts if split_of(make_document(t, "files")["id"], VAL_FRACTION) == "train"]
    expected = []
    for text in train:
        expected += tokenizer.encode(text).ids + [reader.eos_id]
    assert stream == expected[: len(stream)]


def test_reader_rows_are_zero_copy_views_of_the_memory_map(built):
    root, *_ = built
    reader = ShardReader(root / "shards", "train")
    row = reader[3]
    assert row.shape == (PARAMS.seq_len + 1,) and row.dtype == np.uint16
    assert not row.flags.owndata and not row.flags.writeable
    assert reader.rows([0, 3]).dtype == np.int64
    assert len(reader) > PARAMS.shard_rows  # spans several shards
    with pytest.raises(IndexError):
        reader[len(reader)]


def test_rows_view_reads_sliced_columns_and_refuses_nulls():
    ids = pa.array(np.arange(40, dtype=np.uint16))
    column = pa.FixedSizeListArray.from_arrays(ids, 4)
    for part in (column, column.slice(3, 5), column.slice(9, 1), column.slice(0, 0)):
        expected = np.array(part.to_pylist(), dtype=np.uint16).reshape(-1, 4)
        assert np.array_equal(rows_view(part, np.dtype(np.uint16)), expected)
    with pytest.raises(ValueError, match="null"):
        rows_view(pa.FixedSizeListArray.from_arrays(pa.array([1, None, 3, 4], pa.uint16()), 2), np.dtype(np.uint16))


def test_reading_shards_imports_neither_pandas_nor_pyarrow_compute(built):
    """About 0.15 CPU-s of every process that reads shards, for a view of the file it already has."""
    root, *_ = built
    loaded = imported_after(f"import sys\nfrom lmforge.data.tokens.shards import ShardReader\n"
                            f"assert len(ShardReader({str(root / 'shards')!r}, 'train')) > 0\n"
                            "assert 'pyarrow.compute' not in sys.modules, 'pyarrow.compute imported'")
    assert "pandas" not in loaded


def test_shards_read_back_with_pyarrow_and_datasets(built):
    import datasets  # here: collection imports every test module in every xdist worker

    root, *_ = built
    files = sorted(glob.glob(str(root / "shards" / "train" / "*.arrow")))
    table = pa.concat_tables(pa.ipc.open_file(f).read_all() for f in files)
    reader = ShardReader(root / "shards", "train")
    assert table.num_rows == len(reader)
    assert table.column("input_ids")[5].as_py() == reader[5].tolist()
    dataset = datasets.load_dataset("arrow", data_files={"train": files}, split="train")
    assert dataset[5]["input_ids"] == reader[5].tolist()


def test_corrupt_shard_fails_its_checksum_naming_the_file(built, tmp_path):
    import shutil

    root, *_ = built
    shards = shutil.copytree(root / "shards", tmp_path / "shards")
    victim = sorted((shards / "train").glob("*.arrow"))[1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(LmforgeError, match=f"{victim.name} fails its checksum"):
        ShardReader(shards, "train")


def test_truncated_shard_is_detected_by_size(built, tmp_path):
    import shutil

    root, *_ = built
    shards = shutil.copytree(root / "shards", tmp_path / "shards")
    victim = sorted((shards / "val").glob("*.arrow"))[0]
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(LmforgeError, match=f"{victim.name} has 100 bytes"):
        ShardReader(shards, "val", verify="size")


def test_a_shard_of_ids_wider_than_the_manifests_dtype_is_refused_naming_it(built, tmp_path):
    """Its size and checksum in the manifest made right: only the ids' type is wrong."""
    import shutil

    root, *_ = built
    shards = shutil.copytree(root / "shards", tmp_path / "shards")
    victim = sorted((shards / "train").glob("*.arrow"))[0]
    table = pa.ipc.open_file(victim).read_all()
    field = table.schema.field(0)
    wide = table.cast(pa.schema([pa.field(field.name, pa.list_(pa.uint32(), field.type.list_size))]))
    with pa.ipc.new_file(victim, wide.schema) as writer:
        writer.write_table(wide)
    manifest = json.loads((shards / "manifest.json").read_text())
    (entry,) = [e for e in manifest["splits"]["train"]["shards"] if e["file"].endswith(victim.name)]
    entry.update(bytes=victim.stat().st_size, sha256=file_sha256(victim))
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LmforgeError, match=f"{victim.name} does not match its manifest entry"):
        ShardReader(shards, "train")


def test_manifest_from_another_tokenizer_is_rejected(built, tmp_path):
    root, texts, *_ = built
    other = tmp_path / "other.json"
    save_tokenizer(train_tokenizer(texts[:50], PARAMS), other)
    with pytest.raises(LmforgeError, match="another tokenizer"):
        ShardReader(root / "shards", "train", tokenizer_path=other)


def test_seq_len_mismatch_is_rejected(built):
    root, *_ = built
    with pytest.raises(LmforgeError, match="seq_len 16, not 32"):
        ShardReader(root / "shards", "train", seq_len=32)


def _edited_manifest(built, tmp_path, **fields):
    """A copy of the built shards whose manifest.json has `fields` replaced (None: removed)."""
    import shutil

    root, *_ = built
    shards = shutil.copytree(root / "shards", tmp_path / "shards")
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest.update(fields)
    manifest = {key: value for key, value in manifest.items() if value is not None}
    (shards / "manifest.json").write_text(json.dumps(manifest))
    return shards, root / "tokenizer.json"


def test_manifest_eos_id_other_than_the_tokenizers_is_refused_naming_the_manifest(built, tmp_path):
    _, _, tokenizer, _ = built
    eos = tokenizer.token_to_id(PARAMS.eos_token)
    shards, tokenizer_path = _edited_manifest(built, tmp_path, eos_id=eos + 1)
    with pytest.raises(LmforgeError, match=rf"manifest.json: eos_id {eos + 1} is not .*{eos}.*dvc repro -f tokenize"):
        ShardReader(shards, "train", tokenizer_path=tokenizer_path, eos_token=PARAMS.eos_token)


def test_manifest_vocab_size_other_than_the_tokenizers_is_refused_naming_the_manifest(built, tmp_path):
    _, _, tokenizer, _ = built
    vocab = tokenizer.get_vocab_size()
    shards, tokenizer_path = _edited_manifest(built, tmp_path, vocab_size=vocab + 64)
    with pytest.raises(LmforgeError, match=rf"manifest.json: vocab_size {vocab + 64} is not .*{vocab}"):
        ShardReader(shards, "train", tokenizer_path=tokenizer_path)


@pytest.mark.parametrize("fields, says", [
    ({"eos_id": None}, "eos_id is missing"),
    ({"seq_len": "16"}, "seq_len is '16', not an integer"),
    ({"row_length": 99}, "row_length 99 is not seq_len 16 + 1"),
    ({"eos_id": 400}, "eos_id 400 is not an id of its vocabulary of 400"),
    ({"dtype": "uint8"}, "dtype 'uint8' cannot hold the ids of a vocabulary of 400"),
    ({"dtype": "float32"}, "dtype 'float32' cannot hold the ids"),
    ({"column": "ids"}, "column 'ids' is not 'input_ids'"),
])
def test_every_manifest_field_the_reader_uses_is_checked_naming_it(built, tmp_path, fields, says):
    shards, _ = _edited_manifest(built, tmp_path, **fields)
    with pytest.raises(LmforgeError, match=f"manifest.json: {re.escape(says)}.*dvc repro -f tokenize"):
        ShardReader(shards, "train")


def test_shard_rows_of_another_length_than_the_manifest_says_are_refused(built, tmp_path):
    shards, _ = _edited_manifest(built, tmp_path, seq_len=PARAMS.seq_len - 1, row_length=PARAMS.seq_len)
    with pytest.raises(LmforgeError, match=f"rows of {PARAMS.seq_len + 1} ids, manifest.json says {PARAMS.seq_len}"):
        ShardReader(shards, "train")


def test_split_counts_that_disagree_with_its_shards_are_refused(built, tmp_path):
    root, *_ = built
    splits = json.loads((root / "shards" / "manifest.json").read_text())["splits"]
    splits["train"]["rows"] += 1
    shards, _ = _edited_manifest(built, tmp_path, splits=splits)
    says = f"split 'train' has {splits['train']['rows']} rows and {splits['train']['tokens']} tokens, its shards"
    with pytest.raises(LmforgeError, match=f"{says} {splits['train']['rows'] - 1} rows .*dvc repro -f tokenize"):
        ShardReader(shards, "train")


def test_shards_without_manifest_are_unfinished(built, tmp_path):
    import shutil

    root, *_ = built
    shards = shutil.copytree(root / "shards", tmp_path / "shards")
    (shards / "manifest.json").unlink()
    with pytest.raises(LmforgeError, match="unfinished"):
        ShardReader(shards, "train")


def test_val_split_smaller_than_one_row_is_a_clear_error(tmp_path):
    texts = make_texts(20, seed=3, words_per_doc=(3, 4))
    with DocumentWriter(tmp_path / "documents.parquet") as writer:
        writer.write([make_document(t, "files") for t in texts])
    tokenizer = train_tokenizer(texts, PARAMS)
    params = TokenizerParams(vocab_size=400, seq_len=512)
    with pytest.raises(LmforgeError, match="lower tokenizer.seq_len"):
        encode_to_shards(tmp_path / "documents.parquet", tokenizer, "x", params, 0.05, tmp_path / "shards")
    assert not (tmp_path / "shards" / "manifest.json").exists()


def test_stats_report_throughput(built):
    *_, stats = built
    assert stats["tokens_per_s"] > 0 and stats["mb_per_s"] > 0
    assert stats["train.rows"] > 0 and stats["val.rows"] > 0
