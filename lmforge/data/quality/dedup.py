"""Deduplication for the clean stage, as pure functions over arrays: exact (a hash of a
canonical form of the text) and near-duplicate (MinHash over word shingles, via rensa's Rust
MinHash, grouped by LSH band), in the shape datatrove uses at scale.

Per partition: `exact_keys`, `signatures` and `band_keys` of each document. Per band (one
key column of the whole corpus): `band_buckets` groups the documents that share a key and
`verified_pairs` keeps the pairs whose estimated Jaccard similarity reaches the threshold.
Once: `near_duplicates` walks those pairs in global order. Documents are named by a global id
(`gid`: partition << 32 | row) whose order is the corpus order, so "first seen wins".
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
from rensa import RMinHash

from lmforge.data.quality.text import ALNUM, char_classes

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
    """The canonical form of many texts at once, what 'the same text' means for dedup: case,
    punctuation and whitespace folded (`re.sub(r"[\\W_]+", " ", text.casefold()).strip()`).
    Casefolded in Python, then the runs of `[^\\W_]` (the canonical words) found in numpy and
    joined with single spaces."""

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
        """rensa token hashes of the word shingles of each of `docs` (every run of `size` canonical
        words; a text of `size` words or fewer is one shingle, itself), flat, with row offsets."""
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


# --- Per partition: the keys of each document. ---

def exact_keys(texts: CanonicalTexts) -> tuple[np.ndarray, np.ndarray]:
    """blake2b-96 of each canonical text, as (high 64 bits, low 32 bits): equal keys = same text."""
    digests = b"".join(
        hashlib.blake2b(texts[doc].encode("utf-8", "surrogatepass"), digest_size=12).digest() for doc in range(len(texts))
    )
    raw = np.frombuffer(digests, dtype=np.uint8).reshape(-1, 12)
    return raw[:, :8].copy().view("<u8").ravel(), raw[:, 8:].copy().view("<u4").ravel()


def signatures(texts: CanonicalTexts, num_perm: int, shingle_size: int, seed: int) -> np.ndarray:
    """MinHash signature (num_perm uint32) of each text's word shingles, one rensa call for all:
    the digest `RMinHash(num_perm, seed).update(shingles)` gives for each document."""
    if len(texts) == 0:
        return np.zeros((0, num_perm), dtype=np.uint32)
    hashes, rows = texts.shingle_hashes(shingle_size, np.arange(len(texts)))
    matrix = RMinHash.digest_matrix_from_flat_token_hashes(hashes, rows.astype(np.uint64), num_perm, seed)
    return np.array(matrix.to_rows(), dtype=np.uint32).reshape(-1, num_perm)


# The band layout is chosen so that a pair this far from the threshold towards identity
# (halfway: Jaccard 0.9 for threshold 0.8) shares a band with at least this probability.
RECALL_POINT = 0.5
RECALL_TARGET = 0.99


def candidate_probability(jaccard: float, bands: int, rows: int) -> float:
    """P(two documents of this Jaccard similarity share at least one of `bands` bands of `rows`)."""
    return 1.0 - (1.0 - jaccard**rows) ** bands


def lsh_bands(threshold: float, num_perm: int) -> int:
    """Bands of the LSH (a divisor of num_perm; rows = num_perm / bands): the fewest (fewest
    false candidates to verify) that find a pair at Jaccard threshold + RECALL_POINT * (1 -
    threshold) with probability >= RECALL_TARGET; all num_perm bands if none does."""
    target = threshold + RECALL_POINT * (1.0 - threshold)
    divisors = [b for b in range(1, num_perm + 1) if num_perm % b == 0]
    return next((b for b in divisors if candidate_probability(target, b, num_perm // b) >= RECALL_TARGET), num_perm)


_BAND_SEED, _BAND_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9)


def band_keys(sigs: np.ndarray, bands: int) -> np.ndarray:
    """(documents, bands) uint64: a hash of each band's rows. Two documents share a key when
    the band's rows are equal (or, once in 2^64, by chance: then verification drops the pair)."""
    n, num_perm = sigs.shape
    rows = sigs.reshape(n, bands, num_perm // bands).astype(np.uint64)
    keys = np.full((n, bands), _BAND_SEED, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for column in range(rows.shape[2]):
            keys = (keys ^ rows[:, :, column]) * _BAND_MULTIPLIER
            keys ^= keys >> np.uint64(31)
    return keys


# --- Per band (or the exact key): documents that share a key, in global order. ---

def _runs(sorted_keys: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Starts and ends of the runs of equal rows in lexicographically sorted key columns."""
    n = len(sorted_keys[0])
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    new = np.zeros(n, dtype=bool)
    new[0] = True
    for column in sorted_keys:
        new[1:] |= column[1:] != column[:-1]
    starts = np.flatnonzero(new)
    return starts, np.r_[starts[1:], n]


def exact_duplicates(high: np.ndarray, low: np.ndarray, gids: np.ndarray) -> np.ndarray:
    """The gids whose exact key an earlier gid has (every copy but the first), sorted."""
    order = np.lexsort((gids, low, high))
    starts, _ = _runs([high[order], low[order]])
    later = np.ones(len(gids), dtype=bool)
    later[starts] = False
    return np.sort(gids[order][later])


def band_buckets(keys: np.ndarray, gids: np.ndarray, exact: tuple[np.ndarray, np.ndarray] | None) -> list[np.ndarray]:
    """The gids of each group of two or more documents sharing a band key, in global order.

    With `exact` (the exact keys, when exact dedup runs first) a document whose exact key an
    earlier member of its bucket has is left out: it is an exact duplicate (identical texts
    have identical signatures, so its first copy is in every bucket it is in) and exact dedup
    drops it, so it must neither be dropped again nor keep anyone out.
    """
    columns = (gids, keys) if exact is None else (gids, exact[1], exact[0], keys)
    order = np.lexsort(columns)
    starts, ends = _runs([keys[order]])
    buckets = []
    for start, end in zip(starts[ends - starts > 1].tolist(), ends[ends - starts > 1].tolist()):
        members = order[start:end]
        if exact is not None:
            # Sorted by exact key, then gid, within the bucket: the first of each exact key stays.
            _, firsts = np.unique(np.stack([exact[0][members], exact[1][members]]), axis=1, return_index=True)
            members = members[np.sort(firsts)] if len(firsts) < len(members) else members
            if len(members) < 2:
                continue
        buckets.append(np.sort(gids[members]))
    return buckets


def verified_pairs(buckets: list[np.ndarray], signature_of: Callable[[np.ndarray], np.ndarray],
                   threshold: float) -> np.ndarray:
    """(earlier gid, later gid) pairs whose estimated Jaccard similarity is >= threshold.

    Within a bucket, in global order, a document is compared with the bucket's representatives
    (the members that matched no earlier representative): a pair per representative it matches,
    or it becomes one. A bucket of n copies of one text costs n comparisons, not n^2 / 2.
    """
    pairs: list[tuple[int, int]] = []
    for bucket in buckets:
        sigs = signature_of(bucket)
        reps = [0]
        for member in range(1, len(bucket)):
            similar = np.count_nonzero(sigs[reps] == sigs[member], axis=1) / sigs.shape[1] >= threshold
            if similar.any():
                pairs.extend((int(bucket[reps[k]]), int(bucket[member])) for k in np.flatnonzero(similar).tolist())
            else:
                reps.append(member)
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


# --- Once: the walk in global order. ---

def near_duplicates(pairs: np.ndarray) -> np.ndarray:
    """The later gids to drop, walking `pairs` (earlier, later), from every band, in global order:
    a document is dropped when it matches an earlier document that is kept, the rule of a single
    pass that keeps an index of the kept documents. Sorted."""
    if len(pairs) == 0:
        return np.zeros(0, dtype=np.int64)
    pairs = np.unique(pairs, axis=0)
    pairs = pairs[np.lexsort((pairs[:, 0], pairs[:, 1]))]
    starts, ends = _runs([pairs[:, 1]])
    dropped: set[int] = set()
    for start, end in zip(starts.tolist(), ends.tolist()):
        if any(earlier not in dropped for earlier in pairs[start:end, 0].tolist()):
            dropped.add(int(pairs[start, 1]))
    return np.array(sorted(dropped), dtype=np.int64)
