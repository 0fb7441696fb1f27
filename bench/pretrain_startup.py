"""Benchmark of the pretrain stage's fixed cost (not a test): the time from starting the process to the
end of its first optimizer step, against nanoGPT's train.py at the same config on the same tokens,
interleaved in one run. Target (issue 24): ours <= nanoGPT's + 1 s.

Config: bench/train_speed.py's CPU shape (4 layers, 4 heads, dim 256, seq_len 256, micro-batch 8, fp32,
2 threads), on a corpus of 2,000 generated documents (tests/conftest.py's make_repo), tokenized once
by the repository's own data stages (vocab 2,048).

  ours      `python -m stages.pretrain` in that workspace, fresh (its checkpoints removed before each
            round, so it never resumes), with the local MLflow store: everything the stage does before
            its first step (imports, params, checkpoint claim, shard checks, model, the live journal
            its MLflow run is written from: the tracking agent imports MLflow on the other core).
            The first step ends when its record lands in checkpoints/pretrain/curve.jsonl. Each round
            then waits for the agent to have written the run and registered the model (`tracked_s`,
            from the stage's start), so no round's agent runs beside the next process.
  nanogpt   nanoGPT's train.py, unmodified, --compile=False; its first step ends when it prints `iter 0`
            (after the one evaluation it does at iteration 0, on one batch of train and val).
  torch     `python -c "import torch"`: the floor both pay.

nanoGPT's code is NOT part of this repository; get it once, outside the repo (see bench/train_speed.py):

    python bench/pretrain_startup.py --nanogpt /tmp/nanogpt --rounds 5

Prints a table of medians and ours' own breakdown (LMFORGE_TIMINGS); results: bench/results/pretrain_startup.json.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "bench")]

from conftest import make_repo, tiny_params, tool_env  # noqa: E402
from lmforge.track.deferred import wait_for_journals  # noqa: E402
from train_speed import NANOGPT_WRAPPER, SHAPE, nanogpt_argv, write_nanogpt_data  # noqa: E402

SEQ_LEN, BATCH, STEPS = 256, 8, 3
PARAMS = {
    "tokenizer": {"vocab_size": 2048, "seq_len": SEQ_LEN, "shard_rows": 256},
    "model": {"preset": "small", "dim": None},
    "pretrain": {"max_steps": STEPS, "micro_batch_size": BATCH, "grad_accum_steps": 1, "warmup_steps": 1,
                 "eval_every": 0, "precision": "fp32"},
    "runtime": {"pretrain": {"progress": False, "checkpoint_every": 0, "compile": False}},
}
TIMINGS_LINE = re.compile(r"\[pretrain\] timings: (.*)")


def _env() -> dict[str, str]:
    """Two threads, the stage's breakdown printed, the workspace's local store (tool_env passes no MLFLOW_*)."""
    return tool_env(OMP_NUM_THREADS="2", MKL_NUM_THREADS="2", LMFORGE_TIMINGS="1")


def _first_step_ours(root: Path) -> dict:
    shutil.rmtree(root / "checkpoints", ignore_errors=True)
    curve = root / "checkpoints/pretrain/curve.jsonl"
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "stages.pretrain"], cwd=root, env=_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = None
    while process.poll() is None:
        if first is None and curve.is_file() and curve.stat().st_size:
            first = time.perf_counter() - started
        time.sleep(0.005)
    total = time.perf_counter() - started
    out, err = process.communicate()
    if process.returncode != 0 or first is None:
        raise RuntimeError(f"the pretrain stage failed ({process.returncode}):\n{out[-3000:]}\n{err[-3000:]}")
    left = wait_for_journals(root)
    tracked = time.perf_counter() - started
    if left:
        raise RuntimeError(f"the tracking agent did not write {left}: see {left[0].parent / 'agent.log'}")
    timings = TIMINGS_LINE.search(err)
    return {"first_step_s": first, "total_s": total, "tracked_s": tracked,
            "timings": timings.group(1) if timings else None}


def _first_step_nanogpt(nanogpt: Path, data_dir: Path, out_dir: Path) -> dict:
    argv = nanogpt_argv(STEPS, SEQ_LEN, BATCH, data_dir, out_dir, compile_=False)
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-u", "-c", NANOGPT_WRAPPER, *argv], cwd=nanogpt, env=_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first, lines = None, []
    for line in process.stdout:
        lines.append(line)
        if first is None and line.startswith("iter 0:"):
            first = time.perf_counter() - started
    process.wait()
    total = time.perf_counter() - started
    if process.returncode != 0 or first is None:
        raise RuntimeError(f"nanoGPT failed ({process.returncode}):\n{''.join(lines)[-3000:]}")
    return {"first_step_s": first, "total_s": total}


def _import_torch() -> dict:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], env=_env(), check=True)
    return {"first_step_s": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nanogpt", type=Path, required=True, help="a checkout of karpathy/nanoGPT (not in this repo)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/pretrain_startup.json")
    args = parser.parse_args()
    if not (args.nanogpt / "train.py").is_file():
        parser.error(f"{args.nanogpt}/train.py not found: check out karpathy/nanoGPT there (see the docstring)")
    with tempfile.TemporaryDirectory(prefix="lmforge-startup-") as tmp:
        root = make_repo(Path(tmp) / "repo", tiny_params(**PARAMS), n_docs=2000)
        subprocess.run(["dvc", "repro", "tokenize"], cwd=root, env=_env(), check=True, capture_output=True)
        data_dir, out_dir = Path(tmp) / "nanogpt_data", Path(tmp) / "nanogpt_out"
        data_dir.mkdir()
        data = write_nanogpt_data(root / "data/shards", data_dir)
        runs: dict[str, list[dict]] = {"ours": [], "nanogpt": [], "torch": []}
        for round_ in range(args.rounds):
            runs["torch"].append(_import_torch())
            runs["nanogpt"].append(_first_step_nanogpt(args.nanogpt.resolve(), data_dir, out_dir))
            runs["ours"].append(_first_step_ours(root))
            print(f"round {round_ + 1}: " + ", ".join(f"{m} {r[-1]['first_step_s']:.2f} s" for m, r in runs.items()),
                  file=sys.stderr)
    medians = {m: statistics.median(r["first_step_s"] for r in rs) for m, rs in runs.items()}
    result = {
        "config": {**SHAPE, "seq_len": SEQ_LEN, "micro_batch": BATCH, "threads": 2, **data},
        "first_step_s_median": medians,
        "ours_minus_nanogpt_s": medians["ours"] - medians["nanogpt"],
        "target_s": 1.0,
        "total_s_median": {m: statistics.median(r["total_s"] for r in rs) for m, rs in runs.items() if m != "torch"},
        "ours_tracked_s_median": statistics.median(r["tracked_s"] for r in runs["ours"]),
        "ours_timings": [r["timings"] for r in runs["ours"]],
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print("| process | first step ends at (median) |\n| --- | ---: |")
    for method, seconds in medians.items():
        print(f"| {method} | {seconds:.2f} s |")
    print(f"ours - nanogpt: {result['ours_minus_nanogpt_s']:+.2f} s (target <= +1.00 s)")
    print(f"ours' breakdown (last round): {runs['ours'][-1]['timings']}")
    print(f"ours: process ends at {result['total_s_median']['ours']:.2f} s, its run written and model registered "
          f"at {result['ours_tracked_s_median']:.2f} s (medians)")


if __name__ == "__main__":
    main()
