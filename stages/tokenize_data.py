"""DVC stage `tokenize`: train the BPE on the train split of data/clean, then encode,
pack and shard both splits into data/shards/{train,val} with manifest.json written last.

(Not named tokenize.py: that would shadow the standard library's `tokenize` module.)
"""

from __future__ import annotations

import shutil
import time

from lmforge import paths
from lmforge.cli import run_stage
from lmforge.data.pack import encode_to_shards, train_split_texts
from lmforge.data.tokenizer import file_sha256, save_tokenizer, train_tokenizer
from lmforge.data.io import open_documents, write_json
from lmforge.params import load_params
from lmforge.tracking import stage_run

# The figures `dvc metrics show` and `dvc exp show` put side by side; stats.json keeps the rest.
COMPARED = ("train.tokens", "bytes_per_token")


def main() -> None:
    params = load_params()
    tok_params, val_fraction = params.tokenizer, params.data.val_fraction
    with stage_run("tokenize", {"tokenizer": tok_params, "data": params.data}, inputs=[paths.CLEAN_DOCUMENTS]) as run:
        open_documents(paths.CLEAN_DOCUMENTS, "clean")  # a clear error before any work if clean has not run
        start = time.perf_counter()
        tokenizer = train_tokenizer(train_split_texts(paths.CLEAN_DOCUMENTS, val_fraction, tok_params.encode_batch_size), tok_params)
        save_tokenizer(tokenizer, paths.TOKENIZER)
        train_seconds = time.perf_counter() - start

        # DVC removes outputs before a run, but a run by hand must not mix old and new shards.
        shutil.rmtree(paths.SHARDS, ignore_errors=True)
        summary = encode_to_shards(paths.CLEAN_DOCUMENTS, tokenizer, file_sha256(paths.TOKENIZER), tok_params, val_fraction, paths.SHARDS)
        stats = {"tokenizer_train_seconds": round(train_seconds, 3), **summary}
        write_json(paths.TOKENIZER_STATS, stats)
        write_json(paths.TOKENIZER_METRICS, {key: stats[key] for key in COMPARED})
        run.log_metrics({"train_tokens": stats["train.tokens"], "val_tokens": stats["val.tokens"],
                         "bytes_per_token": stats["bytes_per_token"], "tokens_per_s": stats["tokens_per_s"]})
        run.describe(f"Tokenize: byte-level BPE of {stats['vocab_size']:,} tokens; {stats['train.tokens']:,} train "
                     f"and {stats['val.tokens']:,} val tokens in rows of {tok_params.seq_len + 1} "
                     f"({stats['bytes_per_token']:.2f} bytes/token).")
        for path in (paths.TOKENIZER_STATS, paths.SHARDS / "manifest.json", paths.TOKENIZER):
            run.log_artifact(path)


if __name__ == "__main__":
    run_stage("tokenize", main)
