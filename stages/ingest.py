"""DVC stage `ingest`: documents from the configured source (built-in corpus, local files
or the Hugging Face Hub) -> data/raw/documents.parquet and data/raw/stats.json.
"""

from __future__ import annotations

import itertools
import platform
import time
from collections import Counter

from tqdm import tqdm

from lmforge import paths
from lmforge.cli import run_stage
from lmforge.data.documents import split_of
from lmforge.data.io import DocumentWriter, write_json
from lmforge.data.sources import iter_documents, resolve_files
from lmforge.errors import LmforgeError
from lmforge.params import DataParams, load_params
from lmforge.tracking import stage_run


def main() -> None:
    params = load_params()
    data = params.data
    # Lineage: the files read (source=files); the built-in corpus is the Python version's.
    inputs = resolve_files(data.files) if data.source == "files" else []
    with stage_run("ingest", {"data": data}, inputs=inputs) as run:
        counters: Counter = Counter()
        splits: Counter = Counter()
        start = time.perf_counter()
        documents = iter_documents(data, counters)
        with DocumentWriter(paths.RAW_DOCUMENTS) as writer, tqdm(unit="doc", desc="ingest", disable=None) as bar:
            while batch := list(itertools.islice(documents, data.batch_size)):
                writer.write(batch)
                splits.update(split_of(doc["id"], data.val_fraction) for doc in batch)
                bar.update(len(batch))
            if writer.documents == 0:
                # Raised inside the writer's block, so it discards its file: the previous
                # documents.parquet stays, and still agrees with the previous stats.json.
                raise LmforgeError(_no_documents(data, counters))
        seconds = time.perf_counter() - start
        stats = {
            "source": data.source,
            "python": platform.python_version(),
            "documents": writer.documents,
            "bytes": writer.bytes,
            "train_documents": splits["train"],
            "val_documents": splits["val"],
            "seconds": round(seconds, 3),
            "mb_per_s": writer.bytes / 1e6 / seconds if seconds else 0.0,
            "counters": dict(sorted(counters.items())),
        }
        write_json(paths.RAW_STATS, stats)
        # A few comparable figures as metrics; every count is in the stats artifact.
        run.log_metrics({k: stats[k] for k in ("documents", "bytes", "mb_per_s")})
        run.log_artifact(paths.RAW_STATS)
        run.describe(f"Ingest from `{data.source}`: {writer.documents:,} documents, {writer.bytes / 1e6:,.2f} MB "
                     f"({splits['val']:,} held out for validation) in {seconds:.1f} s. Counts: stats.json.")


def _no_documents(data: DataParams, counters: Counter) -> str:
    where = f"data.files {data.files}" if data.source == "files" else f"the {data.source!r} source"
    problems = {key: count for key, count in counters.items() if count and key != "documents"}
    return (
        f"{where} gave no documents ({problems or 'nothing was read'}); nothing was written, "
        f"{paths.RAW_DOCUMENTS} and {paths.RAW_STATS} are unchanged: point data.source/data.files in params.yaml at files with text"
    )


if __name__ == "__main__":
    run_stage("ingest", main)
