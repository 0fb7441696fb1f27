"""The tokenize stage end to end against a run_clm-style prep, on the same clean text (not a test).

  ours    a fresh `python` process that does what `python -m stages.tokenize_data` does: start the
          embedded engine (from 3 workers; with fewer, the process runs the tasks itself), sample
          the train split (tokenizer.train_sample_mb), train the BPE, encode, pack and write the
          shards + manifest (lmforge.data.tokenize_job.TokenizeJob);
  theirs  a fresh `python` process that reads the same clean Parquet parts, trains the same BPE
          (tokenizers' BpeTrainer with the settings of lmforge/data/tokens/tokenizer.py and params.yaml) on
          the same train split (by document id), then runs `datasets.Dataset.map` (batched, the fast tokenizer) and
          `group_texts` (concatenate, cut into blocks of seq_len + 1) as transformers' run_clm.py does.

  practitioner  the same BPE and `datasets.map`, written the way a practitioner tunes run_clm's prep: the
          map returns `input_ids` only (no attention mask, no offsets), `group_texts` concatenates with numpy,
          both maps use `num_proc` = the cores (`--num-proc` overrides).

Each is timed from the outside (process start, imports and BPE training included), interleaved
A, B, C, A, B, C, ...; each ratio is a baseline's wall / ours' (> 1: ours is faster). The corpus is ingested and
cleaned once beforehand (not timed). Targets (issue 13): >= 50 MB of real English text, ratio >= 1.2.

    python bench/real_text.py --out /tmp/real-text                      # ~67 MB of real text (50 MB once cleaned)
    python bench/tokenize_vs_run_clm.py --files '/tmp/real-text/*.jsonl'
    python bench/tokenize_vs_run_clm.py --files '/tmp/real-text/fortunes.jsonl' --rounds 1   # quick check
    python bench/tokenize_vs_run_clm.py --files '/tmp/real-text/*.jsonl' --partition-mb 16 --methods ours practitioner --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
METHODS = ("ours", "theirs", "practitioner")


def ours(work: Path, run_dir: Path, workers: int | None) -> dict[str, Any]:
    """The tokenize stage's work, as stages/tokenize_data.py runs it (without the tracking)."""
    from lmforge import quiet_env
    from lmforge.data.job import run_data_job
    from lmforge.data.tokenize_job import TokenizeJob
    from lmforge.core.params import EngineParams, load_params

    quiet_env(os.environ)
    params = load_params(REPO / "params.yaml")
    stats = run_data_job(TokenizeJob(params.tokenizer, params.data.val_fraction, work / "clean", run_dir / "shards",
                                     run_dir / "tokenizer", run_dir / "staging"), EngineParams(workers=workers))
    return {key: stats[key] for key in ("train_sample_mb", "sample_rate", "sample_documents", "sample_bytes",
                                        "tokenizer_train_seconds", "bytes_in", "vocab_size", "partitions",
                                        "workers", "train.tokens", "val.tokens")}


def theirs(work: Path, run_dir: Path, num_proc: int | None, tuned: bool = False) -> dict[str, Any]:
    """A run_clm-style prep: the same BPE trained on the text, then datasets.map + group_texts;
    `tuned`: ids only, numpy concatenation, `num_proc` = cores unless given (the practitioner's)."""
    import datasets
    import numpy
    import pyarrow.parquet as pq
    import yaml
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    datasets.disable_progress_bars()
    datasets.disable_caching()  # map results go to a temporary directory, not ~/.cache
    settings = yaml.safe_load((REPO / "params.yaml").read_text())["tokenizer"]
    manifest = json.loads((work / "clean" / "manifest.json").read_text())
    from lmforge.data.documents import split_of

    val_fraction = yaml.safe_load((REPO / "params.yaml").read_text())["data"]["val_fraction"]
    texts: list[str] = []
    train_texts: list[str] = []  # the BPE trains on the train split, as ours does
    for part in manifest["parts"]:
        table = pq.read_table(work / "clean" / part["name"], columns=["id", "text"])
        for doc_id, text in zip(table.column("id").to_pylist(), table.column("text").to_pylist()):
            texts.append(text)
            if split_of(doc_id, val_fraction) == "train":
                train_texts.append(text)

    started = time.perf_counter()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=settings["vocab_size"], min_frequency=settings["min_frequency"],
                                  special_tokens=list(settings["special_tokens"]),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(train_texts, trainer=trainer, length=len(train_texts))
    train_seconds = time.perf_counter() - started
    eos = settings["eos_token"]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=eos)
    block_size = settings["seq_len"] + 1

    def tokenize_function(examples: dict[str, list]) -> Any:
        # run_clm appends nothing itself; EOS after each document like our packer, for the same tokens.
        return tokenizer([text + eos for text in examples["text"]])

    def tokenize_ids(examples: dict[str, list]) -> dict[str, list]:
        # Ids only: no attention mask, no offsets, no BatchEncoding (the fastest path a fast tokenizer offers).
        encoded = bpe.encode_batch_fast([text + eos for text in examples["text"]])
        return {"input_ids": [e.ids for e in encoded]}

    def group_ids(examples: dict[str, list]) -> dict[str, list]:
        ids = numpy.concatenate([numpy.asarray(row, dtype=numpy.int32) for row in examples["input_ids"]])
        blocks = ids[: len(ids) // block_size * block_size].reshape(-1, block_size)
        return {"input_ids": list(blocks)}

    def group_texts(examples: dict[str, list]) -> dict[str, list]:  # the logic of run_clm.py's group_texts
        concatenated = {k: sum(examples[k], []) for k in examples.keys()}
        total_length = len(concatenated[list(examples.keys())[0]])
        total_length = (total_length // block_size) * block_size
        return {k: [t[i : i + block_size] for i in range(0, total_length, block_size)] for k, t in concatenated.items()}

    raw = datasets.Dataset.from_dict({"text": texts})
    if tuned:
        num_proc = num_proc or os.cpu_count()
        tokenized = raw.map(tokenize_ids, batched=True, remove_columns=["text"], num_proc=num_proc)
        grouped = tokenized.map(group_ids, batched=True, num_proc=num_proc)
    else:
        tokenized = raw.map(tokenize_function, batched=True, remove_columns=["text"], num_proc=num_proc)
        grouped = tokenized.map(group_texts, batched=True, num_proc=num_proc)
    assert len(grouped) > 0
    return {"bpe_train_texts_mb": round(sum(len(t.encode("utf-8")) for t in train_texts) / 1e6, 2),
            "tokenizer_train_seconds": round(train_seconds, 2), "blocks": len(grouped), "block_size": block_size}


def timed(method: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Wall of one fresh process running `method`, from the outside; peak RSS of its process tree (sum)."""
    run_dir = Path(tempfile.mkdtemp(dir=work, prefix=f"{method}-"))  # fresh: the stage resumes from staging
    command = [sys.executable, __file__, "--worker", method, "--work", str(work), "--run-dir", str(run_dir)]
    command += ["--workers", str(args.workers)] if args.workers else []
    command += ["--num-proc", str(args.num_proc)] if args.num_proc else []
    peak = [0]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    done = threading.Event()

    def sample() -> None:
        root = psutil.Process(process.pid)
        while not done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in tree))
            except psutil.Error:
                pass
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = process.communicate()
    wall = time.perf_counter() - started
    done.set()
    sampler.join()
    if process.returncode:
        raise SystemExit(f"{method} failed (exit {process.returncode})")
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"method": method, "wall_s": round(wall, 2), "peak_rss_tree_mb": round(peak[0] / 1e6),
            **json.loads(out.strip().splitlines()[-1])}


def prepare(work: Path, files: list[str], partition_mb: float | None, workers: int | None) -> dict[str, Any]:
    """Ingest and clean the corpus once (not timed), as the stages would."""
    from lmforge import quiet_env
    from lmforge.data.clean_job import CleanJob
    from lmforge.data.ingest_job import IngestJob
    from lmforge.data.engine import dask_client
    from lmforge.data.job import Engine, run_data_job
    from lmforge.core.params import DataParams, EngineParams, load_params

    quiet_env(os.environ)
    params = load_params(REPO / "params.yaml")
    data = DataParams(source="files", files=files, partition_mb=partition_mb or params.data.partition_mb)
    with dask_client(EngineParams(workers=workers)) as client:
        run_data_job(IngestJob(data, work / "raw", work / "staging-ingest"), Engine(client))
        stats = run_data_job(CleanJob(params.clean, work / "raw", work / "clean", work / "staging-clean"), Engine(client))
    return {"raw_mb": round(stats["bytes_in"] / 1e6, 2), "clean_mb": round(stats["bytes_out"] / 1e6, 2),
            "clean_documents": stats["documents_out"], "partitions": len(stats["partitions"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", nargs="+", default=["/tmp/real-text/*.jsonl"], help="globs (bench/real_text.py's output)")
    parser.add_argument("--rounds", type=int, default=3, help="A, B pairs")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="which to time (ours always; e.g. `--methods ours practitioner` for more rounds of the target's pair)")
    parser.add_argument("--workers", type=int, help="ours: embedded engine workers (default: one per core)")
    parser.add_argument("--num-proc", type=int, help="theirs: datasets.map num_proc (run_clm's "
                        "--preprocessing_num_workers; default None as in run_clm)")
    parser.add_argument("--partition-mb", type=float, help="data.partition_mb (default: params.yaml's)")
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "ours":
        print(json.dumps(ours(args.work, args.run_dir, args.workers)))
        return
    if args.worker in ("theirs", "practitioner"):
        print(json.dumps(theirs(args.work, args.run_dir, args.num_proc, tuned=args.worker == "practitioner")))
        return

    methods = ["ours", *(m for m in METHODS if m in args.methods and m != "ours")]
    load_before = tuple(round(x, 1) for x in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="tok-vs-clm-") as tmp:
        work = Path(tmp)
        corpus = prepare(work, args.files, args.partition_mb, args.workers)
        print(json.dumps({"corpus": corpus}), flush=True)
        runs: list[dict[str, Any]] = []
        for _ in range(args.rounds):
            for method in methods:  # interleaved: machine noise hits both alike
                runs.append(timed(method, work, args))
                print(json.dumps(runs[-1]), flush=True)
    walls = {m: [r["wall_s"] for r in runs if r["method"] == m] for m in methods}
    median = {m: statistics.median(w) for m, w in walls.items()}
    ratios = {m: median[m] / median["ours"] for m in methods if m != "ours"}
    sample = next(r for r in runs if r["method"] == "ours")
    print(f"\n{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, load average before "
          f"{load_before}, after {tuple(round(x, 1) for x in os.getloadavg())}; {corpus['clean_mb']} MB of clean text "
          f"({corpus['clean_documents']:,} documents, {corpus['partitions']} partitions)\n")
    print("| method (fresh process, end to end) | wall s per run | median s | baseline / ours | peak RSS MB (process tree) | BPE trained on |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    peak = {m: max(r["peak_rss_tree_mb"] for r in runs if r["method"] == m) for m in methods}
    where = f"engine, {sample['workers']} workers" if sample["workers"] else "in its own process: fewer than 3 workers"
    print(f"| tokenize stage ({where}) | {', '.join(map(str, walls['ours']))} | "
          f"{median['ours']:.2f} | | {peak['ours']} | {sample['sample_bytes'] / 1e6:.1f} MB sample (train_sample_mb "
          f"{sample['train_sample_mb']:g}, rate {sample['sample_rate']:.3g}) |")
    for method, label in (("theirs", "run_clm-style (BPE + `datasets.map` + `group_texts`)"),
                          ("practitioner", "practitioner's (ids only, numpy `group_texts`, `num_proc` = cores)")):
        if method not in methods:
            continue
        other = next(r for r in runs if r["method"] == method)
        print(f"| {label} | {', '.join(map(str, walls[method]))} | {median[method]:.2f} | {ratios[method]:.2f}x | "
              f"{peak[method]} | the train split, {other['bpe_train_texts_mb']} MB |")
    print("\n| target (issue 24) | measured | result |\n| --- | --- | --- |")
    print(f"| real English text >= 50 MB | {corpus['clean_mb']} MB clean | {'✓ pass' if corpus['clean_mb'] >= 50 else '✗ fail'} |")
    if "practitioner" in ratios:
        ratio = ratios["practitioner"]
        print(f"| ours >= 1.2x the practitioner's prep (its wall / ours, medians) | {ratio:.2f}x | "
              f"{'✓ pass' if ratio >= 1.2 else '✗ fail'} |")
    if args.json:
        args.json.write_text(json.dumps({"corpus": corpus, "runs": runs, "ratios": ratios}, indent=1))


if __name__ == "__main__":
    main()
