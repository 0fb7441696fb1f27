"""DVC stage `clean`: data/raw/ -> data/clean/ (partitions in the same order + manifest.json),
with stats.json (what each filter kept and dropped, per partition too), metrics.json (how much
was kept) and samples of rejected documents. The work runs as Dask tasks over partitions
(lmforge/data/clean_job.py) on the engine of params.yaml.
"""

from __future__ import annotations

import functools

from lmforge.core import paths
from lmforge.core.stage import run_stage
from lmforge.data.clean_job import run_clean
from lmforge.core.io import write_json, write_jsonl
from lmforge.data.partitions import clear_staging, read_parts_manifest, staging_dir
from lmforge.data.engine import dask_client, hash_on_workers, map_tasks, worker_count
from lmforge.core.errors import LmforgeError
from lmforge.core.params import load_params
from lmforge.track.runs import stage_run

# The figures `dvc metrics show` and `dvc exp show` put side by side; stats.json keeps the rest.
COMPARED = ("documents_in", "documents_out", "kept_byte_fraction")


def main() -> None:
    params = load_params()
    with stage_run("clean", {"clean": params.clean}, inputs=[paths.RAW]) as run:
        read_parts_manifest(paths.RAW, "ingest")  # a clear error before the engine starts if ingest has not run
        with dask_client(params.engine) as client:
            workers = worker_count(client)
            result = run_clean(params.clean, paths.RAW, paths.CLEAN, staging_dir("clean"),
                               functools.partial(map_tasks, client))
            if not run.failed:  # the output tags' md5s, on the workers
                hash_on_workers(client, paths.CLEAN)
        stats = {**result["stats"], "workers": workers}
        # Stats and samples are written even when nothing survives, so the user can see why.
        write_json(paths.CLEAN_STATS, stats)
        write_json(paths.CLEAN_METRICS, {key: stats[key] for key in COMPARED})
        write_jsonl(paths.REJECTED_SAMPLES, result["samples"])
        clear_staging("clean")
        run.log_metrics({**{k: stats[k] for k in ("documents_out", "kept_document_fraction", "kept_byte_fraction",
                                                  "mb_per_s")}, "partitions": len(stats["partitions"]),
                         "workers": workers})
        run.log_artifact(paths.CLEAN_STATS)
        run.describe(f"Clean: kept {stats['documents_out']:,} of {stats['documents_in']:,} documents "
                     f"({stats['kept_document_fraction']:.1%}) after the quality filters and dedup, in "
                     f"{len(stats['partitions'])} partitions on {workers} workers; what each step dropped is in "
                     "stats.json (per partition too), examples in rejected_samples.jsonl.")
        run.log_artifact(paths.REJECTED_SAMPLES)
        if stats["documents_out"] == 0:
            raise LmforgeError(
                f"all {stats['documents_in']} documents were dropped by the filters (see {paths.CLEAN_STATS} and "
                f"{paths.REJECTED_SAMPLES}); loosen the clean.* thresholds in params.yaml or check the input"
            )


if __name__ == "__main__":
    run_stage("clean", main)
