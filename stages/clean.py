"""DVC stage `clean`: data/raw/documents.parquet -> data/clean/documents.parquet,
with stats.json (what each filter kept and dropped) and samples of rejected documents.
"""

from __future__ import annotations

import time
from pathlib import Path

from tqdm import tqdm

from lmforge.cli import run_stage
from lmforge.data.clean import Cleaner
from lmforge.data.io import DocumentWriter, iter_document_batches, open_documents, write_json, write_jsonl
from lmforge.errors import LmforgeError
from lmforge.params import load_params
from lmforge.tracking import stage_run

RAW = Path("data/raw/documents.parquet")
CLEAN = Path("data/clean/documents.parquet")
STATS = Path("data/clean/stats.json")
REJECTED = Path("data/clean/rejected_samples.jsonl")


def main() -> None:
    params = load_params()
    with stage_run("clean", {"clean": params.clean}, inputs=[RAW]) as run:
        total = open_documents(RAW, "ingest").metadata.num_rows
        cleaner = Cleaner(params.clean)
        start = time.perf_counter()
        batches = iter_document_batches(RAW, params.clean.batch_size, "ingest")
        with DocumentWriter(CLEAN) as writer, tqdm(total=total, unit="doc", desc="clean", disable=None) as bar:
            for kept in cleaner.clean_batches(batches):
                writer.write(kept)
                bar.n = cleaner.stats.documents_in
                bar.refresh()
        seconds = time.perf_counter() - start
        stats = cleaner.stats.to_dict()
        stats["seconds"] = round(seconds, 3)
        stats["mb_per_s"] = stats["bytes_in"] / 1e6 / seconds if seconds else 0.0
        # Stats and samples are written even when nothing survives, so the user can see why.
        write_json(STATS, stats)
        samples = [row for rows in cleaner.stats.rejected_samples.values() for row in rows]
        write_jsonl(REJECTED, samples)
        run.log_metrics(stats)
        run.log_artifact(STATS)
        run.log_artifact(REJECTED)
        if stats["documents_out"] == 0:
            raise LmforgeError(
                f"all {stats['documents_in']} documents were dropped by the filters (see {STATS} and "
                f"{REJECTED}); loosen the clean.* thresholds in params.yaml or check the input"
            )


if __name__ == "__main__":
    run_stage("clean", main)
