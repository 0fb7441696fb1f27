"""DVC stage `finetune_data`: the built-in fine-tuning tasks from data/clean ->
data/finetune/{classify,sft}_{train,test}.jsonl and data/finetune/stats.json.
"""

from __future__ import annotations

import logging
from collections import Counter

from lmforge import paths
from lmforge.cli import run_stage
from lmforge.data.io import iter_document_batches, write_json, write_jsonl
from lmforge.data.tasks import classify_examples, sft_examples
from lmforge.params import load_params
from lmforge.tracking import stage_run

log = logging.getLogger("stages.finetune_data")


def main() -> None:
    params = load_params()
    tasks, val_fraction = params.tasks, params.data.val_fraction
    with stage_run("finetune_data", {"tasks": tasks}, inputs=[paths.CLEAN_DOCUMENTS]) as run:
        # The built-in tasks need only a few columns of a few MB: read them whole.
        docs = [doc for batch in iter_document_batches(paths.CLEAN_DOCUMENTS, 10_000, "clean") for doc in batch]
        train, test, labels = classify_examples(docs, val_fraction, tasks.classify_top_k, tasks.classify_max_per_class, tasks.seed)
        if len(labels) < 2 or not test:
            # Not an error: a corpus of your own has no stdlib metadata, and your labeled data comes
            # in through finetune.train_file/test_file. The finetune stage refuses empty files.
            log.warning(
                "%s gives %d classes and %d test documents: the built-in classify task needs "
                "data.source: builtin; writing empty task files (point finetune.train_file/test_file "
                "at your own labeled data)", paths.CLEAN_DOCUMENTS, len(labels), len(test),
            )
            train, test, labels = [], [], []
        sft_train, sft_test = sft_examples(docs, val_fraction, tasks.sft_max_prompt_chars, tasks.sft_max_response_chars)
        for name, rows in {
            "classify_train": train, "classify_test": test, "sft_train": sft_train, "sft_test": sft_test,
        }.items():
            write_jsonl(paths.FINETUNE_DATA / f"{name}.jsonl", rows)
        stats = {
            "classify": {
                "labels": labels,
                "train": len(train),
                "test": len(test),
                "train_per_label": dict(sorted(Counter(r["label"] for r in train).items())),
                "test_per_label": dict(sorted(Counter(r["label"] for r in test).items())),
            },
            "sft": {"train": len(sft_train), "test": len(sft_test)},
        }
        write_json((paths.FINETUNE_DATA / "stats.json"), stats)
        run.log_metrics({"classify_train": len(train), "classify_test": len(test), "sft_train": len(sft_train),
                         "sft_test": len(sft_test)})
        run.log_artifact(paths.FINETUNE_DATA / "stats.json")
        run.describe(f"Built-in tasks: classify ({len(labels)} packages, {len(train):,} train / {len(test):,} test "
                     f"docstrings), SFT ({len(sft_train):,} / {len(sft_test):,} signature -> summary pairs).")


if __name__ == "__main__":
    run_stage("finetune_data", main)
