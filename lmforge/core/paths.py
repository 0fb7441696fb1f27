"""Where each stage reads and writes, and the names it registers: the one place a path changes.

dvc.yaml restates these paths for DVC (it cannot import Python); tests/test_paths.py fails when the
two disagree. Paths are relative to the repository root, where every stage runs.
"""

import os
from pathlib import Path

CORPUS = Path("data/corpus")  # where data.source: files looks by default
# Partitioned datasets (lmforge.data.partitions): part-NNNNN.parquet files and manifest.json, written last.
RAW = Path("data/raw")
RAW_STATS = RAW / "stats.json"
CLEAN = Path("data/clean")
CLEAN_STATS = Path("data/clean/stats.json")
CLEAN_METRICS = Path("data/clean/metrics.json")  # the few figures of stats.json that DVC compares
REJECTED_SAMPLES = Path("data/clean/rejected_samples.jsonl")
TOKENIZER = Path("data/tokenizer/tokenizer.json")
TOKENIZER_STATS = Path("data/tokenizer/stats.json")
MIXTURE = Path("data/tokenizer/mixture.csv")  # the train split's realised mixture, one row per source
TOKENIZER_METRICS = Path("data/tokenizer/metrics.json")
SHARDS = Path("data/shards")
FINETUNE_DATA = Path("data/finetune")  # the built-in tasks: <task>_{train,test}.jsonl + stats.json

PRETRAINED = Path("models/pretrain")
PRETRAINED_HF = Path("models/pretrain_hf")
PRETRAINED_INT8 = Path("models/pretrain_int8")  # evaluate's int8 quantization of PRETRAINED
FINETUNED = Path("models/finetune")
# Training checkpoints: each machine's resume state, no DVC output. LMFORGE_CHECKPOINTS_DIR moves them (a
# run-time setting, never a param): a worker keeps them outside its clone (flows.remote.worker_locations).
CHECKPOINTS = Path(os.environ.get("LMFORGE_CHECKPOINTS_DIR") or "checkpoints")
PRETRAIN_CHECKPOINTS = CHECKPOINTS / "pretrain"
FINETUNE_CHECKPOINTS = CHECKPOINTS / "finetune"

PRETRAIN_REPORTS = Path("reports/pretrain")
FINETUNE_REPORTS = Path("reports/finetune")
REPORTS = Path("reports")
PROMOTION = REPORTS / "promotion.json"  # the promote stage's numbers (a DVC metric)
PROMOTION_DECISION = REPORTS / "promotion_decision.json"  # its words: metric, reason, hashes, lineage
HARNESS = REPORTS / "harness.json"  # lm-evaluation-harness scores per model and task (a DVC metric)
HARNESS_DATA = REPORTS / "harness"  # the shipped harness tasks' data, built from held-out documents
HARNESS_TASKS = Path("lmforge/evaluate/tasks")  # the shipped harness tasks' YAMLs (an evaluate dep)
FIGURES = REPORTS / "figures"  # task-dependent files: one DVC output whatever the task
PLOTS = REPORTS / "plots"  # `make plots`: dvc.yaml's plots as images (not a DVC output)

# The MLflow model registry.
PRETRAINED_MODEL = "lmforge-pretrain"
FINETUNED_MODEL = "lmforge-finetune"
CANDIDATE_ALIAS = "candidate"  # the version evaluate scored last
CHAMPION_ALIAS = "champion"  # the model in use: moved only by the promote stage, rollback and a person
CHALLENGER_ALIAS = "challenger"  # the last version that did not beat the champion
# Tag of each registered model version: the md5 of the model.safetensors it was logged from (how
# evaluate finds the version of the weights it scored, and promote the versions that share them).
WEIGHTS_TAG = "lmforge.weights_md5"
