"""DVC stage `pretrain`: train the decoder on data/shards with the one trainer, then export
models/pretrain (safetensors), models/pretrain_hf (LlamaForCausalLM) and reports/pretrain.

One process: `python -m stages.pretrain`. Many: `torchrun --nproc_per_node=N -m stages.pretrain`
(FSDP2 per block, tensor parallelism when pretrain.tensor_parallel > 1; rank 0 alone logs to MLflow
and writes reports).
"""

from __future__ import annotations

import logging

import torch

from lmforge.core import paths
from lmforge.core.params import load_params
from lmforge.core.stage import run_stage
from lmforge.data.tokens.shards import ShardReader
from lmforge.train import pretraining
from lmforge.train.distributed import init_distributed
from lmforge.train.export import export_hf_llama, save_pretrained
from lmforge.track.training import finish, training_run

log = logging.getLogger("stages.pretrain")


def main() -> None:
    params = load_params()
    pretraining.check_precision(params)  # fp8 needs a GPU that has it: said before any work
    info = init_distributed(tensor_parallel=params.pretrain.tensor_parallel)
    torch.manual_seed(params.pretrain.seed)
    eos = params.tokenizer.eos_token
    train = ShardReader(paths.SHARDS, "train", tokenizer_path=paths.TOKENIZER, eos_token=eos)
    val = ShardReader(paths.SHARDS, "val", tokenizer_path=paths.TOKENIZER, eos_token=eos)
    model, config = pretraining.build_decoder(params, train, info)

    # MLflow shows the resolved shape (dim 256, not the params' null = "the preset's").
    sections = {"model": {"preset": params.model.preset, **config.to_dict()}, "pretrain": params.pretrain}
    with training_run("pretrain", info, paths.PRETRAIN_CHECKPOINTS, pretraining.run_fingerprint(params, train.manifest),
                      params.runtime.pretrain.resume, sections, [paths.SHARDS, paths.TOKENIZER]) as tr:
        trainer = pretraining.build_trainer(model, params, train, val, info, tr.on_metrics)
        result = trainer.fit()
        save_pretrained(model, config, paths.PRETRAINED, tokenizer_path=paths.TOKENIZER)  # collective
        export_hf_llama(model, config, paths.PRETRAINED_HF, tokenizer_path=paths.TOKENIZER, eos_id=train.eos_id)
        if tr.run is None:  # not rank 0
            return
        records = tr.curve.read(up_to_step=result.step)
        comm = pretraining.step_bytes(params, info, config, train.seq_len)
        summary = pretraining.summarize(result, records, train, config, info, comm)

        report = pretraining.report(params.model.preset, result, records, summary, config)
        finish(tr.run, result.step, report, pretraining.registration(result, config, train.eos_id))
        log.info("val loss %.3f (unigram entropy %.3f)", result.val_loss or float("nan"), summary["unigram_entropy"])


if __name__ == "__main__":
    run_stage("pretrain", main)
