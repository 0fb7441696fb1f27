"""DVC stage `finetune`: fine-tune models/pretrain on params.finetune's task (classify | sft) with the
one trainer, then export models/finetune (+ adapter/ for lora) and reports/finetune.

One process: `python -m stages.finetune`. Many: `torchrun --nproc_per_node=N -m stages.finetune`
(FSDP2 per block; rank 0 alone logs to MLflow and writes reports).
"""

from __future__ import annotations

import logging

import torch

from lmforge.core import paths
from lmforge.core.params import load_params
from lmforge.core.stage import run_stage
from lmforge.finetune import recipe
from lmforge.train.distributed import init_distributed
from lmforge.track.training import finish, training_run

log = logging.getLogger("stages.finetune")


def main() -> None:
    params = load_params()
    fp = params.finetune
    info = init_distributed()
    torch.manual_seed(fp.seed)
    setup = recipe.prepare(params)
    model, counts = recipe.build_model_to_train(fp, setup, info)

    inputs = [paths.PRETRAINED, fp.train_file, fp.test_file]
    # The classification loss is per example: the trainer counts examples, not tokens, and the
    # perplexity of a classification loss means nothing (not recorded).
    renames = {"tokens_per_s": "examples_per_s", "val_ppl": None} if fp.task == "classify" else {}
    with training_run("finetune", info, paths.FINETUNE_CHECKPOINTS, recipe.run_fingerprint(fp),
                      params.runtime.finetune.resume,
                      {"finetune": fp}, inputs, renames) as tr:
        trainer = recipe.build_trainer(model, params, setup, info, tr.on_metrics)
        result = trainer.fit()  # ends with the best weights (by early_stopping_metric) loaded
        recipe.export(model, params, setup, info)  # collective
        if tr.run is None:  # not rank 0
            return
        records = tr.curve.read(up_to_step=result.step)
        summary = recipe.summarize(fp, result, records, counts, setup, info)
        finish(tr.run, result.step, recipe.report(fp, result, records, summary),
               recipe.registration(fp, setup.data["labels"], setup.config, summary))
        log.info("%s/%s: best %s %.4f at step %s of %d (%s of %s params trained)", fp.task, fp.method,
                 fp.early_stopping_metric, (result.best_metrics.get(fp.early_stopping_metric) or float("nan")),
                 result.best_step, result.step, *(f"{n:,}" for n in counts))


if __name__ == "__main__":
    run_stage("finetune", main)
