"""DVC stage `clean`: data/raw/ -> data/clean/ (partitions in the same order + manifest.json),
with stats.json (what each filter kept and dropped, per partition too), metrics.json (how much
was kept) and samples of rejected documents. The work runs as Dask tasks over partitions
(lmforge.data.clean_job, a data job run by lmforge.data.job.run_data_job) on the engine of params.yaml.
"""

from __future__ import annotations

from lmforge.core import paths
from lmforge.core.stage import run_stage
from lmforge.data.clean_job import STAGE, CleanJob
from lmforge.data.job import on_engine, run_data_job
from lmforge.data.partitions import staging_dir
from lmforge.core.errors import LmforgeError
from lmforge.core.params import load_params
from lmforge.track.runs import stage_run


def main() -> None:
    params = load_params()
    with stage_run("clean", {"clean": params.clean}, inputs=[paths.RAW], deferred=True) as run:
        # Stats and samples are written even when nothing survives, so the user can see why.
        stats = run_data_job(CleanJob(params.clean, paths.RAW, paths.CLEAN, staging_dir(STAGE)), params.engine,
                             hash_outputs=not run.failed)  # the output tags' md5s
        run.log_metrics({**{k: stats[k] for k in ("documents_out", "kept_document_fraction", "kept_byte_fraction",
                                                  "mb_per_s")}, "partitions": len(stats["partitions"]),
                         "workers": stats["workers"]})
        run.log_artifact(paths.CLEAN_STATS)
        run.describe(f"Clean: kept {stats['documents_out']:,} of {stats['documents_in']:,} documents "
                     f"({stats['kept_document_fraction']:.1%}) after the quality filters and dedup, in "
                     f"{len(stats['partitions'])} partitions {on_engine(stats['workers'])}; what each step dropped is "
                     "in stats.json (per partition too), examples in rejected_samples.jsonl.")
        run.log_artifact(paths.REJECTED_SAMPLES)
        if stats["documents_out"] == 0:
            raise LmforgeError(
                f"all {stats['documents_in']} documents were dropped by the filters (see {paths.CLEAN_STATS} and "
                f"{paths.REJECTED_SAMPLES}); loosen the clean.* thresholds in params.yaml or check the input"
            )


if __name__ == "__main__":
    run_stage("clean", main)
