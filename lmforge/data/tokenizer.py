"""The byte-level BPE tokenizer: trained with Hugging Face `tokenizers` on the train split,
saved as one `tokenizer.json` (which also loads as `transformers.PreTrainedTokenizerFast`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmforge.data.io import atomic_path
from lmforge.errors import LmforgeError
from lmforge.params import TokenizerParams


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
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tokenizer.save(str(tmp))


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"{path} not found: run `dvc repro tokenize` first")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
        raise LmforgeError(f"{path} is not a valid tokenizer.json ({exc}); rerun `dvc repro -f tokenize`") from None


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()
