"""Deduplication for the clean stage: exact (hash of a canonical form of the text) and
near-duplicate (MinHash LSH over word shingles, via rensa's Rust MinHash).

Both keep the first document seen and drop later ones, in document order, also within a
batch. Their indexes hold a few hundred bytes per kept document, never the texts, so
memory stays far below the corpus size.
"""

from __future__ import annotations

import bisect
import hashlib
import re

import numpy as np
from rensa import RMinHash, RMinHashLSH

from lmforge.data.text import ALNUM, char_classes

_NON_WORD = re.compile(r"[\W_]+")


def canonical(text: str) -> str:
    """Case, punctuation and whitespace folded: what 'the same text' means for exact dedup."""
    return _NON_WORD.sub(" ", text.casefold()).strip()


def shingles(text: str, size: int) -> list[str]:
    """Word n-grams of the canonical text; short texts give one shingle (the whole text)."""
    words = canonical(text).split()
    if len(words) <= size:
        return [" ".join(words)]
    return [" ".join(words[i : i + size]) for i in range(len(words) - size + 1)]


_M32 = np.uint64(0xFFFFFFFF)
_SEED1, _SEED2 = np.uint64(0x243F6A8885A308D3), np.uint64(0x13198A2E03707344)
_NO_ZERO_COLLAPSE, _K = np.uint64(0xA4093822299F31D0), np.uint64(0xF1357AEA2E62A9C5)


def _multiply_mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Low ^ high 64 bits of the 128-bit product x * y."""
    x0, x1, y0, y1 = x & _M32, x >> np.uint64(32), y & _M32, y >> np.uint64(32)
    p00, p01, p10, p11 = x0 * y0, x0 * y1, x1 * y0, x1 * y1
    mid = (p00 >> np.uint64(32)) + (p01 & _M32) + (p10 & _M32)
    high = p11 + (p01 >> np.uint64(32)) + (p10 >> np.uint64(32)) + (mid >> np.uint64(32))
    return (x * y) ^ high


def token_hashes(data: bytes, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """rensa's hash of each token data[starts[i]:ends[i]] (its `calculate_hash_fast`, the
    hash `RMinHash.update` applies to a str/bytes token), for all tokens at once."""
    buffer = np.frombuffer(data + bytes(16), dtype=np.uint8)
    windows = np.lib.stride_tricks.sliding_window_view(buffer, 8)

    def read(offsets: np.ndarray, width: int = 8) -> np.ndarray:
        words = windows[offsets].copy().view("<u8").ravel()
        return words if width == 8 else words & _M32

    starts, ends = starts.astype(np.int64), ends.astype(np.int64)
    length = ends - starts
    s0 = np.full(len(starts), _SEED1)
    s1 = np.full(len(starts), _SEED2)
    with np.errstate(over="ignore"):
        tiny = np.flatnonzero((length > 0) & (length < 4))
        if len(tiny):
            first, middle, last = (buffer[starts[tiny] + k].astype(np.uint64) for k in (0, length[tiny] // 2, length[tiny] - 1))
            s0[tiny] ^= first
            s1[tiny] ^= (last << np.uint64(8)) | middle
        for low, high, width in ((4, 8, 4), (8, 17, 8)):
            some = np.flatnonzero((length >= low) & (length < high))
            if len(some):
                s0[some] ^= read(starts[some], width)
                s1[some] ^= read(ends[some] - width, width)
        long = np.flatnonzero(length > 16)
        offset = np.zeros(len(long), dtype=np.int64)
        while len(long):
            more = offset < length[long] - 16
            if not more.any():
                break
            rows, at = long[more], starts[long[more]] + offset[more]
            mixed = _multiply_mix(s0[rows] ^ read(at), _NO_ZERO_COLLAPSE ^ read(at + 8))
            s0[rows] = s1[rows]
            s1[rows] = mixed
            offset[more] += 16
        long = np.flatnonzero(length > 16)
        if len(long):
            s0[long] ^= read(ends[long] - 16)
            s1[long] ^= read(ends[long] - 8)
        hashed = (_multiply_mix(s0, s1) ^ length.astype(np.uint64)) * _K
    return (hashed << np.uint64(26)) | (hashed >> np.uint64(38))


class CanonicalTexts:
    """`canonical` of many texts at once: casefolded in Python, then the runs of `[^\\W_]`
    (the canonical words) found in numpy and joined with single spaces."""

    def __init__(self, texts: list[str]) -> None:
        folded = [text.casefold() for text in texts]
        cps = np.frombuffer("".join(folded).encode("utf-32-le"), dtype=np.uint32)
        offsets = np.zeros(len(texts) + 1, dtype=np.int64)
        np.cumsum([len(text) for text in folded], out=offsets[1:])
        alnum = (char_classes()[cps] & ALNUM).astype(bool)
        boundary = np.zeros(len(cps) + 1, dtype=bool)
        boundary[offsets] = True
        before = np.ones(len(cps), dtype=bool)
        before[1:] = ~alnum[:-1]
        after = np.ones(len(cps), dtype=bool)
        after[:-1] = ~alnum[1:]
        starts = np.flatnonzero(alnum & (before | boundary[:-1]))
        ends = np.flatnonzero(alnum & (after | boundary[1:])) + 1
        word_offsets = np.searchsorted(starts, offsets)
        # One separator after every word but the last of its document: the (non-word)
        # character right after it, rewritten to " ".
        last = np.zeros(len(starts), dtype=bool)
        last[word_offsets[1:][word_offsets[1:] > word_offsets[:-1]] - 1] = True
        separators = ends[~last]
        keep = alnum.copy()
        keep[separators] = True
        canon = cps.copy()
        canon[separators] = 0x20
        kept = np.flatnonzero(keep)
        self.text = canon[kept].tobytes().decode("utf-32-le")
        # New positions: how many kept characters come before.
        self.offsets = np.searchsorted(kept, offsets)
        self.word_starts = np.searchsorted(kept, starts)
        self.word_ends = np.searchsorted(kept, ends)
        self.word_offsets = word_offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> str:
        return self.text[self.offsets[index] : self.offsets[index + 1]]

    def shingle_hashes(self, size: int, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """rensa token hashes of the `shingles` of each of `docs`, flat, with row offsets."""
        data = self.text.encode("utf-8", "surrogatepass")
        cps = np.frombuffer(self.text.encode("utf-32-le"), dtype=np.uint32)
        wide = [np.flatnonzero(cps >= bound) for bound in (0x80, 0x800, 0x10000)]

        def byte_positions(positions: np.ndarray) -> np.ndarray:
            return positions + sum(np.searchsorted(w, positions) for w in wide if len(w))
        counts = np.diff(self.word_offsets)[docs]
        long = counts > size
        n_grams = np.where(long, counts - size + 1, 1)
        rows = np.zeros(len(docs) + 1, dtype=np.int64)
        np.cumsum(n_grams, out=rows[1:])
        # Word index of each shingle's first word; short documents: the whole canonical text.
        first = np.repeat(self.word_offsets[docs] - rows[:-1], n_grams) + np.arange(rows[-1])
        is_long = np.repeat(long, n_grams)
        doc_of = np.repeat(docs, n_grams)
        starts = np.where(is_long, self.word_starts[np.where(is_long, first, 0)] if len(self.word_starts) else 0,
                          self.offsets[doc_of])
        ends = np.where(is_long, self.word_ends[np.where(is_long, first + size - 1, 0)] if len(self.word_ends) else 0,
                        self.offsets[doc_of + 1])
        return token_hashes(data, byte_positions(starts), byte_positions(ends)), rows

    def shingle_sets(self, size: int, docs: np.ndarray) -> list[list[str]]:
        """`shingles` of each of `docs`: substrings from a word's start to the end of the
        word size - 1 later (canonical words are separated by exactly one space)."""
        counts = np.diff(self.word_offsets)[docs]
        long = counts > size
        firsts = self.word_offsets[docs][long]
        n_grams = counts[long] - size + 1
        index = np.repeat(firsts - np.cumsum(np.r_[0, n_grams[:-1]]), n_grams) + np.arange(n_grams.sum())
        text = self.text
        grams = [text[a:b] for a, b in zip(self.word_starts[index].tolist(), self.word_ends[index + size - 1].tolist())]
        sets: list[list[str]] = []
        taken = 0
        for doc, is_long, count in zip(docs.tolist(), long.tolist(), counts.tolist()):
            if is_long:
                sets.append(grams[taken : taken + count - size + 1])
                taken += count - size + 1
            else:
                sets.append([self[doc]])
        return sets


class ExactDedup:
    """Drops a document whose canonical text was already kept (blake2b-96 of it)."""

    name = "exact_dedup"
    reasons = ("exact_duplicate",)

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def reject_codes(self, texts: CanonicalTexts, alive: np.ndarray) -> np.ndarray:
        codes = np.zeros(len(texts), dtype=np.int16)
        seen = self._seen
        for doc in np.flatnonzero(alive).tolist():
            key = hashlib.blake2b(texts[doc].encode("utf-8", "surrogatepass"), digest_size=12).digest()
            if key in seen:
                codes[doc] = 1
            else:
                seen.add(key)
        return codes

    def reject_reason(self, text: str) -> str | None:
        return self.reasons[0] if self.reject_codes(CanonicalTexts([text]), np.ones(1, dtype=bool))[0] else None


def lsh_bands(threshold: float, num_perm: int) -> int:
    """Number of LSH bands whose S-curve midpoint (1/b)^(1/r) is closest to `threshold`."""
    candidates = [b for b in range(1, num_perm + 1) if num_perm % b == 0]
    return min(candidates, key=lambda b: abs((1 / b) ** (b / num_perm) - threshold))


class NearDedup:
    """Drops a document whose estimated Jaccard similarity to a kept one is >= threshold.

    LSH candidates are verified against the stored signature, so band collisions below
    the threshold do not cost a document. Signatures of a batch are computed in one rensa
    call; queries and inserts stay in document order, so the first of a group is kept.
    """

    name = "near_dedup"
    reasons = ("near_duplicate",)

    def __init__(self, threshold: float, num_perm: int, shingle_size: int, seed: int) -> None:
        self.threshold = threshold
        self.num_perm = num_perm
        self.shingle_size = shingle_size
        self.seed = seed
        self._lsh = RMinHashLSH(threshold=threshold, num_perm=num_perm, num_bands=lsh_bands(threshold, num_perm))
        # Kept signatures: blocks of consecutive keys (a batch's rensa matrix, or rows).
        self._first_keys: list[int] = []
        self._blocks: list = []
        self._next_key = 0

    def signature(self, text: str) -> RMinHash:
        minhash = RMinHash(num_perm=self.num_perm, seed=self.seed)
        minhash.update(shingles(text, self.shingle_size))
        return minhash

    def _digests(self, key: int) -> np.ndarray:
        """Signature of the kept document `key` (rows of a batch matrix, unpacked on first use)."""
        index = bisect.bisect_right(self._first_keys, key) - 1
        block = self._blocks[index]
        if not isinstance(block, np.ndarray):
            block = self._blocks[index] = np.array(block.to_rows(), dtype=np.uint32).reshape(-1, self.num_perm)
        return block[key - self._first_keys[index]]

    def _keep(self, digests, count: int) -> None:
        self._first_keys.append(self._next_key)
        self._blocks.append(digests)
        self._next_key += count

    def reject_codes(self, texts: CanonicalTexts, alive: np.ndarray) -> np.ndarray:
        """Signatures of the batch in one rensa call; rows that share no LSH band with a kept
        document nor with another row of the batch are kept at once (nothing could make them
        duplicates); the others are decided one by one, in order, as `reject_reason` would."""
        codes = np.zeros(len(texts), dtype=np.int16)
        docs = np.flatnonzero(alive)
        if len(docs) == 0:
            return codes
        hashes, rows = texts.shingle_hashes(self.shingle_size, docs)
        matrix = RMinHash.digest_matrix_from_flat_token_hashes(hashes, rows.astype(np.uint64), self.num_perm, self.seed)
        flagged = np.asarray(self._lsh.query_duplicate_flags_matrix_one_shot(matrix), dtype=bool)
        if flagged.any():
            rows_flagged = np.flatnonzero(flagged)
            token_sets = texts.shingle_sets(self.shingle_size, docs[rows_flagged])
            for row, tokens in zip(rows_flagged.tolist(), token_sets):
                minhash = RMinHash(num_perm=self.num_perm, seed=self.seed)
                minhash.update(tokens)
                digest = np.array(minhash.digest(), dtype=np.uint32)
                if any(
                    np.count_nonzero(self._digests(key) == digest) / self.num_perm >= self.threshold
                    for key in self._lsh.query(minhash)
                ):
                    codes[docs[row]] = 1
                    continue
                self._lsh.insert(self._next_key, minhash)
                self._keep(digest[None, :], 1)
            clear = np.flatnonzero(~flagged)
            if len(clear) == 0:
                return codes
            hashes = np.concatenate([hashes[rows[row] : rows[row + 1]] for row in clear.tolist()])
            clear_rows = np.zeros(len(clear) + 1, dtype=np.uint64)
            np.cumsum(rows[clear + 1] - rows[clear], out=clear_rows[1:])
            matrix = RMinHash.digest_matrix_from_flat_token_hashes(hashes, clear_rows, self.num_perm, self.seed)
        self._lsh.insert_matrix(matrix, start_key=self._next_key)
        self._keep(matrix, matrix.len())
        return codes

    def reject_reason(self, text: str) -> str | None:
        return self.reasons[0] if self.reject_codes(CanonicalTexts([text]), np.ones(1, dtype=bool))[0] else None
