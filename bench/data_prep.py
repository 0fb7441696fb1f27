"""Benchmark of the data stages (not a test): MB/s, tokens/s and peak RSS of

  (a) lmforge's tokenize stage work (read clean Parquet, encode, pack, write shards + manifest),
  (b) a faithful run_clm-style baseline: `datasets` map with the batched fast tokenizer,
      then group_texts into blocks of seq_len+1 (as transformers' examples/run_clm.py does),
  (c) the bare ceiling: `Tokenizer.encode_batch_fast` over the same texts, nothing else,
  (d) lmforge's clean stage work (read raw Parquet, filters, dedup, write),

same tokenizer and seq_len. Each measurement runs in a fresh subprocess (so peak RSS is its
own) that runs the method once to warm up and once timed; the methods are interleaved round
by round and the median of the rounds is reported.

    python bench/data_prep.py                       # the built-in corpus
    python bench/data_prep.py --files 'big/*.txt'   # any glob of real files (tens of MB)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lmforge.core.params import CleanParams, DataParams, TokenizerParams, load_params  # noqa: E402

METHODS = ("stage", "run_clm", "ceiling", "clean")


def _peak_rss_mb() -> float:
    """This process's own high-water RSS (ru_maxrss would include the parent's, inherited at exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _texts(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=["text"]).column("text").to_pylist()


def worker(method: str, work: Path, params: TokenizerParams) -> dict:
    """One timed measurement of one method, in this (fresh) process."""
    clean_path, tokenizer_path = work / "clean.parquet", work / "tokenizer.json"
    if method == "stage":
        from lmforge.data.sequential import encode_to_shards
        from lmforge.data.tokens.tokenizer import load_tokenizer
        from lmforge.core.digests import file_sha256

        tokenizer = load_tokenizer(tokenizer_path)
        out = Path(tempfile.mkdtemp(dir=work))
        start = time.perf_counter()
        stats = encode_to_shards(clean_path, tokenizer, file_sha256(tokenizer_path), params, 0.05, out)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "bytes": stats["bytes_in"],
                "tokens": stats["train.tokens_encoded"] + stats["val.tokens_encoded"], "rss_mb": _peak_rss_mb()}
    if method == "clean":
        out = Path(tempfile.mkdtemp(dir=work))
        start = time.perf_counter()
        stats = _clean(work / "raw", out)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "bytes": stats["bytes_in"], "tokens": 0, "rss_mb": _peak_rss_mb()}

    texts = _texts(clean_path)
    size = sum(len(t.encode("utf-8")) for t in texts)
    if method == "ceiling":
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_path))
        start = time.perf_counter()
        tokens = 0
        for i in range(0, len(texts), params.encode_batch_size):
            tokens += sum(len(e) for e in tokenizer.encode_batch_fast(texts[i : i + params.encode_batch_size], add_special_tokens=False))
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "bytes": size, "tokens": tokens, "rss_mb": _peak_rss_mb()}
    if method == "run_clm":
        import datasets
        from transformers import PreTrainedTokenizerFast

        datasets.disable_progress_bars()
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_path), eos_token=params.eos_token)
        block_size = params.seq_len + 1

        def tokenize_function(examples):
            # run_clm appends nothing itself; we add EOS like our packer, for the same token count.
            return tokenizer([t + params.eos_token for t in examples["text"]])

        def group_texts(examples):  # verbatim logic of run_clm.py's group_texts
            concatenated = {k: sum(examples[k], []) for k in examples.keys()}
            total_length = len(concatenated[list(examples.keys())[0]])
            total_length = (total_length // block_size) * block_size
            return {k: [t[i : i + block_size] for i in range(0, total_length, block_size)] for k, t in concatenated.items()}

        start = time.perf_counter()
        raw = datasets.Dataset.from_dict({"text": texts})
        tokenized = raw.map(tokenize_function, batched=True, remove_columns=["text"])
        tokens = sum(len(ids) for ids in tokenized["input_ids"])
        grouped = tokenized.map(group_texts, batched=True)
        grouped.with_format("numpy")
        seconds = time.perf_counter() - start
        assert len(grouped) > 0
        return {"seconds": seconds, "bytes": size, "tokens": tokens, "rss_mb": _peak_rss_mb()}
    raise ValueError(method)


def _clean(raw: Path, out: Path) -> dict:
    """The clean stage's tasks (filter, dedup per band, write), run one after another here."""
    from lmforge.data.clean_job import CleanJob
    from lmforge.data.job import Engine, run_data_job

    return run_data_job(CleanJob(CleanParams(), raw, out / "clean", out / "staging"), Engine())


def prepare(work: Path, files: str | None, repeat: int, tok_params: TokenizerParams) -> dict:
    """Raw and clean Parquet of the corpus (repeated `repeat` times) and a trained tokenizer."""
    from lmforge.data.documents import make_document
    from lmforge.data.documents import DocumentWriter
    from lmforge.data.partitions import iter_dataset_batches, part_name, write_parts_manifest
    from lmforge.data.sequential import iter_documents
    from lmforge.data.tokens.tokenizer import save_tokenizer, train_tokenizer

    data = DataParams(source="files", files=[files]) if files else DataParams()
    docs = list(iter_documents(data, Counter()))
    with DocumentWriter(work / "raw" / part_name(0)) as writer:
        writer.write(docs)
    write_parts_manifest(work / "raw", [{"name": part_name(0), "documents": writer.documents, "bytes": writer.bytes}])
    _clean(work / "raw", work / "cleaned")
    kept = [d for batch in iter_dataset_batches(work / "cleaned" / "clean", 2000, "clean") for d in batch]
    with DocumentWriter(work / "clean.parquet") as writer:
        for copy in range(repeat):
            # Distinct ids per copy so the split does not put all copies of a document together.
            writer.write([dict(make_document(d["text"] + " " * copy, "bench")) for d in kept])
    save_tokenizer(train_tokenizer((d["text"] for d in kept), tok_params), work / "tokenizer.json")
    return {"documents": len(kept) * repeat, "mb": writer.bytes / 1e6}


def worker_warm(method: str, work: Path, params: TokenizerParams) -> dict:
    """Run once untimed (imports, thread pools, first-call set-up), then once timed:
    throughput in steady state, which is what a corpus of gigabytes sees."""
    worker(method, work, params)
    return worker(method, work, params)


def measure(method: str, work: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", method, "--work", str(work)],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", help="glob of real files (default: the built-in corpus)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=1, help="repeat the corpus this many times")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    tok_params = load_params(REPO / "params.yaml").tokenizer
    if args.worker:
        print(json.dumps(worker_warm(args.worker, args.work, tok_params)))
        return

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        corpora = {}
        for repeat in sorted({args.repeat, 4 * args.repeat}):
            corpora[repeat] = Path(tmp) / f"x{repeat}"
            corpora[repeat].mkdir()
            info = prepare(corpora[repeat], args.files, repeat, tok_params)
            print(f"corpus x{repeat}: {info['documents']} clean documents, {info['mb']:.2f} MB", flush=True)
        results: dict[str, list[dict]] = {m: [] for m in METHODS}
        for round_ in range(args.rounds):
            for method in METHODS:  # interleaved: machine noise hits every method alike
                results[method].append(measure(method, corpora[args.repeat]))
            print(f"round {round_ + 1}/{args.rounds} done", flush=True)
        big = measure("stage", corpora[4 * args.repeat])

    for method, runs in results.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        rows[method] = {
            "mb_per_s": runs[0]["bytes"] / 1e6 / seconds,
            "tokens_per_s": runs[0]["tokens"] / seconds,
            "seconds": seconds,
            "peak_rss_mb": max(r["rss_mb"] for r in runs),
        }
    rows["stage_x4_corpus"] = {"peak_rss_mb": big["rss_mb"], "mb_per_s": big["bytes"] / 1e6 / big["seconds"],
                               "tokens_per_s": big["tokens"] / big["seconds"], "seconds": big["seconds"]}
    ratios = {
        "stage / run_clm": rows["stage"]["mb_per_s"] / rows["run_clm"]["mb_per_s"],
        "stage / ceiling": rows["stage"]["mb_per_s"] / rows["ceiling"]["mb_per_s"],
        "clean / stage": rows["clean"]["mb_per_s"] / rows["stage"]["mb_per_s"],
        "stage peak RSS x4 / x1": rows["stage_x4_corpus"]["peak_rss_mb"] / rows["stage"]["peak_rss_mb"],
    }
    print("\n| method | MB/s | tokens/s | median s | peak RSS MB |\n| --- | ---: | ---: | ---: | ---: |")
    for method, row in rows.items():
        print(f"| {method} | {row['mb_per_s']:.2f} | {row['tokens_per_s']:,.0f} | {row['seconds']:.3f} | {row['peak_rss_mb']:.0f} |")
    print("\n| ratio | value | target |\n| --- | ---: | ---: |")
    targets = {"stage / run_clm": ">= 1.35", "stage / ceiling": ">= 0.90", "clean / stage": ">= 2.0", "stage peak RSS x4 / x1": "flat (~1.0)"}
    for name, value in ratios.items():
        print(f"| {name} | {value:.2f} | {targets[name]} |")
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "data_prep.json").write_text(json.dumps({"rows": rows, "ratios": ratios, "args": vars(args) | {"work": None}}, indent=2, default=str))


if __name__ == "__main__":
    main()
