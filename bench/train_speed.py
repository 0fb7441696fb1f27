"""Benchmark of training speed (not a test): tokens/s and peak RSS of lmforge's Trainer against
nanoGPT's own train.py, at nanoGPT's small CPU config, on the same tokens, in the same run.

Shape: 4 layers, 4 heads, dim 256, seq_len 256, micro-batch 8 (no accumulation), fp32, 2 threads.

  ours          lmforge.model.decoder.Transformer (preset "small": RMSNorm, SwiGLU, rotary, tied embeddings)
                trained by lmforge.train.trainer.Trainer, no validation, no checkpoints, no progress bar
  nanogpt       nanoGPT's train.py (LayerNorm without bias, GELU MLP, learned positions, tied
                embeddings), run unmodified with command-line overrides, --compile=False
  ours-compile  ours with lmforge.train.distributed.apply_compile (torch.compile of each block, as the
                pretrain stage does); compile time falls in the warm-up steps, which are not timed

Optional methods (--methods): `ours-matched` (SwiGLU hidden 682 instead of the preset's 704, so the
FFN has nanoGPT's 8*dim^2 weights per layer) and `nanogpt-compile` (nanoGPT with --compile=True).

FLOPs are not identical: SwiGLU's 3*dim*704 FFN weights are 3% more than GELU's 8*dim^2, the
learned position table (nanoGPT) is a lookup, and rotary/RMSNorm/LayerNorm are elementwise, so
both tokens/s and the parameter counts are reported.

nanoGPT's code is NOT part of this repository; get it once, outside the repo:

    # with git:        git clone https://github.com/karpathy/nanoGPT /tmp/nanogpt
    # from a mirror:   git --git-dir=<mirror>/repo archive HEAD | tar -x -C /tmp/nanogpt
    python bench/train_speed.py --nanogpt /tmp/nanogpt              # 3 interleaved rounds
    python bench/train_speed.py --nanogpt /tmp/nanogpt --rounds 1 --methods ours,nanogpt

Each measurement runs in a fresh subprocess with OMP_NUM_THREADS=2 (and torch.set_num_threads(2)
in ours); its peak RSS is its own VmHWM, read inside the child at its end (nanoGPT's train.py
runs through runpy in a small wrapper that does the same). The per-iteration time is the wall
time from one optimizer step's end to the next one's (nanoGPT's own `time ...ms` lines measure
exactly that; ours is taken in the on_metrics callback), the first --warmup iterations skipped.
Rounds interleave the methods; medians are reported. On a shared host (CPU time taken by
neighbours) iterations are bimodal, undisturbed or several times slower, so the table also gives
the fast decile of all timed iterations, an estimate of the undisturbed speed; compare ratios of
that column when the median rounds disagree. Results: bench/results/train_speed.json.

On a GPU (bench/train_speed_cuda.py: GPT-2 124M shape, bf16, compile, against nanoGPT's
--compile=True --dtype=bfloat16; MFU, peak memory, the checkpoint-step spike sync vs async):

    python bench/train_speed.py --device cuda --nanogpt /tmp/nanogpt --batch-size 16 --steps 20
    # results: bench/results/train_speed_cuda.json

FP8 against bf16 (pretrain.precision fp8, torchao float8, tensorwise and rowwise; compute capability
>= 8.9: H100, L4, RTX 4090; the default CUDA methods include both, skipped with a line elsewhere):

    python bench/train_speed.py --device cuda --methods ours,ours-fp8,ours-fp8-rowwise --batch-size 16 --steps 20

The parallel layouts on CPU processes (gloo): FSDP vs TP vs FSDP x TP at 1, 2 and 4 processes, fp32
vs bf16 gradient reduction, with the loss after N steps and the bytes each step sends
(bench/train_scaling.py; results: bench/results/train_scaling.json):

    python bench/train_speed.py --scaling --steps 12 --warmup 2

The peak memory of the loss at vocab 50,304, plain against chunked (any device):

    python bench/train_speed.py --loss-memory --device cpu --batch-size 4 --loss-chunk 1024
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import train_scaling  # noqa: E402
import train_speed_cuda as cuda_bench  # noqa: E402

DEFAULT_METHODS = ("ours", "nanogpt", "ours-compile")
ALL_METHODS = ("ours", "nanogpt", "ours-compile", "ours-matched", "nanogpt-compile")
SHAPE = {"n_layers": 4, "n_heads": 4, "dim": 256}
RESULT_TAG = "BENCH_RESULT "  # bench/train_speed_cuda.py's children print the same tag


def _peak_rss_mb() -> float:
    """This process's own high-water RSS (ru_maxrss would include the parent's, inherited at exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- children ------------------------------------------------------------------------------------


def worker_ours(args: argparse.Namespace) -> dict:
    """Train ours for warmup + steps optimizer steps; per-step wall times from on_metrics."""
    import torch

    torch.set_num_threads(args.threads)
    from lmforge.data.tokens.shards import ShardReader
    from lmforge.model.decoder import Transformer, build_config
    from lmforge.train.distributed import DistInfo, apply_compile
    from lmforge.core.params import TrainerParams
    from lmforge.train.batches import PackedRows

    from lmforge.train.trainer import Trainer

    torch.manual_seed(1337)
    train = ShardReader(args.shards, "train", verify="size")
    overrides = {"multiple_of": 2} if args.method == "ours-matched" else {}
    config = build_config("small", vocab_size=train.vocab_size, max_seq_len=train.seq_len, **overrides)
    assert (config.n_layers, config.n_heads, config.dim) == (SHAPE["n_layers"], SHAPE["n_heads"], SHAPE["dim"])
    model = Transformer(config)
    n_params = model.num_params()
    if args.method == "ours-compile":
        apply_compile(model)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)
    total = args.warmup + args.steps
    cfg = TrainerParams(
        max_steps=total, micro_batch_size=args.batch_size, grad_accum_steps=1, precision="fp32",
        eval_every=0, checkpoint_every=0, resume="never", progress=False, warmup_steps=2,
    )
    stamps: list[float] = []
    reported: list[float] = []
    losses: list[float] = []

    def on_metrics(step: int, metrics: dict) -> None:
        stamps.append(time.perf_counter())
        reported.append(float(metrics["tokens_per_s"]))
        losses.append(float(metrics["train_loss"]))

    # val_data=None: no evaluation at all; checkpoint_dir=None: no checkpoint, even at the end.
    trainer = Trainer(model, cfg, PackedRows(train), dist_info=info, checkpoint_dir=None, on_metrics=on_metrics)
    t_start = time.perf_counter()
    trainer.fit()
    # Step k's loop time: from step k-1's callback to step k's (the whole loop body, like nanoGPT's).
    iter_s = [stamps[0] - t_start] + [b - a for a, b in zip(stamps, stamps[1:])]
    tokens = args.batch_size * trainer.seq_len
    return {
        "iter_s": iter_s[args.warmup:], "warmup_s": iter_s[: args.warmup],
        "trainer_tokens_per_s": reported[args.warmup:], "tokens_per_iter": tokens,
        "params": n_params, "ffn_hidden": config.ffn_hidden, "final_loss": losses[-1],
        "rss_mb": _peak_rss_mb(),
    }


NANOGPT_WRAPPER = r"""
import json, runpy, sys, time
from pathlib import Path
sys.path.insert(0, '.')
sys.argv = ['train.py'] + sys.argv[1:]
g = runpy.run_path('train.py', run_name='__main__')
m = g['raw_model']
params = sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())
hwm = [l for l in Path('/proc/self/status').read_text().splitlines() if l.startswith('VmHWM:')]
print('%s' + json.dumps({'params': params, 'params_nanogpt_count': m.get_num_params(),
                         'rss_mb': int(hwm[0].split()[1]) / 1024}), flush=True)
""" % RESULT_TAG

ITER_LINE = re.compile(r"^iter (\d+): loss ([0-9.naninf]+), time ([0-9.]+)ms", re.M)


def nanogpt_argv(steps: int, seq_len: int, batch_size: int, data_dir: Path, out_dir: Path, compile_: bool) -> list[str]:
    """nanoGPT train.py's command-line overrides for `steps` iterations at SHAPE on CPU, fp32."""
    overrides = {
        "device": "cpu", "compile": compile_, "dtype": "float32",
        "n_layer": SHAPE["n_layers"], "n_head": SHAPE["n_heads"], "n_embd": SHAPE["dim"],
        "block_size": seq_len, "batch_size": batch_size, "gradient_accumulation_steps": 1,
        # It runs iterations 0..max_iters inclusive; the eval at iter 0 (1 batch of train and val) is
        # the only one and falls into a warm-up iteration; nothing is ever saved.
        "max_iters": steps - 1, "eval_interval": 10**9, "eval_iters": 1, "log_interval": 1,
        "bias": False, "dropout": 0.0, "wandb_log": False, "always_save_checkpoint": False,
        "init_from": "scratch", "dataset": str(data_dir), "out_dir": str(out_dir),
    }
    return [f"--{k}={v}" for k, v in overrides.items()]


def run_nanogpt(args: argparse.Namespace, data_dir: Path, out_dir: Path, compile_: bool) -> dict:
    total = args.warmup + args.steps
    argv = nanogpt_argv(total, args.seq_len, args.batch_size, data_dir, out_dir, compile_)
    proc = subprocess.run(
        [sys.executable, "-c", NANOGPT_WRAPPER, *argv], cwd=args.nanogpt, env=_child_env(args),
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"nanoGPT train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    iters = [(int(i), float(loss), float(ms)) for i, loss, ms in ITER_LINE.findall(proc.stdout)]
    if len(iters) != total:
        raise RuntimeError(f"expected {total} 'iter' lines from nanoGPT, got {len(iters)}:\n{proc.stdout[-3000:]}")
    tail = json.loads(proc.stdout.rsplit(RESULT_TAG, 1)[1].splitlines()[0])
    times = [ms / 1000 for _, _, ms in iters]
    return {
        "iter_s": times[args.warmup:], "warmup_s": times[: args.warmup],
        "tokens_per_iter": args.batch_size * args.seq_len, "final_loss": iters[-1][1], **tail,
    }


def _child_env(args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    return env


def run_ours(args: argparse.Namespace, method: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--method", method, "--shards", str(args.shards),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--batch-size", str(args.batch_size), "--nanogpt", str(args.nanogpt)]
    proc = subprocess.run(cmd, cwd=REPO, env=_child_env(args), capture_output=True, text=True)
    if proc.returncode != 0 or RESULT_TAG not in proc.stdout:
        raise RuntimeError(f"{method} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.rsplit(RESULT_TAG, 1)[1].splitlines()[0])


# --- parent --------------------------------------------------------------------------------------


def write_nanogpt_data(shards: Path, data_dir: Path) -> dict:
    """Our train/val rows, flattened, as nanoGPT's train.bin / val.bin (uint16) plus meta.pkl."""
    import numpy as np

    from lmforge.data.tokens.shards import ShardReader

    info = {}
    for split in ("train", "val"):
        reader = ShardReader(shards, split, verify="size")
        if reader.dtype != np.uint16:
            raise SystemExit(f"nanoGPT reads uint16 tokens; these shards are {reader.dtype}")
        flat = np.concatenate([b.reshape(-1) for b in reader.blocks()])
        out = np.memmap(data_dir / f"{split}.bin", dtype=np.uint16, mode="w+", shape=flat.shape)
        out[:] = flat
        out.flush()
        del out
        info[split] = int(flat.size)
        vocab, seq_len = reader.vocab_size, reader.seq_len
    with open(data_dir / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": vocab}, f)
    return {"tokens": info, "vocab_size": vocab, "seq_len": seq_len}


def summarize(runs: list[dict]) -> dict:
    per_round = [r["tokens_per_iter"] / statistics.median(r["iter_s"]) for r in runs]
    all_iters = sorted(s for r in runs for s in r["iter_s"])
    # This host's CPU time is shared: iterations are either undisturbed or 3-10x slower. The fast
    # decile of all timed iterations estimates the undisturbed speed; the median is reported too.
    p10 = all_iters[len(all_iters) // 10]
    return {
        "tokens_per_s_fast_decile": runs[0]["tokens_per_iter"] / p10,
        "ms_per_iter_fast_decile": 1000 * p10,
        "tokens_per_s": statistics.median(per_round),
        "tokens_per_s_rounds": per_round,
        "tokens_per_s_best_round": max(per_round),  # the least disturbed round (this host is noisy)
        "ms_per_iter": 1000 * statistics.median(all_iters),
        "peak_rss_mb": statistics.median(r["rss_mb"] for r in runs),
        "params": runs[0]["params"],
        "warmup_s_first_round": runs[0]["warmup_s"],
        "final_loss": runs[-1]["final_loss"],
        **({"trainer_reported_tokens_per_s": statistics.median(
            [v for r in runs for v in r["trainer_tokens_per_s"]])} if "trainer_tokens_per_s" in runs[0] else {}),
        **({"ffn_hidden": runs[0]["ffn_hidden"]} if "ffn_hidden" in runs[0] else {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nanogpt", type=Path, help="a checkout of karpathy/nanoGPT (not in this repo)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: the GPT-2 124M benchmark of bench/train_speed_cuda.py")
    parser.add_argument("--shards", type=Path, default=REPO / "data" / "shards", help="seq_len 256, uint16 shards")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile happens here)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma list of {ALL_METHODS}")
    parser.add_argument("--out", type=Path, help="default bench/results/train_speed[_cuda|_loss_memory].json")
    parser.add_argument("--worker", nargs="?", const="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    cuda_bench.add_arguments(parser)
    train_scaling.add_arguments(parser)
    args = parser.parse_args()

    if args.worker:
        result = worker_ours(args) if args.worker == "cpu" else cuda_bench.worker(args)
        print(RESULT_TAG + json.dumps(result), flush=True)
        return
    if args.scaling:  # FSDP vs TP vs FSDP x TP, fp32 vs bf16 reduce: bench/train_scaling.py
        train_scaling.main(args)
        return
    if args.loss_memory or args.device == "cuda":
        suffix = "_loss_memory" if args.loss_memory else "_cuda"
        if not args.loss_memory:
            args.method_list = [m.strip() for m in (args.methods if args.methods != ",".join(DEFAULT_METHODS)
                                                    else ",".join(cuda_bench.CUDA_METHODS)).split(",")]
        report = cuda_bench.main_loss_memory(args) if args.loss_memory else cuda_bench.main_cuda(args)
        out = args.out or REPO / "bench" / "results" / f"train_speed{suffix}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        import torch

        report["env"] = {"torch": torch.__version__, "python": sys.version.split()[0], "cpu_count": os.cpu_count()}
        report["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        out.write_text(json.dumps(report, indent=2))
        print(f"wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
        return
    if args.nanogpt is None:
        parser.error("--nanogpt PATH is required (a checkout of karpathy/nanoGPT)")
    args.out = args.out or REPO / "bench" / "results" / "train_speed.json"

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(ALL_METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {ALL_METHODS}")
    if any(m.startswith("nanogpt") for m in methods) and not (args.nanogpt / "train.py").is_file():
        parser.error(f"{args.nanogpt}/train.py not found: check out karpathy/nanoGPT there (see this script's docstring)")
    args.nanogpt = args.nanogpt.resolve()
    args.shards = args.shards.resolve()

    results: dict[str, list[dict]] = {m: [] for m in methods}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lmforge-train-speed-") as tmp:
        data_dir, out_dir = Path(tmp) / "data", Path(tmp) / "out"
        data_dir.mkdir()
        data = write_nanogpt_data(args.shards, data_dir)
        args.seq_len = data["seq_len"]
        if args.seq_len != 256:
            print(f"note: shards have seq_len {args.seq_len}, not nanoGPT's 256", flush=True)
        print(f"data: {data['tokens']['train']:,} train tokens, vocab {data['vocab_size']}, seq_len {args.seq_len}; "
              f"{args.rounds} rounds x {methods}, {args.warmup} warm-up + {args.steps} timed steps", flush=True)
        for round_ in range(args.rounds):
            for method in methods:  # interleaved: machine noise hits every method alike
                t0 = time.perf_counter()
                if method.startswith("nanogpt"):
                    run = run_nanogpt(args, data_dir, out_dir, compile_=method == "nanogpt-compile")
                else:
                    run = run_ours(args, method)
                results[method].append(run)
                tps = run["tokens_per_iter"] / statistics.median(run["iter_s"])
                print(f"round {round_ + 1}/{args.rounds} {method:>15}: {tps:8.0f} tokens/s, "
                      f"{run['rss_mb']:.0f} MB peak RSS, loss {run['final_loss']:.3f} "
                      f"({time.perf_counter() - t0:.0f}s wall)", flush=True)

    rows = {m: summarize(r) for m, r in results.items()}
    ratios = {}
    if "nanogpt" in rows:
        base = rows["nanogpt"]["tokens_per_s"]
        for m in rows:
            if m != "nanogpt":
                ratios[f"{m} / nanogpt"] = rows[m]["tokens_per_s"] / base
        fast_base = rows["nanogpt"]["tokens_per_s_fast_decile"]
        for m in rows:
            if m != "nanogpt":
                ratios[f"{m} / nanogpt (fast decile)"] = rows[m]["tokens_per_s_fast_decile"] / fast_base
    targets = {"ours / nanogpt": 1.0, "ours-compile / nanogpt": 1.3,
               "ours / nanogpt (fast decile)": 1.0, "ours-compile / nanogpt (fast decile)": 1.3}

    print(f"\nTraining speed, CPU, {args.threads} threads, fp32, batch {args.batch_size} x seq {args.seq_len}, "
          f"4 layers / 4 heads / dim 256; median of {args.rounds} rounds x {args.steps} steps\n")
    print("| method | tokens/s (median) | ms/iter | peak RSS MB | params | vs nanoGPT eager "
          "| tokens/s (fast decile) | vs nanoGPT (fast decile) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for m, row in rows.items():
        ratio = ratios.get(f"{m} / nanogpt")
        fast = ratios.get(f"{m} / nanogpt (fast decile)")
        print(f"| {m} | {row['tokens_per_s']:,.0f} | {row['ms_per_iter']:.1f} | {row['peak_rss_mb']:.0f} | "
              f"{row['params']:,} | {'1.00x' if m == 'nanogpt' else (f'{ratio:.2f}x' if ratio else '-')} | "
              f"{row['tokens_per_s_fast_decile']:,.0f} | {'1.00x' if m == 'nanogpt' else (f'{fast:.2f}x' if fast else '-')} |")
    if ratios:
        print("\n| ratio | value | target | met |\n| --- | ---: | ---: | :---: |")
        for name, value in ratios.items():
            target = targets.get(name)
            met = "-" if target is None else ("yes" if value >= target else "no")
            print(f"| {name} | {value:.2f}x | {f'>= {target}x' if target else '-'} | {met} |")
    print(f"\n(total {time.perf_counter() - started:.0f}s)")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("worker", "method")}
    import torch

    env = {"torch": torch.__version__, "python": sys.version.split()[0], "cpu_count": os.cpu_count()}
    args.out.write_text(json.dumps({"rows": rows, "ratios": ratios, "targets": targets, "args": meta,
                                    "env": env, "raw": results}, indent=2))
    print(f"wrote {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}")


if __name__ == "__main__":
    main()
