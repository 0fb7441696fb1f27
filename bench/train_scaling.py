"""Benchmark of the parallel layouts (not a test): FSDP vs TP vs FSDP x TP at 1, 2 and 4 CPU processes
(gloo), fp32 vs bf16 gradient reduction, and activation checkpointing (none, full, selective) in one
process, on the default model shape (preset "small": 4 layers,
4 heads, dim 256), vocab 8192, seq_len 256, the same global batch of 8 rows and seed everywhere.

Per layout: tokens/s (median step past the warm-up, all processes together), peak RSS per process
(the largest rank's VmHWM), the loss after the last step and its difference from one process, and
the bytes each step sends per process (lmforge.train.communication.step_bytes, from the shapes).
Activation memory: the growth of the process's RSS over one forward of one micro-batch (before its
backward), measured once before training (large tensors are mmapped, so RSS follows them).
The data: rows following next = (3 * prev + 1) % vocab with 10% noise (learnable, no files needed).

    python bench/train_speed.py --scaling                          # every layout, 12 steps
    python bench/train_speed.py --scaling --layouts fsdp2,fsdp2-bf16 --steps 12

Results: bench/results/train_scaling.json and a markdown table on stdout. On this 2-core machine
4 processes share 2 cores: the 4-process rows measure correctness and bytes, not speed.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULT_TAG = "BENCH_RESULT "
GLOBAL_ROWS = 8
# name: (processes, tensor_parallel, reduce_precision, activation checkpointing)
LAYOUTS = {
    "one": (1, 1, "fp32", "none"),
    "one-ac-full": (1, 1, "fp32", "full"),
    "one-ac-selective": (1, 1, "fp32", "selective"),
    "fsdp2": (2, 1, "fp32", "none"),
    "fsdp2-bf16": (2, 1, "bf16", "none"),
    "tp2": (2, 2, "fp32", "none"),
    "fsdp4": (4, 1, "fp32", "none"),
    "fsdp4-bf16": (4, 1, "bf16", "none"),
    "fsdp2xtp2": (4, 2, "fp32", "none"),
    "tp4": (4, 4, "fp32", "none"),
}


def _rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(args) -> None:
    """One rank of a layout: train args.steps steps, rank 0 prints the figures."""
    import numpy as np
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(REPO))
    from lmforge.core.params import TrainerParams
    from lmforge.model.decoder import Transformer, build_config
    from lmforge.train.batches import PackedRows
    from lmforge.train.communication import Layout, step_bytes
    from lmforge.train.distributed import destroy, init_distributed, parallelize
    from lmforge.train.trainer import Trainer

    torch.set_num_threads(1)
    info = init_distributed(device="cpu", tensor_parallel=args.tp)
    config = build_config("small", vocab_size=args.vocab, max_seq_len=args.seq_len)
    rng = np.random.default_rng(1)
    n = GLOBAL_ROWS * (args.steps + 2)
    rows = np.empty((n, args.seq_len + 1), dtype=np.int64)
    rows[:, 0] = rng.integers(0, args.vocab, n)
    for j in range(1, args.seq_len + 1):
        noise = rng.random(n) < 0.1
        rows[:, j] = np.where(noise, rng.integers(0, args.vocab, n), (3 * rows[:, j - 1] + 1) % args.vocab)
    torch.manual_seed(1337)
    model = Transformer(config)
    reduce_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.reduce]
    parallelize(model, info, reduce_dtype=reduce_dtype, activation_checkpointing=args.ac)
    micro = 4 if info.dp_size <= 2 else GLOBAL_ROWS // info.dp_size
    accum = GLOBAL_ROWS // (micro * info.dp_size)
    cfg = TrainerParams(max_steps=args.steps, micro_batch_size=micro, grad_accum_steps=accum, lr=2e-3, min_lr=2e-4,
                        warmup_steps=2, precision="fp32", eval_every=0, checkpoint_every=0, resume="never",
                        progress=False, seed=1337)
    stamps, losses = [], []
    # One forward's activations (what backward keeps), before training: no weights change here.
    batch = torch.as_tensor(rows[:micro])
    before = _rss_mb()
    _, loss = model(batch[:, :-1], batch[:, 1:])
    activation_mb = _rss_mb() - before
    loss.backward()
    del loss
    model.zero_grad(set_to_none=True)

    def on_metrics(step: int, metrics: dict) -> None:
        stamps.append(time.perf_counter())
        losses.append(float(metrics["train_loss"]))

    trainer = Trainer(model, cfg, PackedRows(rows), dist_info=info, checkpoint_dir=None, on_metrics=on_metrics,
                      prefetch=False)
    start = time.perf_counter()
    trainer.fit()
    hwm = next(int(line.split()[1]) / 1024 for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmHWM:"))
    peaks = [hwm]
    if info.distributed:
        peaks = [None] * info.world_size
        dist.all_gather_object(peaks, hwm)
    if info.is_main:
        step_s = [stamps[0] - start] + [b - a for a, b in zip(stamps, stamps[1:])]
        layout = Layout(dp=info.dp_size if info.distributed else 1, tp=info.tensor_parallel, micro_batch_size=micro,
                        seq_len=args.seq_len, grad_accum_steps=accum, reduce_bytes=2 if args.reduce == "bf16" else 4)
        print(RESULT_TAG + json.dumps({
            "tokens_per_s": GLOBAL_ROWS * args.seq_len / statistics.median(step_s[args.warmup:]),
            "peak_rss_mb_per_process": max(peaks), "losses": losses, "final_loss": losses[-1],
            "micro_batch_size": micro, "grad_accum_steps": accum, "bytes_per_step": step_bytes(config, layout).as_dict(),
            "params": config.num_params(), "activation_mb": activation_mb,
        }), flush=True)
    destroy()


def run_layout(name: str, args) -> dict:
    nproc, tp, reduce, ac = LAYOUTS[name]
    child = [str(Path(__file__).resolve()), "--worker", "--tp", str(tp), "--reduce", reduce, "--ac", ac,
             "--steps", str(args.steps), "--warmup", str(args.warmup), "--vocab", str(args.vocab),
             "--seq-len", str(args.seq_len)]
    cmd = [sys.executable, *child] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *child]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or RESULT_TAG not in proc.stdout:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {"processes": nproc, "tensor_parallel": tp, "reduce_precision": reduce, "activation_checkpointing": ac,
            **json.loads(proc.stdout.rsplit(RESULT_TAG, 1)[1].splitlines()[0])}


def main(args) -> None:
    names = [n.strip() for n in args.layouts.split(",") if n.strip()]
    unknown = sorted(set(names) - set(LAYOUTS))
    if unknown:
        raise SystemExit(f"unknown layouts {unknown}; choose from {list(LAYOUTS)}")
    if "one" not in names:
        names.insert(0, "one")  # the reference every loss is compared with
    rows = {}
    for name in names:
        t0 = time.perf_counter()
        rows[name] = run_layout(name, args)
        print(f"{name}: {rows[name]['tokens_per_s']:.0f} tokens/s, loss {rows[name]['final_loss']:.4f} "
              f"({time.perf_counter() - t0:.0f}s wall)", flush=True)
    ref = rows["one"]["losses"]
    for row in rows.values():
        row["max_rel_loss_diff_vs_one"] = max(abs(a - b) / abs(b) for a, b in zip(row["losses"], ref))
    print(f"\nParallel layouts, CPU (gloo), preset small, vocab {args.vocab}, seq {args.seq_len}, global batch "
          f"{GLOBAL_ROWS} rows, fp32 compute; {args.steps} steps ({args.warmup} warm-up untimed)\n")
    print("| layout | processes | TP | reduce | AC | tokens/s | peak RSS MB / process | forward activations MB | loss after "
          f"{args.steps} steps | max rel. loss diff vs 1 process | all-gather B/step | reduce-scatter B/step "
          "| TP all-reduce B/step | total B/step |")
    print("| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in rows.items():
        b = r["bytes_per_step"]
        print(f"| {name} | {r['processes']} | {r['tensor_parallel']} | {r['reduce_precision']} | "
              f"{r['activation_checkpointing']} | {r['tokens_per_s']:,.0f} | {r['peak_rss_mb_per_process']:.0f} | "
              f"{r['activation_mb']:.0f} | {r['final_loss']:.5f} | "
              f"{r['max_rel_loss_diff_vs_one']:.1e} | {b['all_gather']:,} | {b['reduce_scatter']:,} | "
              f"{b['tp_all_reduce']:,} | {b['total']:,} |")
    out = args.out or REPO / "bench" / "results" / "train_scaling.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    import torch

    out.write_text(json.dumps({"rows": rows, "args": {k: str(v) for k, v in vars(args).items()},
                               "env": {"torch": torch.__version__, "cpu_count": os.cpu_count()}}, indent=2))
    print(f"wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")


def add_arguments(parser) -> None:
    parser.add_argument("--scaling", action="store_true", help="the parallel layouts' benchmark (bench/train_scaling.py)")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"--scaling: comma list of {list(LAYOUTS)}")
    parser.add_argument("--vocab", type=int, default=8192, help="--scaling: vocabulary of the synthetic rows")
    parser.add_argument("--seq-len", type=int, default=256, help="--scaling: tokens per row")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--reduce", default="fp32")
    parser.add_argument("--ac", default="none")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path)
    add_arguments(parser)
    ns = parser.parse_args()
    worker(ns) if ns.worker else main(ns)
