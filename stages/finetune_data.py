"""DVC stage `finetune_data`: the built-in fine-tuning tasks from data/clean ->
data/finetune/{classify,sft}_{train,test}.jsonl and data/finetune/stats.json. A corpus of your own
cannot give them: then finetune must read your labelled files (finetune.train_file/test_file), and
this stage stops naming those params when it would read the built-in ones.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from lmforge.core import paths
from lmforge.core.stage import run_stage
from lmforge.core.io import write_json, write_jsonl
from lmforge.data.partitions import iter_dataset_batches
from lmforge.finetune.builtin_tasks import classify_examples, sft_examples
from lmforge.core.errors import LmforgeError
from lmforge.core.params import load_params
from lmforge.track.runs import stage_run

log = logging.getLogger("stages.finetune_data")


def check_buildable(built: dict[str, int], task: str, train_file: str, test_file: str, source: str) -> None:
    """The built-in task files finetune reads must have rows: a corpus of your own (data.source
    files or hf) has no stdlib metadata to build them from, so say at once which params to set,
    rather than let finetune fail on an empty file."""
    reads_builtin = any(Path(f).parent == paths.FINETUNE_DATA for f in (train_file, test_file))
    if reads_builtin and not (built[f"{task}_train"] and built[f"{task}_test"]):
        raise LmforgeError(
            f"the built-in {task} task needs the stdlib docstrings (data.source: builtin), and "
            f"{paths.CLEAN} (data.source: {source}) gives {built[f'{task}_train']} train and "
            f"{built[f'{task}_test']} test rows: set finetune.train_file and finetune.test_file in params.yaml "
            f"to your labelled .jsonl/.csv/.parquet files ("
            + ("fields finetune.text_field, finetune.label_field)" if task == "classify"
               else "fields finetune.prompt_field, finetune.response_field)")
        )


def main() -> None:
    params = load_params()
    tasks, val_fraction, ft = params.tasks, params.data.val_fraction, params.finetune
    with stage_run("finetune_data", {"tasks": tasks}, inputs=[paths.CLEAN], deferred=True) as run:
        # The built-in tasks need only a few columns of a few MB: read them whole.
        docs = [doc for batch in iter_dataset_batches(paths.CLEAN, 10_000, "clean") for doc in batch]
        train, test, labels = classify_examples(docs, val_fraction, tasks.classify_top_k, tasks.classify_max_per_class, tasks.seed)
        if len(labels) < 2 or not test:
            train, test, labels = [], [], []  # one class is no classification task
        sft_train, sft_test = sft_examples(docs, val_fraction, tasks.sft_max_prompt_chars, tasks.sft_max_response_chars)
        built = {"classify_train": train, "classify_test": test, "sft_train": sft_train, "sft_test": sft_test}
        check_buildable({name: len(rows) for name, rows in built.items()}, ft.task, ft.train_file, ft.test_file,
                        params.data.source)
        if not (train and sft_train):  # finetune reads your own files: these stay unused
            log.info("built-in tasks from %s: %d classify and %d SFT train rows (finetune reads %s)",
                     paths.CLEAN, len(train), len(sft_train), ft.train_file)
        for name, rows in built.items():
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
