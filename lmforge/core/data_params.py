"""The data stages' params sections (ingest, clean, tokenize, finetune_data) and the Dask engine's.

Every field's `description` is the one text about it: docs/reference/params.md is generated from it
(`python -m lmforge.core.params_reference`).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from lmforge.core.section import Section

# Longest context a row may hold: far beyond any preset, and still an int32 index everywhere.
MAX_SEQ_LEN = 2**20
# A named source's name: it becomes part of shard file names, metric keys and a Parquet column value.
SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
# data.files' default: with data.source `sources`, data.files is this or [] (else: a pool of files left over).
DEFAULT_FILES = ["data/corpus/**/*.txt"]


class HfSourceParams(Section):
    """`data.hf`: a Hugging Face Hub dataset, streamed (never used by the tests or the default run)."""

    name: str = Field("Salesforce/wikitext", description="Hub dataset id (`owner/name`)")
    config: str | None = Field("wikitext-103-raw-v1", description="the dataset's configuration; null: its default")
    split: str = Field("train", description="split streamed from the Hub")
    revision: str | None = Field(None, description="git revision (branch, tag, commit) of the dataset; null: main")
    max_documents: int | None = Field(None, gt=0, description="stop after this many documents; null: the whole split")


class SourceParams(Section):
    """One entry of `data.sources`: a named pool of files (its weight is `mix.weights.<name>`, a
    param of tokenize alone, so a new weight does not read the corpus again)."""

    name: str = Field(description="the source's name: the documents' `source` column, its val shards, its metrics "
                                  "(letters, digits, `_` and `-`)")
    files: list[str] = Field(description="globs of its files, local paths or fsspec URLs (.txt .jsonl .parquet .csv)")
    text_field: str = Field("text", description="column or field holding the text in its .jsonl/.parquet/.csv files")
    txt_separator: str | None = Field(
        None, description="null: one document per .txt file; otherwise the string between documents")

    @model_validator(mode="before")
    @classmethod
    def _weight_lives_in_mix(cls, raw: object) -> object:
        if isinstance(raw, dict) and "weight" in raw:
            raise ValueError(f"a source's weight goes in mix.weights ({raw.get('name')}: {raw['weight']}), not in "
                             "data.sources: there it is a param of tokenize alone, so a new weight does not read the "
                             "corpus again")
        return raw

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not SOURCE_NAME.fullmatch(value):
            raise ValueError(f"source name {value!r}: use 1-64 letters, digits, `_` or `-`, starting with a letter "
                             "or digit (it names files and metrics)")
        return value

    @field_validator("files")
    @classmethod
    def _some_files(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("a source needs at least one glob in its files")
        return value


class DataParams(Section):
    """`data` (stage ingest -> data/raw/): where documents come from and how the train/val split is drawn."""

    source: Literal["builtin", "files", "hf", "sources"] = Field(
        "builtin", description="`builtin` (stdlib docstrings, offline) | `files` (data.files) | `hf` (data.hf) | "
                               "`sources` (the named sources of data.sources, mixed by mix.weights)")
    files: list[str] = Field(DEFAULT_FILES,
                             description="globs read when source is `files` (.txt .jsonl .parquet .csv)")
    sources: list[SourceParams] = Field(
        [], description="when source is `sources`: the named sources, read in this order (a document in two is kept "
                        "in the first); each {name, files, text_field, txt_separator}")
    text_field: str = Field("text", description="column or field holding the text in .jsonl/.parquet/.csv and hf rows")
    txt_separator: str | None = Field(
        None, description="null: one document per .txt file; otherwise the string between documents (e.g. a blank line)")
    hf: HfSourceParams = Field(HfSourceParams(), description="the Hub dataset read when source is `hf`")
    val_fraction: float = Field(0.05, gt=0.0, lt=1.0,
                                description="share of documents held out for validation, chosen by a hash of each id")
    batch_size: int = Field(2000, gt=0, description="documents per write batch")
    partition_mb: float = Field(64.0, gt=0, description="target partition size in MB: the unit of parallel work of "
                                                        "ingest, clean and tokenize")

    @model_validator(mode="after")
    def _files_need_globs(self) -> DataParams:
        if self.source == "files" and not self.files:
            raise ValueError("data.source is 'files' but data.files is empty: list at least one glob")
        return self

    @model_validator(mode="after")
    def _sources_fit_the_source(self) -> DataParams:
        if self.sources and self.source != "sources":
            raise ValueError(f"data.sources lists {len(self.sources)} sources but data.source is {self.source!r}: set "
                             "data.source: sources to read them (or empty data.sources)")
        if self.source != "sources":
            return self
        if not self.sources:
            raise ValueError("data.source is 'sources' but data.sources is empty: list at least one "
                             "{name, files} source")
        if self.files not in ([], DEFAULT_FILES):  # two lists of globs: which would the user have read?
            raise ValueError(f"data.files {self.files} is read only when data.source is 'files'; with data.source: "
                             "sources give each source its own files and set data.files to [] (or its default)")
        seen: set[str] = set()
        for index, source in enumerate(self.sources):
            if source.name in seen:
                raise ValueError(f"data.sources[{index}].name {source.name!r} is listed twice: give each source "
                                 "its own name")
            seen.add(source.name)
        return self

    @property
    def source_names(self) -> list[str]:
        """The documents' `source` values in the order they are read: the named sources, or the one pool."""
        return [source.name for source in self.sources] if self.source == "sources" else [self.source]


class EngineParams(Section):
    """`engine`: where the data stages run their partitions (Dask distributed). Run-time only."""

    address: str | None = Field(
        None, description="null: an embedded cluster on this machine, started only for more than one partition "
                    "and more than one worker, 3 for tokenize (else the stage's own process does the work); "
                    "`tcp://host:8786`: an existing Dask scheduler")
    workers: int | None = Field(None, gt=0, description="embedded cluster: worker processes, one thread each; "
                                                        "null: one per core")
    dashboard: bool = Field(False, description="serve Dask's dashboard and print its link")

    @field_validator("address")
    @classmethod
    def _scheduler_url(cls, value: str | None) -> str | None:
        if value is not None and "://" not in value:
            raise ValueError("give the scheduler's URL, e.g. tcp://10.0.0.5:8786 (or null for the embedded engine)")
        return value


class CleanParams(Section):
    """`clean` (stage clean -> data/clean/): each filter's threshold (Gopher-style quality rules, then dedup).

    Gopher's web values for the repetition rules are 0.3 / {2: .20, 3: .18, 4: .16} / {5: .15 ... 10: .10};
    docstrings with doctest examples repeat legitimately, so the defaults are looser."""

    min_chars: int = Field(16, ge=0, description="fewest characters a document may have")
    max_chars: int = Field(200_000, gt=0, description="most characters a document may have")
    min_words: int = Field(3, ge=0, description="fewest words")
    max_words: int = Field(50_000, gt=0, description="most words")
    min_mean_word_length: float = Field(2.0, ge=0, description="shortest mean word length, in characters")
    max_mean_word_length: float = Field(15.0, gt=0, description="longest mean word length, in characters")
    max_symbol_ratio: float = Field(0.35, ge=0, le=1, description="largest share of non-space characters that are "
                                                                  "neither letters nor digits")
    min_alpha_word_ratio: float = Field(0.5, ge=0, le=1, description="smallest share of words containing a letter")
    max_duplicate_line_char_fraction: float = Field(
        0.5, ge=0, le=1, description="largest share of characters in lines that occur more than once")
    max_top_ngram_char_fraction: dict[int, float] = Field(
        {2: 0.30, 3: 0.30, 4: 0.30},
        description="n -> largest share of characters covered by the most frequent word n-gram (n = 2..4)")
    max_duplicate_ngram_char_fraction: dict[int, float] = Field(
        {5: 0.50, 6: 0.45, 7: 0.40, 8: 0.35, 9: 0.30, 10: 0.30},
        description="n -> largest share of characters covered by word n-grams occurring more than once (n = 5..10)")
    exact_dedup: bool = Field(True, description="drop exact duplicates of case-, punctuation- and space-folded text")
    near_dedup: bool = Field(True, description="drop near duplicates (MinHash LSH over word shingles)")
    minhash_threshold: float = Field(0.8, gt=0, le=1, description="estimated Jaccard similarity above which two "
                                                                  "documents are near duplicates")
    minhash_num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (more: finer estimate, slower)")
    minhash_shingle_size: int = Field(5, ge=1, description="words per shingle")
    minhash_seed: int = Field(42, description="seed of the MinHash permutations")
    rejected_samples_per_reason: int = Field(5, ge=0, description="rejected documents kept per reason in "
                                                                  "rejected_samples.jsonl")
    batch_size: int = Field(2000, gt=0, description="documents per write batch")

    @field_validator("max_top_ngram_char_fraction", "max_duplicate_ngram_char_fraction")
    @classmethod
    def _fractions(cls, value: dict[int, float]) -> dict[int, float]:
        for n, fraction in value.items():
            if n < 1 or not 0 <= fraction <= 1:
                raise ValueError(f"entry {n}: {fraction} needs n >= 1 and a fraction in [0, 1]")
        return value


class TokenizerParams(Section):
    """`tokenizer` (stage tokenize -> data/tokenizer/, data/shards/): the byte-level BPE and how its ids are packed."""

    vocab_size: int = Field(4096, ge=300, le=2**32, description="BPE vocabulary size, special tokens included "
                                                                "(shard ids are uint32 at most)")
    seq_len: int = Field(256, ge=8, le=MAX_SEQ_LEN, description="tokens the model reads at once; each shard row "
                                                                "holds seq_len + 1 ids (inputs and shifted targets)")
    min_frequency: int = Field(2, ge=1, description="fewest occurrences a pair needs to be merged")
    eos_token: str = Field("<|endoftext|>", description="token appended after each document; one of special_tokens")
    special_tokens: list[str] = Field(["<|endoftext|>", "<|pad|>"], description="tokens the BPE never splits")
    encode_batch_size: int = Field(2048, gt=0, description="documents per call to the Rust batch encoder")
    shard_rows: int = Field(4096, gt=0, description="rows per Arrow shard")
    train_sample_mb: float = Field(100.0, gt=0, description="MB of train text the BPE learns from, chosen by a hash "
                                                            "of each document's id (a smaller corpus is used whole)")

    @model_validator(mode="after")
    def _eos_is_special(self) -> TokenizerParams:
        if self.eos_token not in self.special_tokens:
            raise ValueError(
                f"tokenizer.eos_token {self.eos_token!r} must be listed in tokenizer.special_tokens"
            )
        return self


class MixParams(Section):
    """`mix` (stage tokenize): the share of training tokens each of data.sources gets. A source with
    fewer tokens than its share is repeated (whole epochs, then a partial one chosen by document
    hash), one with more is subsampled the same way; the validation split is never mixed."""

    weights: dict[str, float] = Field(
        {}, description="source name -> weight, for every one of data.sources (normalised to sum 1: 7 and 3 is "
                        "70%/30%); empty: the single pool of data.source, weight 1")

    @field_validator("weights")
    @classmethod
    def _positive(cls, value: dict[str, float]) -> dict[str, float]:
        for name, weight in value.items():
            if not weight > 0:
                raise ValueError(f"weight of {name!r} is {weight}: a weight is a share of training tokens and must "
                                 "be positive (remove the source from data.sources to leave it out)")
        return value


class TasksParams(Section):
    """`tasks` (stage finetune_data -> data/finetune/*.jsonl): the built-in fine-tuning tasks."""

    classify_top_k: int = Field(8, ge=2, description="classes: a docstring's top-level stdlib package, the K most "
                                                     "frequent")
    classify_max_per_class: int = Field(300, gt=0, description="training rows per class at most (balance); the test "
                                                               "split keeps its distribution")
    sft_max_prompt_chars: int = Field(300, gt=0, description="SFT: longest prompt (a function signature), in characters")
    sft_max_response_chars: int = Field(200, gt=0, description="SFT: longest response (the docstring's first line), "
                                                               "in characters")
    seed: int = Field(0, description="seed of the tasks' sampling")
