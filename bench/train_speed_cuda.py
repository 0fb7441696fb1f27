"""The GPU half of bench/train_speed.py (`--device cuda`), and the loss-memory figure on any device.

`python bench/train_speed.py --device cuda --nanogpt PATH`: the GPT-2 124M shape (12 layers, 12
heads, dim 768, seq 1024, vocab 50,304), bf16 autocast, torch.compile, one GPU:

  ours            lmforge's Trainer on preset "124m" (compiled blocks, fused AdamW, bf16 autocast)
  nanogpt         nanoGPT's own train.py, --compile=True --dtype=bfloat16, same batch and accumulation
  ours-ckpt-sync  ours with a checkpoint every --ckpt-every steps, written in line
  ours-ckpt-async the same with runtime.pretrain.async_checkpoint (staged CPU copy, background write)
  ours-fp8        ours with pretrain.precision fp8 (lmforge.train.fp8: torchao float8 for the blocks'
                  projections, tensorwise scaling, bf16 autocast for the rest); GPUs of compute
                  capability >= 8.9 only, skipped with a line elsewhere
  ours-fp8-rowwise the same with pretrain.fp8_recipe rowwise

Both read the same train.bin (uint16 ids, drawn once from a seeded uniform distribution over the
vocabulary: speed does not depend on the text); nanoGPT samples random windows of it, ours packed
rows of it. Rounds interleave the methods; medians are reported. Per method: tokens/s, MFU by our
formula (lmforge.model.decoder.ModelConfig.flops_per_token, 6N + 12LHQT with the embedding counted in N)
and by nanoGPT's (estimate_mfu: the same with N excluding the position table), both against the
device's bf16 peak from lmforge.train.throughput (nanoGPT's own printed MFU assumes an A100's 312 TFLOP/s;
it is kept as `nanogpt_printed_mfu`), peak CUDA memory, and for the checkpoint runs the step-time
spike: the slowest step after a save minus the median step.

`python bench/train_speed.py --loss-memory [--device cpu|cuda]`: peak memory of one forward and
backward of the output head + cross-entropy at vocab 50,304 (batch x 1024 tokens, dim 768), plain
logits against lmforge.model.loss.chunked_cross_entropy, each in a fresh process (CPU: its VmHWM less the
RSS before the step; CUDA: max_memory_allocated less the memory before the step).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULT_TAG = "BENCH_RESULT "
GPT2 = {"n_layers": 12, "n_heads": 12, "dim": 768, "seq_len": 1024, "vocab_size": 50304}
CUDA_METHODS = ("ours", "nanogpt", "ours-ckpt-sync", "ours-ckpt-async", "ours-fp8", "ours-fp8-rowwise")
FP8_METHODS = {"ours-fp8": "tensorwise", "ours-fp8-rowwise": "rowwise"}


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --- children ------------------------------------------------------------------------------------


class TokenRows:
    """train.bin as packed rows of seq_len + 1 ids (the layout of our shards)."""

    def __init__(self, path: Path, seq_len: int, vocab_size: int) -> None:
        import numpy as np

        flat = np.memmap(path, dtype=np.uint16, mode="r")
        n = len(flat) // (seq_len + 1)
        self.rows = flat[: n * (seq_len + 1)].reshape(n, seq_len + 1)
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return self.rows[i]


def worker_ours(args: argparse.Namespace) -> dict:
    import torch

    from lmforge.model.decoder import Transformer, build_config
    from lmforge.train.distributed import apply_compile, init_distributed
    from lmforge.core.params import TrainerParams
    from lmforge.model.loss import lm_loss
    from lmforge.train.throughput import peak_flops
    from lmforge.train.batches import PackedRows

    from lmforge.train.trainer import Trainer

    torch.manual_seed(1337)
    torch.backends.cuda.matmul.allow_tf32 = True  # as nanoGPT's train.py sets
    torch.backends.cudnn.allow_tf32 = True
    info = init_distributed(device="cuda")
    config = build_config("124m", vocab_size=GPT2["vocab_size"], max_seq_len=GPT2["seq_len"])
    model = Transformer(config).to(info.device)
    recipe = FP8_METHODS.get(args.method)
    if recipe is not None:  # before compile, as lmforge.train.pretraining.build_decoder does
        from lmforge.train import fp8

        fp8.convert(model, recipe, fsdp=False)
    apply_compile(model)
    checkpointing = args.method.startswith("ours-ckpt")
    total = args.warmup + args.steps
    cfg = TrainerParams(
        max_steps=total, micro_batch_size=args.batch_size, grad_accum_steps=args.accum,
        precision="fp8" if recipe is not None else "bf16",
        eval_every=0, checkpoint_every=args.ckpt_every if checkpointing else 0, keep_checkpoints=1,
        resume="never", progress=False, warmup_steps=2,
    )
    stamps: list[float] = []
    losses: list[float] = []

    def on_metrics(step: int, metrics: dict) -> None:
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        losses.append(float(metrics["train_loss"]))

    rows = TokenRows(Path(args.data) / "train.bin", GPT2["seq_len"], GPT2["vocab_size"])
    with tempfile.TemporaryDirectory(prefix="lmforge-ckpt-") as ckpt:
        import functools

        trainer = Trainer(model, cfg, PackedRows(rows), dist_info=info, checkpoint_dir=ckpt if checkpointing else None,
                          on_metrics=on_metrics, async_checkpoint=args.method == "ours-ckpt-async",
                          loss_fn=functools.partial(lm_loss, loss_chunk=args.loss_chunk))
        t_start = time.perf_counter()
        trainer.fit()
    iter_s = [stamps[0] - t_start] + [b - a for a, b in zip(stamps, stamps[1:])]
    tokens = args.batch_size * args.accum * GPT2["seq_len"]
    peak, name = peak_flops(info.device)
    nano_n = config.num_params()  # nanoGPT's get_num_params: all but the position table (we have none)
    nano_flops = 6 * nano_n + 12 * config.n_layers * config.n_heads * config.head_dim * GPT2["seq_len"]
    # Steps whose loop time includes a save: the one after each checkpoint step.
    after_save = [s for s in range(max(args.warmup, 1), total) if checkpointing and s % args.ckpt_every == 0]
    return {
        "iter_s": iter_s[args.warmup:], "warmup_s": iter_s[: args.warmup], "tokens_per_iter": tokens,
        "flops_per_token_ours": config.flops_per_token(GPT2["seq_len"]), "flops_per_token_nanogpt": nano_flops,
        "peak_flops": peak, "device_name": name, "params": model.num_params(), "final_loss": losses[-1],
        "peak_mem_mib": torch.cuda.max_memory_allocated() / 2**20,
        "after_save_s": [iter_s[s] for s in after_save],
    }


NANOGPT_WRAPPER = r"""
import json, runpy, sys
sys.path.insert(0, '.')
sys.argv = ['train.py'] + sys.argv[1:]
g = runpy.run_path('train.py', run_name='__main__')
import torch
m = g['raw_model']
print('%s' + json.dumps({'params': sum(p.numel() for p in {id(p): p for p in m.parameters()}.values()),
                         'params_nanogpt_count': m.get_num_params(),
                         'peak_mem_mib': torch.cuda.max_memory_allocated() / 2**20}), flush=True)
""" % RESULT_TAG


def run_nanogpt(args: argparse.Namespace) -> dict:
    import re

    total = args.warmup + args.steps
    overrides = {
        "device": "cuda", "compile": True, "dtype": "bfloat16", "n_layer": GPT2["n_layers"],
        "n_head": GPT2["n_heads"], "n_embd": GPT2["dim"], "block_size": GPT2["seq_len"],
        "batch_size": args.batch_size, "gradient_accumulation_steps": args.accum, "max_iters": total - 1,
        "eval_interval": 10**9, "eval_iters": 1, "log_interval": 1, "bias": False, "dropout": 0.0,
        "wandb_log": False, "always_save_checkpoint": False, "init_from": "scratch",
        "dataset": str(args.data), "out_dir": str(Path(args.data) / "out"),
    }
    proc = subprocess.run([sys.executable, "-c", NANOGPT_WRAPPER, *[f"--{k}={v}" for k, v in overrides.items()]],
                          cwd=args.nanogpt, env=dict(os.environ), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nanoGPT train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    lines = re.findall(r"^iter (\d+): loss ([0-9.naninf]+), time ([0-9.]+)ms, mfu (-?[0-9.]+)%", proc.stdout, re.M)
    if len(lines) != total:
        raise RuntimeError(f"expected {total} 'iter' lines from nanoGPT, got {len(lines)}:\n{proc.stdout[-3000:]}")
    tail = json.loads(proc.stdout.rsplit(RESULT_TAG, 1)[1].splitlines()[0])
    times = [float(ms) / 1000 for _, _, ms, _ in lines]
    import torch

    from lmforge.train.throughput import peak_flops

    peak, name = peak_flops(torch.device("cuda", 0))
    n = tail["params_nanogpt_count"]
    return {
        "iter_s": times[args.warmup:], "warmup_s": times[: args.warmup], "final_loss": float(lines[-1][1]),
        "tokens_per_iter": args.batch_size * args.accum * GPT2["seq_len"],
        "flops_per_token_nanogpt": 6 * n + 12 * GPT2["n_layers"] * GPT2["dim"] * GPT2["seq_len"],
        "nanogpt_printed_mfu": float(lines[-1][3]) / 100, "peak_flops": peak, "device_name": name, **tail,
    }


def worker_loss_memory(args: argparse.Namespace) -> dict:
    """One forward + backward of the head and the loss; the memory it took above what was there."""
    import torch

    from lmforge.model.loss import chunked_cross_entropy
    from lmforge.model.decoder import IGNORE_INDEX

    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.batch_size, GPT2["seq_len"], GPT2["dim"], generator=g).to(device).requires_grad_()
    weight = (0.02 * torch.randn(GPT2["vocab_size"], GPT2["dim"], generator=g)).to(device).requires_grad_()
    targets = torch.randint(0, GPT2["vocab_size"], (args.batch_size, GPT2["seq_len"]), generator=g).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = _rss_mib()
    t0 = time.perf_counter()
    if args.loss_chunk:
        loss = chunked_cross_entropy(hidden, weight, targets, args.loss_chunk)
    else:
        logits = torch.nn.functional.linear(hidden, weight)
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, GPT2["vocab_size"]), targets.view(-1),
                                                 ignore_index=IGNORE_INDEX, reduction="sum")
        del logits
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = _hwm_mib()
    return {"extra_mib": peak - before, "seconds": time.perf_counter() - t0, "loss": float(loss)}


# --- parent --------------------------------------------------------------------------------------


def _child(args: argparse.Namespace, worker: str, **extra: object) -> dict:
    cmd = [sys.executable, str(REPO / "bench" / "train_speed.py"), "--worker", worker]
    for key, value in {**vars(args), **extra}.items():
        if key in ("worker", "method_list", "out") or value is None or isinstance(value, bool):
            continue
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0 or RESULT_TAG not in proc.stdout:
        raise RuntimeError(f"{worker} {extra} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.rsplit(RESULT_TAG, 1)[1].splitlines()[0])


def write_tokens(data_dir: Path, tokens: int) -> None:
    import numpy as np

    rng = np.random.default_rng(1337)
    for split, n in (("train", tokens), ("val", tokens // 10)):
        rng.integers(0, GPT2["vocab_size"], n, dtype=np.uint16).tofile(data_dir / f"{split}.bin")
    import pickle

    with open(data_dir / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": GPT2["vocab_size"]}, f)


def summarize(runs: list[dict]) -> dict:
    tps = statistics.median(r["tokens_per_iter"] / statistics.median(r["iter_s"]) for r in runs)
    row: dict = {"tokens_per_s": tps, "ms_per_iter": 1000 * statistics.median(s for r in runs for s in r["iter_s"]),
                 "peak_mem_mib": statistics.median(r["peak_mem_mib"] for r in runs), "params": runs[0]["params"],
                 "final_loss": runs[-1]["final_loss"]}
    peak = runs[0].get("peak_flops")
    for formula in ("ours", "nanogpt"):
        per_token = runs[0].get(f"flops_per_token_{formula}")
        if peak and per_token:
            row[f"mfu_{formula}_formula"] = per_token * tps / peak
    if "nanogpt_printed_mfu" in runs[0]:
        row["nanogpt_printed_mfu"] = statistics.median(r["nanogpt_printed_mfu"] for r in runs)
    spikes = [s for r in runs for s in r.get("after_save_s", [])]
    if spikes:
        row["checkpoint_step_spike_ms"] = 1000 * (statistics.median(spikes) - row["ms_per_iter"] / 1000)
    return row


def main_cuda(args: argparse.Namespace) -> dict:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU here (install a CUDA build of torch, or run on a GPU host)")
    methods = args.method_list
    from lmforge.train import fp8

    no_fp8 = fp8.refusal("pretrain.precision", torch.cuda.get_device_capability())
    if no_fp8 and set(methods) & set(FP8_METHODS):
        print(f"skipping {', '.join(m for m in methods if m in FP8_METHODS)}: {no_fp8}", flush=True)
        methods = [m for m in methods if m not in FP8_METHODS]
    if "nanogpt" in methods and (args.nanogpt is None or not (Path(args.nanogpt) / "train.py").is_file()):
        raise SystemExit(f"{args.nanogpt}/train.py not found: check out karpathy/nanoGPT there")
    results: dict[str, list[dict]] = {m: [] for m in methods}
    with tempfile.TemporaryDirectory(prefix="lmforge-gpu-speed-") as tmp:
        args.data = tmp
        # Enough rows that ours never repeats one within a run.
        write_tokens(Path(tmp), (args.warmup + args.steps + 2) * args.batch_size * args.accum * (GPT2["seq_len"] + 1))
        for round_ in range(args.rounds):
            for method in methods:
                run = run_nanogpt(args) if method == "nanogpt" else _child(args, "ours-cuda", method=method)
                results[method].append(run)
                print(f"round {round_ + 1}/{args.rounds} {method:>16}: "
                      f"{run['tokens_per_iter'] / statistics.median(run['iter_s']):10,.0f} tokens/s, "
                      f"peak {run['peak_mem_mib']:,.0f} MiB, loss {run['final_loss']:.3f}", flush=True)
    rows = {m: summarize(r) for m, r in results.items()}
    device = next((r[0]["device_name"] for r in results.values() if "device_name" in r[0]), torch.cuda.get_device_name())
    print(f"\n{device}, bf16, compile, GPT-2 124M shape, batch {args.batch_size} x accum {args.accum} x seq 1024\n")
    print("| method | tokens/s | vs nanoGPT | MFU (our formula) | MFU (nanoGPT's) | peak MiB | ckpt-step spike ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = rows.get("nanogpt", {}).get("tokens_per_s")
    for m, row in rows.items():
        ratio = f"{row['tokens_per_s'] / base:.2f}x" if base else "-"
        fmt = lambda k: f"{100 * row[k]:.1f} %" if k in row else "-"  # noqa: E731
        spike = f"{row['checkpoint_step_spike_ms']:.0f}" if "checkpoint_step_spike_ms" in row else "-"
        print(f"| {m} | {row['tokens_per_s']:,.0f} | {ratio} | {fmt('mfu_ours_formula')} | "
              f"{fmt('mfu_nanogpt_formula')} | {row['peak_mem_mib']:,.0f} | {spike} |")
    for m in FP8_METHODS:
        if m in rows and "ours" in rows:
            print(f"\n{m}: {rows[m]['tokens_per_s'] / rows['ours']['tokens_per_s']:.2f}x the tokens/s of bf16 (ours), "
                  f"final loss {rows[m]['final_loss']:.3f} against {rows['ours']['final_loss']:.3f}")
    return {"device": device, "rows": rows, "raw": results}


def main_loss_memory(args: argparse.Namespace) -> dict:
    rows = {}
    for chunk in (0, args.loss_chunk or 1024):
        run = _child(args, "loss-memory", loss_chunk=chunk)
        rows["plain" if chunk == 0 else f"chunked ({chunk} tokens)"] = run
    full = args.batch_size * GPT2["seq_len"] * GPT2["vocab_size"] * 4 / 2**20
    print(f"\nHead + cross-entropy, forward and backward, {args.device}, batch {args.batch_size} x 1024 tokens, "
          f"dim 768, vocab 50,304 (fp32 logits alone: {full:,.0f} MiB)\n")
    print("| loss | extra peak memory MiB | seconds |\n| --- | ---: | ---: |")
    for name, run in rows.items():
        print(f"| {name} | {run['extra_mib']:,.0f} | {run['seconds']:.2f} |")
    return {"device": args.device, "rows": rows, "logits_fp32_mib": full}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--accum", type=int, default=4, help="cuda: gradient accumulation steps (both)")
    parser.add_argument("--ckpt-every", type=int, default=5, help="cuda: checkpoint interval of ours-ckpt-*")
    parser.add_argument("--loss-chunk", type=int, default=0, help="tokens per loss chunk (0: plain loss)")
    parser.add_argument("--loss-memory", action="store_true", help="measure the loss's peak memory instead")
    parser.add_argument("--data", help=argparse.SUPPRESS)


def worker(args: argparse.Namespace) -> dict:
    return worker_ours(args) if args.worker == "ours-cuda" else worker_loss_memory(args)
