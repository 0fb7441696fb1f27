"""DVC stage `tokenize`: train the BPE on a bounded sample of the train split of data/clean, then
encode, pack and shard each clean partition into data/shards/{train,val}, manifest.json last.
With named sources (mix.weights) the train split is mixed to their weights and each source's val
rows are kept apart; the realised mixture goes to metrics.json, mixture.csv and MLflow.

Sampling, training and encoding run as tasks on the engine (lmforge.data.tokenize_job, a data job
run by lmforge.data.job.run_data_job) with completion markers in a staging directory, so a killed
run resumes. (Not named tokenize.py: that would shadow the standard library's `tokenize` module.)
"""

from __future__ import annotations

from lmforge.core import paths
from lmforge.core.stage import run_stage
from lmforge.data.job import on_engine, run_data_job
from lmforge.data.partitions import staging_dir
from lmforge.data.tokenize_job import STAGE, TokenizeJob
from lmforge.core.params import load_params
from lmforge.track.runs import stage_run


def main() -> None:
    params = load_params()
    tok_params, weights = params.tokenizer, params.mix.weights
    with stage_run("tokenize", {"tokenizer": tok_params, "mix": params.mix, "data": params.data,
                                "engine": params.engine}, inputs=[paths.CLEAN], deferred=True) as run:
        job = TokenizeJob(tok_params, params.data.val_fraction, paths.CLEAN, paths.SHARDS, paths.TOKENIZER.parent,
                          staging_dir(STAGE), weights)
        stats = run_data_job(job, params.engine, hash_outputs=not run.failed)  # the output tags' md5s
        mixture = stats["mixture"]
        run.log_metrics({"train_tokens": stats["train.tokens"], "val_tokens": stats["val.tokens"],
                         "bytes_per_token": stats["bytes_per_token"], "tokens_per_s": stats["tokens_per_s"],
                         "sample_bytes": stats["sample_bytes"], "partitions": stats["partitions"],
                         "workers": stats["workers"], **({"mixture": mixture} if weights else {})})
        run.log_table([{"source": name, **figures} for name, figures in mixture.items()], "mixture.json")
        mixed = "; mixture " + ", ".join(f"{name} {figures['share']:.1%} (asked {figures['weight']:.1%}, "
                                         f"{figures['epochs']:.2f} epochs)" for name, figures in mixture.items())
        run.describe(f"Tokenize: byte-level BPE of {stats['vocab_size']:,} tokens trained on "
                     f"{stats['sample_bytes'] / 1e6:,.1f} MB of train text; {stats['train.tokens']:,} train and "
                     f"{stats['val.tokens']:,} val tokens in rows of {tok_params.seq_len + 1} "
                     f"({stats['bytes_per_token']:.2f} bytes/token), {stats['partitions']} partitions "
                     f"{on_engine(stats['workers'])}{mixed if weights else ''}.")
        for path in (paths.TOKENIZER_STATS, paths.SHARDS / "manifest.json", paths.TOKENIZER, paths.MIXTURE):
            run.log_artifact(path)


if __name__ == "__main__":
    run_stage("tokenize", main)
