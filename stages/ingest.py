"""DVC stage `ingest`: documents from the configured source (built-in corpus, files or the Hugging
Face Hub) -> data/raw/part-NNNNN.parquet, stats.json and manifest.json (written last).

Partitions run as tasks on the engine (lmforge.data.ingest_job, a data job run by
lmforge.data.job.run_data_job) into a staging directory with a completion marker each, so a killed
run resumes; then they are published into data/raw.
"""

from __future__ import annotations

from lmforge.core import paths
from lmforge.core.stage import run_stage
from lmforge.data.ingest_job import STAGE, IngestJob
from lmforge.data.job import on_engine, run_data_job
from lmforge.data.sources.locations import is_url, resolve_files
from lmforge.data.partitions import staging_dir
from lmforge.core.params import load_params
from lmforge.track.runs import stage_run


def main() -> None:
    params = load_params()
    data = params.data
    # Lineage: the local files read (source files or sources); the built-in corpus is the Python version's.
    globs = data.files if data.source == "files" else [glob for source in data.sources for glob in source.files]
    inputs = [path for path in resolve_files(globs) if not is_url(path)]
    with stage_run("ingest", {"data": data, "engine": params.engine}, inputs=inputs, deferred=True) as run:
        stats = run_data_job(IngestJob(data, paths.RAW, staging_dir(STAGE)), params.engine,
                             hash_outputs=not run.failed)  # the output tags' md5s
        # A few comparable figures as metrics; every count and each partition's seconds are in the stats artifact.
        run.log_metrics({key: stats[key] for key in ("documents", "bytes", "mb_per_s", "partitions", "workers")})
        run.log_artifact(paths.RAW_STATS)
        run.describe(f"Ingest from `{data.source}`: {stats['documents']:,} documents, {stats['bytes'] / 1e6:,.2f} MB "
                     f"({stats['val_documents']:,} held out for validation) in {stats['partitions']} partitions "
                     f"{on_engine(stats['workers'])}, {stats['seconds']:.1f} s. Counts: stats.json.")


if __name__ == "__main__":
    run_stage("ingest", main)
