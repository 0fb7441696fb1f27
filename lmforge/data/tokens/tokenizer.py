"""The byte-level BPE tokenizer: trained with Hugging Face `tokenizers` on the train split,
saved as one `tokenizer.json` (which also loads as `transformers.PreTrainedTokenizerFast`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmforge.core.io import atomic_path
from lmforge.core.errors import LmforgeError
from lmforge.core.params import TokenizerParams


def train_tokenizer(texts: Iterable[str], params: TokenizerParams, length: int | None = None) -> Tokenizer:
    """A byte-level BPE: every byte is in the base alphabet, so no text is ever <unk>.

    Deterministic: the same texts in the same order give a byte-identical tokenizer.json.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=params.vocab_size,
        min_frequency=params.min_frequency,
        special_tokens=list(params.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=length)
    if tokenizer.token_to_id(params.eos_token) is None:
        raise LmforgeError(f"tokenizer has no {params.eos_token!r} token; check tokenizer.special_tokens")
    return text_only(tokenizer)


def text_only(tokenizer: Tokenizer) -> Tokenizer:
    """`tokenizer`, set to encode special tokens written in a text as that text: a document that
    quotes "<|endoftext|>" gets the ids of its characters, never the EOS id. Text is text; only the
    packer (and fine-tuning's explicit EOS) put special ids in a sequence. tokenizer.json does not
    keep this setting, so it is set on every tokenizer this module loads and before every encoding."""
    tokenizer.encode_special_tokens = True
    return tokenizer


def encode_plain(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """The token ids of each text, special-token look-alikes included as plain text (see text_only);
    the one way the project encodes text."""
    encodings = text_only(tokenizer).encode_batch_fast(list(texts), add_special_tokens=False)
    return [encoding.ids for encoding in encodings]


@contextmanager
def tokenizer_threads(spread: bool) -> Iterator[None]:
    """Whether `tokenizers` spreads an encode or a training over all the machine's cores inside this
    block (`spread`) or keeps to the calling thread.

    A Dask worker is one core's share of its machine: when every worker has a partition to encode,
    a tokenizer that also used every core would oversubscribe them (and 1 worker would quietly use
    all cores); when there are fewer tasks than workers, the idle cores are the tokenizer's.
    tokenizers reads TOKENIZERS_PARALLELISM at every call, so the switch holds per task. A worker
    with several threads shares one environment between its tasks: the last switch wins, which
    changes only the speed, never the tokens.
    """
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if spread else "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def save_tokenizer(tokenizer: Tokenizer, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tokenizer.save(str(tmp))


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"{path} not found: run `dvc repro tokenize` first")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
        raise LmforgeError(f"{path} is not a valid tokenizer.json ({exc}); rerun `dvc repro -f tokenize`") from None
    return text_only(tokenizer)
