"""DVC stage `clean`: data/raw/documents.parquet -> data/clean/documents.parquet,
with stats.json (what each filter kept and dropped), metrics.json (how much was kept) and
samples of rejected documents.
"""

from __future__ import annotations

import time

from tqdm import tqdm

from lmforge import paths
from lmforge.cli import run_stage
from lmforge.data.clean import Cleaner
from lmforge.data.io import DocumentWriter, iter_document_batches, open_documents, write_json, write_jsonl
from lmforge.errors import LmforgeError
from lmforge.params import load_params
from lmforge.tracking import stage_run

# The figures `dvc metrics show` and `dvc exp show` put side by side; stats.json keeps the rest.
COMPARED = ("documents_in", "documents_out", "kept_byte_fraction")


def main() -> None:
    params = load_params()
    with stage_run("clean", {"clean": params.clean}, inputs=[paths.RAW_DOCUMENTS]) as run:
        total = open_documents(paths.RAW_DOCUMENTS, "ingest").metadata.num_rows
        cleaner = Cleaner(params.clean)
        start = time.perf_counter()
        batches = iter_document_batches(paths.RAW_DOCUMENTS, params.clean.batch_size, "ingest")
        with DocumentWriter(paths.CLEAN_DOCUMENTS) as writer, tqdm(total=total, unit="doc", desc="clean", disable=None) as bar:
            for kept in cleaner.clean_batches(batches):
                writer.write(kept)
                bar.n = cleaner.stats.documents_in
                bar.refresh()
        seconds = time.perf_counter() - start
        stats = cleaner.stats.to_dict()
        stats["seconds"] = round(seconds, 3)
        stats["mb_per_s"] = stats["bytes_in"] / 1e6 / seconds if seconds else 0.0
        # Stats and samples are written even when nothing survives, so the user can see why.
        write_json(paths.CLEAN_STATS, stats)
        write_json(paths.CLEAN_METRICS, {key: stats[key] for key in COMPARED})
        samples = [row for rows in cleaner.stats.rejected_samples.values() for row in rows]
        write_jsonl(paths.REJECTED_SAMPLES, samples)
        run.log_metrics({k: stats[k] for k in ("documents_out", "kept_document_fraction", "kept_byte_fraction",
                                                 "mb_per_s")})
        run.log_artifact(paths.CLEAN_STATS)
        run.describe(f"Clean: kept {stats['documents_out']:,} of {stats['documents_in']:,} documents "
                     f"({stats['kept_document_fraction']:.1%}) after the quality filters and dedup; what each "
                     "step dropped is in stats.json, examples in rejected_samples.jsonl.")
        run.log_artifact(paths.REJECTED_SAMPLES)
        if stats["documents_out"] == 0:
            raise LmforgeError(
                f"all {stats['documents_in']} documents were dropped by the filters (see {paths.CLEAN_STATS} and "
                f"{paths.REJECTED_SAMPLES}); loosen the clean.* thresholds in params.yaml or check the input"
            )


if __name__ == "__main__":
    run_stage("clean", main)
