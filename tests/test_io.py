import pyarrow.parquet as pq
import pytest

from lmforge.data.documents import make_document
from lmforge.core.io import atomic_path, write_json
from lmforge.data.documents import DocumentWriter
from lmforge.data.partitions import iter_part_batches
from lmforge.core.errors import LmforgeError


def test_writer_interrupted_midway_leaves_the_previous_file_untouched(tmp_path):
    path = tmp_path / "documents.parquet"
    with DocumentWriter(path) as writer:
        writer.write([make_document("old text here", "files")])
    with pytest.raises(KeyboardInterrupt):
        with DocumentWriter(path) as writer:
            writer.write([make_document("new text", "files")])
            raise KeyboardInterrupt
    assert pq.read_table(path).column("text").to_pylist() == ["old text here"]
    assert [p.name for p in tmp_path.iterdir()] == ["documents.parquet"]  # no temp file left


def test_atomic_path_only_publishes_complete_files(tmp_path):
    with pytest.raises(ValueError):
        with atomic_path(tmp_path / "x.json") as tmp:
            tmp.write_text("partial")
            raise ValueError
    assert not (tmp_path / "x.json").exists()
    write_json(tmp_path / "x.json", {"a": 1})
    assert (tmp_path / "x.json").read_text() == '{\n  "a": 1\n}\n'


def test_corrupt_parquet_names_the_file_and_the_stage_to_rerun(tmp_path):
    path = tmp_path / "documents.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(LmforgeError, match="documents.parquet is not a readable Parquet file.*dvc repro -f ingest"):
        list(iter_part_batches(path, 10, "ingest"))


def test_documents_file_without_text_column_is_a_clear_error(tmp_path):
    import pyarrow as pa

    pq.write_table(pa.table({"id": ["a"], "body": ["x"]}), tmp_path / "d.parquet")
    with pytest.raises(LmforgeError, match=r"no column\(s\) \['text'\]"):
        list(iter_part_batches(tmp_path / "d.parquet", 10, "ingest"))


def test_write_json_refuses_a_non_finite_number_naming_the_file_and_key(tmp_path):
    """JSON has no NaN or Infinity: Python's default would write them and readers choke later."""
    with pytest.raises(LmforgeError, match=r"x\.json: scores\.f1 is nan"):
        write_json(tmp_path / "x.json", {"scores": {"f1": float("nan")}, "n": 1})
    with pytest.raises(LmforgeError, match=r"x\.json: losses\[1\] is inf"):
        write_json(tmp_path / "x.json", {"losses": [0.5, float("inf")]})
    assert not (tmp_path / "x.json").exists()


# --- A full disk: the stage's one line names the file it could not write. ---

def _full_disk_under(path):
    """`path`'s temp name (this process's) made a link to /dev/full: every write to it fails with
    ENOSPC, as on a full disk, and nothing else about the write changes."""
    import os

    from lmforge.core.io import temp_name

    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    path.parent.mkdir(parents=True, exist_ok=True)
    temp_name(path).symlink_to("/dev/full")
    return path


@pytest.mark.parametrize("name, write", [
    ("stats.json", lambda path: write_json(path, {"a": 1})),
    ("part-00000.parquet", lambda path: _write_documents(path)),
    ("train-00000.arrow", lambda path: _write_shard(path)),
], ids=["json", "documents", "shard"])
def test_a_full_disk_names_the_file_it_could_not_write(tmp_path, capsys, name, write):
    from lmforge.core.stage import run_stage

    target = _full_disk_under(tmp_path / "train" / name)
    with pytest.raises(SystemExit) as stopped:
        run_stage("clean", lambda: write(target))
    line = capsys.readouterr().err.strip()
    assert stopped.value.code == 1 and line == (
        f"[clean] error: no space left on device writing {target}: free space there and rerun the stage")


def _write_documents(path):
    with DocumentWriter(path) as writer:
        writer.write([make_document("some text " * 1000, "files")])


def _write_shard(path):
    import numpy as np

    from lmforge.data.tokens.shards import ShardWriter

    writer = ShardWriter(path.parent.parent, "train", 7, np.dtype(np.uint16), shard_rows=4)
    writer.add(np.zeros((4, 8), dtype=np.uint16))
