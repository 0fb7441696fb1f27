"""Near-dedup recall (not a test): how often the clean stage's dedup finds a one-word edit.

Random 120-word documents (words drawn from a 5,000-word vocabulary of random letters), each
followed by a copy with one word replaced (Jaccard of the 5-word shingles: 111/121 = 0.917).
Recall = the share of copies dropped, through the stage's own functions (signatures, band keys,
band buckets, verified pairs, the walk in order); false drops = distinct documents dropped.
Also reports the recall the previous band layout (S-curve midpoint nearest the threshold) had.

    python bench/near_dedup_recall.py            # 5,000 pairs at the params.yaml defaults
    python bench/near_dedup_recall.py --pairs 20000 --words 120
"""

from __future__ import annotations

import argparse
import random
import string
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.data.quality.dedup import (CanonicalTexts, band_buckets, band_keys, candidate_probability, lsh_bands,  # noqa: E402
                                near_duplicates, signatures, verified_pairs)
from lmforge.core.params import CleanParams  # noqa: E402


def pairs(n: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    vocabulary = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9))) for _ in range(5000)]
    texts = []
    for _ in range(n):
        doc = rng.choices(vocabulary, k=words)
        edit = list(doc)
        edit[rng.randrange(words)] = "zzedited"
        texts += [" ".join(doc), " ".join(edit)]
    return texts


def dropped(texts: list[str], params: CleanParams, bands: int) -> np.ndarray:
    sigs = signatures(CanonicalTexts(texts), params.minhash_num_perm, params.minhash_shingle_size, params.minhash_seed)
    keys, gids = band_keys(sigs, bands), np.arange(len(texts))
    found = [verified_pairs(band_buckets(keys[:, band], gids, None), lambda bucket: sigs[bucket], params.minhash_threshold)
             for band in range(bands)]
    return near_duplicates(np.concatenate(found))


def old_bands(threshold: float, num_perm: int) -> int:
    """The layout before issue 13: the S-curve midpoint (1/b)^(1/r) nearest the threshold."""
    divisors = [b for b in range(1, num_perm + 1) if num_perm % b == 0]
    return min(divisors, key=lambda b: abs((1 / b) ** (b / num_perm) - threshold))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=5000)
    parser.add_argument("--words", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    params = CleanParams()
    texts = pairs(args.pairs, args.words, args.seed)
    shingles = args.words - params.minhash_shingle_size + 1
    jaccard = (shingles - params.minhash_shingle_size) / (shingles + params.minhash_shingle_size)
    print(f"{args.pairs:,} pairs of {args.words}-word documents, one word changed (Jaccard {jaccard:.3f}); "
          f"threshold {params.minhash_threshold}, {params.minhash_num_perm} permutations")
    for label, bands in (("now", lsh_bands(params.minhash_threshold, params.minhash_num_perm)),
                         ("before", old_bands(params.minhash_threshold, params.minhash_num_perm))):
        rows = params.minhash_num_perm // bands
        gone = dropped(texts, params, bands)
        recall = np.count_nonzero(gone % 2 == 1) / args.pairs
        false = np.count_nonzero(gone % 2 == 0)
        print(f"{label:>6}: {bands} bands x {rows} rows: recall {recall:.2%} ({np.count_nonzero(gone % 2 == 1):,} of "
              f"{args.pairs:,}; theory at J={jaccard:.3f}: "
              f"{candidate_probability(jaccard, bands, rows):.2%}; at J=0.9: {candidate_probability(0.9, bands, rows):.2%}), "
              f"distinct documents dropped: {false}")


if __name__ == "__main__":
    main()
