"""DVC stage `evaluate`: how good the models are, against what baseline -> reports/.

Language model: loss and perplexity of the pretrained (and an SFT) model on the val shards,
beside the unigram baseline and pretraining's first step. Classification: accuracy, macro-F1,
per-class figures and a confusion matrix beside the same recipe from scratch, bag-of-words and
majority-class baselines on the same test split. SFT: test loss, exact match, token F1, ROUGE-L and
generated responses beside the reference and the same recipe from scratch.
lm-evaluation-harness: the exported models on standard or lmforge's held-out tasks (reports/harness.json).
int8: the pretrained model quantized (models/pretrain_int8) and scored beside it (reports/quantization.json).
The fine-tuned model's registered version gets the `candidate` alias and the figures as tags.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from lmforge.core import paths
from lmforge.core.io import atomic_path, write_json
from lmforge.core.params import load_params
from lmforge.core.stage import run_stage
from lmforge.evaluate import evaluation, harness, quantized
from lmforge.evaluate.report import render_report_md
from lmforge.finetune.inference import load_finetuned
from lmforge.model.export import load_pretrained
from lmforge.track.lineage import git_commit
from lmforge.track.runs import stage_run
from lmforge.track.scoring import tag_candidate

log = logging.getLogger("stages.evaluate")


def main() -> None:
    params = load_params()
    inputs = [paths.PRETRAINED, paths.PRETRAINED_HF, paths.FINETUNED, paths.SHARDS, paths.CLEAN,
              Path(params.finetune.test_file)]
    with stage_run("evaluate", {"evaluate": params.evaluate, "generate": params.generate}, inputs=inputs,
                   scored=params) as run:
        shutil.rmtree(paths.FIGURES, ignore_errors=True)  # no figure of another task's run may linger
        paths.FIGURES.mkdir(parents=True)
        finetuned = load_finetuned(paths.FINETUNED)
        pretrained, _ = load_pretrained(paths.PRETRAINED)
        lm = evaluation.evaluate_lm(params, pretrained, finetuned)
        classify = baselines = sft = sft_examples = None
        if finetuned.task == "classify":
            classify, baselines = evaluation.evaluate_classify(params, finetuned)
        else:
            sft, sft_examples = evaluation.evaluate_sft(params, finetuned)
        gain = evaluation.evaluate_gain(params, finetuned, classify or sft, baselines)  # same recipe, from scratch
        samples = evaluation.pretrained_samples(params, pretrained)
        benchmarks = harness.run(params, finetuned)  # lm-evaluation-harness -> reports/harness.json
        write_json(paths.REPORTS / "samples.json", {"sampling": params.generate.model_dump(), "samples": samples})
        int8 = quantized.run(params, pretrained, lm, finetuned, classify)  # -> models/pretrain_int8
        metrics = evaluation.headline(lm, classify, baselines, sft, gain) | quantized.metrics(int8)
        write_json(paths.REPORTS / "metrics.json", metrics)
        images = evaluation.images()
        version = tag_candidate(run, metrics)
        warning = evaluation.warn_if_no_better_than_majority(run, classify, baselines)
        report = render_report_md(
            lm=lm, classification=classify, baselines=baselines, sft=sft, sft_examples=sft_examples, warning=warning,
            pretraining=gain, harness=benchmarks, quantized=int8,
            samples=samples, sampling=params.generate.model_dump(), images=images,
            provenance=evaluation.provenance(params, git_commit(Path.cwd()), run, version),
            system=f"fine-tuned lmforge ({finetuned.meta.get('method')})", mixture=evaluation.training_mixture(lm),
        )
        with atomic_path(paths.REPORTS / "report.md") as tmp:
            tmp.write_text(report, encoding="utf-8")
        run.log_metrics(metrics | harness.metrics(benchmarks) | quantized.speeds(int8))
        evaluation.log_reports(run, images)
        run.describe(evaluation.description(metrics, version, params.finetune.test_file))
        log.info("%s; candidate version %s", json.dumps({k: v for k, v in metrics.items() if k != "baselines"}), version)


if __name__ == "__main__":
    run_stage("evaluate", main)
