"""A tiny training run for the tests that need a separate process (torchrun ranks, kill-and-resume).

Run as `python tests/train_helper.py OUT ...` or under `python -m torch.distributed.run --nproc_per_node=2`;
`OUT ... --then OUT2 ...` runs both, one after the other, in the same processes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.train.export import full_state_dict, save_pretrained  # noqa: E402
from lmforge.model.decoder import ModelConfig, Transformer  # noqa: E402
from lmforge.train.distributed import DistInfo, apply_compile, destroy, init_distributed, parallelize  # noqa: E402
from lmforge.train import fp8  # noqa: E402
from lmforge.core.params import TrainerParams  # noqa: E402
from lmforge.train.batches import PackedRows  # noqa: E402
from lmforge.train.trainer import Trainer  # noqa: E402

VOCAB = 64
SEQ_LEN = 16


class SyntheticRows:
    """Rows following next = (3 * prev + 1) % VOCAB with 10% noise: learnable, deterministic."""

    def __init__(self, n: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        rows = np.empty((n, SEQ_LEN + 1), dtype=np.uint16)
        rows[:, 0] = rng.integers(0, VOCAB, n)
        for j in range(1, SEQ_LEN + 1):
            noise = rng.random(n) < 0.1
            rows[:, j] = np.where(noise, rng.integers(0, VOCAB, n), (3 * rows[:, j - 1].astype(np.int64) + 1) % VOCAB)
        self.rows = rows
        self.vocab_size = VOCAB

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.rows[i]


def tiny_config() -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=SEQ_LEN)


def parse(argv: list[str]) -> list[argparse.Namespace]:
    """One namespace per run: `OUT [options] [--then OUT2 [options2]] ...`."""
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--ckpt-every", type=int, default=4)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--resume", default="auto")
    ap.add_argument("--delay", type=float, default=0.0, help="sleep after each step (to be killed mid-run)")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--no-fsdp", action="store_true")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--async-checkpoint", action="store_true")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (FSDP over the rest)")
    ap.add_argument("--reduce-precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--fp8-recipe", default="tensorwise", choices=["tensorwise", "rowwise"],
                    help="--precision fp8: the scaling (CPU: torchao's emulated float8 matmuls)")
    groups: list[list[str]] = [[]]
    for arg in argv:
        if arg == "--then":
            groups.append([])
        else:
            groups[-1].append(arg)
    runs = [ap.parse_args(group) for group in groups]
    if any((run.tp, run.device) != (runs[0].tp, runs[0].device) for run in runs):
        ap.error("--then: every run needs the first one's --tp and --device (they share one process group)")
    return runs


def main() -> None:
    """The runs one after another in this process (under torchrun: in one process group, started
    once; a run in a process of its own would pay the start again, imports and rendezvous)."""
    runs = parse(sys.argv[1:])
    torch.set_num_threads(1)
    # CUDA: some kernels (SDPA backward) have no deterministic variant; they warn instead of failing.
    torch.use_deterministic_algorithms(True, warn_only=runs[0].device == "cuda")
    info = init_distributed(device=runs[0].device, tensor_parallel=runs[0].tp)
    for args in runs:
        train(args, info)
    destroy()


def train(args: argparse.Namespace, info: DistInfo) -> None:
    """One run into args.out: metrics.jsonl (a line per step), checkpoints/, model/, result.json."""
    torch.manual_seed(0)
    config = tiny_config()
    model = Transformer(config).to(info.device)
    fsdp = info.distributed and not args.no_fsdp
    if args.precision == "fp8":  # before the wrappers, as lmforge.train.pretraining.build_decoder does
        fp8.convert(model, args.fp8_recipe, fsdp=fsdp, emulate=args.device == "cpu")
    if fsdp:
        low = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}.get(args.precision, torch.float32)
        parallelize(model, info, param_dtype=low if args.device == "cuda" else torch.float32,
                    reduce_dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[args.reduce_precision],
                    compile=args.compile)
    elif args.compile:
        apply_compile(model)
    metrics_file = args.out / "metrics.jsonl"
    args.out.mkdir(parents=True, exist_ok=True)

    def on_metrics(step: int, metrics: dict) -> None:
        with metrics_file.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        time.sleep(args.delay)

    cfg = TrainerParams(
        max_steps=args.steps, micro_batch_size=args.micro, grad_accum_steps=args.accum, lr=3e-3, min_lr=3e-4,
        warmup_steps=2, precision=args.precision, eval_every=4, eval_batches=2,
        checkpoint_every=args.ckpt_every, keep_checkpoints=2, resume=args.resume, progress=False,
    )
    trainer = Trainer(
        model, cfg, PackedRows(SyntheticRows(args.rows, 1), SyntheticRows(64, 2)), dist_info=info,
        checkpoint_dir=args.out / "checkpoints", on_metrics=on_metrics, async_checkpoint=args.async_checkpoint,
    )
    result = trainer.fit()
    # Gathered on every rank (a collective), written by rank 0.
    full_state_dict(model)
    save_pretrained(model, config, args.out / "model")
    if info.is_main:
        (args.out / "result.json").write_text(json.dumps({"step": result.step, "val_loss": result.val_loss}))


if __name__ == "__main__":
    main()
