"""One point of a fine-tuning recipe sweep (not a test): the finetune stage's training, step for step
(lmforge.evaluate.gain.fine_tune: same seed, data order, trainer and early stopping), with `-S`
overrides of params.yaml, scored on every row of the validation split (what a sweep selects on) and
on the test file (reported beside it, never selected on). Needs a workspace where `make run` has
run (models/pretrain, data/finetune, data/tokenizer); writes nothing but one JSON line on stdout.

    python bench/finetune_sweep.py -S finetune.pooling=last
    python bench/finetune_sweep.py -S finetune.pooling=mean --scratch     # from random weights

The same points as DVC experiments (finetune's best_val_accuracy then reads the trainer's fixed
validation slice, whole batches only; evaluate gives the test figures and the gain):

    dvc exp run --queue -S finetune.pooling=last
    dvc queue start

The sweep behind the default recipe, its table and its figures: docs/guides/experiments.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-S", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="a params.yaml override, as dvc exp run -S takes it")
    parser.add_argument("--scratch", action="store_true", help="fine-tune from randomly initialised weights")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()

    from flows.dvc_repo import apply_param_overrides
    from flows.errors import PipelineError
    from lmforge.core.params import load_params
    from lmforge.evaluate.gain import fine_tune, score, scored_rows
    from lmforge.evaluate.metrics import model_scores
    from lmforge.finetune import recipe

    # The overrides as `dvc exp run -S` writes them (DVC's own editor, then validated), into a copy:
    # the workspace's params.yaml stays as it is.
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "params.yaml"
        shutil.copyfile(args.params, copy)
        try:
            apply_param_overrides(args.sets, copy)
        except PipelineError as exc:  # a malformed or unknown override: one line naming it
            raise SystemExit(str(exc)) from None
        params = load_params(copy)
    task = params.finetune.task
    started = time.perf_counter()
    model = fine_tune(params, from_scratch=args.scratch)
    _, val = recipe.train_val_rows(params.finetune)
    figures = {f"{split}/{key}": round(value, 4)
               for split, rows in (("val", val), ("test", scored_rows(params)))
               for key, value in model_scores(task, score(params, model, rows)).items()}
    print(json.dumps({"sets": args.sets, "scratch": args.scratch, "val_rows": len(val), **figures,
                      "seconds": round(time.perf_counter() - started)}))


if __name__ == "__main__":
    main()
