"""Training data and batches: what the trainer trains on (PackedRows, Examples), the row stream (RowSampler), packed-row collation (with or without document
segments) and the prefetcher that builds the next step's micro-batches while this step computes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from lmforge.core.errors import LmforgeError

Batch = dict[str, torch.Tensor]
Collate = Callable[[list[Any]], Batch]


class RowDataset(Protocol):
    """Rows of packed token ids: `__getitem__(i)` is an int array of length seq_len + 1."""

    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> Any: ...


class RowSampler:
    """A global stream of row indices: epoch e is a permutation seeded by (seed, e), epochs back to back.

    Position p (rows consumed so far, over all ranks) is the whole data state: epoch = p // n,
    index = p % n. Each optimizer step takes the next `global batch` rows and deals them to ranks
    in disjoint micro-batches, so N ranks see every row exactly once per epoch.
    """

    def __init__(self, n_rows: int, seed: int) -> None:
        self.n_rows, self.seed = n_rows, seed
        self._cached: tuple[int, np.ndarray] = (-1, np.empty(0, dtype=np.int64))

    def _permutation(self, epoch: int) -> np.ndarray:
        # (epoch, permutation) is read and replaced as one tuple: the prefetch thread and an in-line
        # build may read the sampler at once, and numpy's shuffle releases the GIL, so recording the
        # new epoch before its permutation existed handed the other thread the old epoch's rows.
        cached_epoch, permutation = self._cached
        if cached_epoch != epoch:
            permutation = np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)
            self._cached = (epoch, permutation)
        return permutation

    def rows(self, start: int, count: int) -> list[int]:
        """Row ids at stream positions start .. start + count - 1."""
        out = []
        for p in range(start, start + count):
            epoch, index = divmod(p, self.n_rows)
            out.append(int(self._permutation(epoch)[index]))
        return out


def _stack(rows: list[Any]) -> np.ndarray:
    return np.stack([np.asarray(r, dtype=np.int64) for r in rows])


def lm_collate(rows: list[Any]) -> Batch:
    """Packed rows -> next-token inputs and targets."""
    x = torch.from_numpy(_stack(rows))
    return {"inputs": x[:, :-1], "targets": x[:, 1:]}


def document_segments(inputs: np.ndarray, eos_id: int) -> np.ndarray:
    """(B, T) ids -> (B, T) document index per token. A document ends with its EOS, so a token's
    document is the number of EOS strictly before it in the row."""
    eos = (inputs == eos_id).astype(np.int64)
    return np.cumsum(eos, axis=1) - eos


class DocumentCollate:
    """Packed rows -> inputs, targets and `segments` (lmforge.model.decoder masks attention by them)."""

    def __init__(self, eos_id: int) -> None:
        self.eos_id = eos_id

    def __call__(self, rows: list[Any]) -> Batch:
        x = _stack(rows)
        segments = document_segments(x[:, :-1], self.eos_id)
        t = torch.from_numpy(x)
        return {"inputs": t[:, :-1], "targets": t[:, 1:], "segments": torch.from_numpy(segments)}


@dataclass(frozen=True)
class PackedRows:
    """Pretraining data: rows of seq_len + 1 token ids, documents packed end to end."""

    train: RowDataset
    val: RowDataset | None = None
    collate: Collate = lm_collate


@dataclass(frozen=True)
class Examples:
    """Fine-tuning data: examples of any form that `collate` batches, at most `max_tokens` tokens
    each (it sizes the loss-scaling hint, the token budget and the FLOPs estimate)."""

    train: Sequence[Any]
    val: Sequence[Any] | None
    collate: Collate
    max_tokens: int


def check_step_fits(n_rows: int, cfg: Any, world_size: int) -> None:
    """One optimizer step takes micro_batch_size x grad_accum_steps rows on each of `world_size` processes."""
    rows_per_step = cfg.micro_batch_size * cfg.grad_accum_steps * world_size
    if n_rows < rows_per_step:
        raise LmforgeError(
            f"the training data has {n_rows} rows but one optimizer step needs "
            f"{rows_per_step} (micro_batch_size {cfg.micro_batch_size} x grad_accum_steps "
            f"{cfg.grad_accum_steps} x {world_size} processes): lower those, use fewer "
            "processes (nproc), or add data"
        )


def tokens_per_row(data: PackedRows | Examples, model: Any) -> int:
    """The tokens one training row holds (seq_len for packed rows, max_tokens for examples), after
    checking the rows fit `model` (its max_seq_len and vocabulary, when it has a config)."""
    if len(data.train) == 0:
        raise LmforgeError("the training data has no rows: check the tokenize stage's output")
    if isinstance(data, Examples):  # examples of any form; the caller checked them
        if data.max_tokens < 1:
            raise LmforgeError(f"max_tokens per example must be >= 1 (got {data.max_tokens})")
        return int(data.max_tokens)
    first = np.asarray(data.train[0])
    if first.ndim != 1 or first.shape[0] < 2:
        raise LmforgeError(f"a training row must be a 1-D array of seq_len + 1 ids (got shape {first.shape})")
    seq_len = first.shape[0] - 1
    model_cfg = getattr(model, "config", None)
    if model_cfg is not None:
        if seq_len > model_cfg.max_seq_len:
            raise LmforgeError(
                f"rows hold {seq_len} inputs but the model's max_seq_len is {model_cfg.max_seq_len}: "
                "raise model max_seq_len or re-tokenize with a shorter seq_len"
            )
        vocab = getattr(data.train, "vocab_size", None)
        if vocab is not None:
            model_cfg.check_vocab(int(vocab))
        if int(first.max()) >= model_cfg.vocab_size:
            raise LmforgeError(
                f"row 0 holds token id {int(first.max())} but the model embeds only {model_cfg.vocab_size}: "
                "the data was tokenized with another tokenizer than the model's; rerun `dvc repro`"
            )
    return seq_len


class Prefetcher:
    """Builds the micro-batches of the step at stream position p + 1 in a background thread while
    step p computes. `build(position)` must be a pure function of the position, so the batches (and
    a resumed run's) are exactly those of building them in line. `pin`: page-locked host memory, so
    the copy to a CUDA device can be non_blocking."""

    def __init__(self, build: Callable[[int], list[Batch]], pin: bool) -> None:
        self._build, self._pin = build, pin
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmforge-prefetch")
        self._pending: tuple[int, Future[list[Batch]]] | None = None

    def _host_batches(self, position: int) -> list[Batch]:
        batches = self._build(position)
        if self._pin:
            batches = [{k: v.pin_memory() for k, v in b.items()} for b in batches]
        return batches

    def get(self, position: int, next_position: int | None) -> list[Batch]:
        """The batches at `position` (prefetched when they were the last call's `next_position`),
        and starts building those at `next_position` (None: there is no next step)."""
        batches = None
        if self._pending is not None:
            pending_position, future = self._pending
            self._pending = None
            ready = future.result()  # also when unused: the builder is not run twice at once
            batches = ready if pending_position == position else None
        if batches is None:
            batches = self._host_batches(position)
        if next_position is not None:
            self._pending = (next_position, self._pool.submit(self._host_batches, next_position))
        return batches

    def close(self) -> None:
        self._pending = None
        self._pool.shutdown(wait=True, cancel_futures=True)
