"""Deduplication for the clean stage: exact (hash of a canonical form of the text) and
near-duplicate (MinHash LSH over word shingles, via rensa's Rust MinHash).

Both keep the first document seen and drop later ones. Their indexes hold a few hundred
bytes per kept document, never the texts, so memory stays far below the corpus size.
"""

from __future__ import annotations

import hashlib
import re

from rensa import RMinHash, RMinHashLSH

_NON_WORD = re.compile(r"[\W_]+")


def canonical(text: str) -> str:
    """Case, punctuation and whitespace folded: what 'the same text' means for exact dedup."""
    return _NON_WORD.sub(" ", text.casefold()).strip()


class ExactDedup:
    name = "exact_dedup"

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def reject_reason(self, text: str) -> str | None:
        key = hashlib.blake2b(canonical(text).encode("utf-8", "surrogatepass"), digest_size=12).digest()
        if key in self._seen:
            return "exact_duplicate"
        self._seen.add(key)
        return None


def lsh_bands(threshold: float, num_perm: int) -> int:
    """Number of LSH bands whose S-curve midpoint (1/b)^(1/r) is closest to `threshold`."""
    candidates = [b for b in range(1, num_perm + 1) if num_perm % b == 0]
    return min(candidates, key=lambda b: abs((1 / b) ** (b / num_perm) - threshold))


def shingles(text: str, size: int) -> list[str]:
    """Word n-grams of the canonical text; short texts give one shingle (the whole text)."""
    words = canonical(text).split()
    if len(words) <= size:
        return [" ".join(words)]
    return [" ".join(words[i : i + size]) for i in range(len(words) - size + 1)]


class NearDedup:
    """Drops a document whose estimated Jaccard similarity to a kept one is >= threshold.

    LSH candidates are verified against the stored signature, so band collisions below
    the threshold do not cost a document.
    """

    name = "near_dedup"

    def __init__(self, threshold: float, num_perm: int, shingle_size: int, seed: int) -> None:
        self.threshold = threshold
        self.num_perm = num_perm
        self.shingle_size = shingle_size
        self.seed = seed
        self._lsh = RMinHashLSH(threshold=threshold, num_perm=num_perm, num_bands=lsh_bands(threshold, num_perm))
        self._kept: list[RMinHash] = []

    def signature(self, text: str) -> RMinHash:
        minhash = RMinHash(num_perm=self.num_perm, seed=self.seed)
        minhash.update(shingles(text, self.shingle_size))
        return minhash

    def reject_reason(self, text: str) -> str | None:
        minhash = self.signature(text)
        for key in self._lsh.query(minhash):
            if minhash.jaccard(self._kept[key]) >= self.threshold:
                return "near_duplicate"
        self._lsh.insert(len(self._kept), minhash)
        self._kept.append(minhash)
        return None
