"""Packing efficiency of data=jsonl: the non-padding share of the rows documents fill.

Draws document lengths (tokens) from a log-normal distribution truncated to [20, 2000]
(median 200 tokens by default: a skewed mix of short and long records), packs them whole
into rows of seq_len places the way `nnxtrain.data.documents.DocumentData` does
(best-fit decreasing; a document of n tokens takes n - 1 places), and prints for each
spread (sigma) the rows, the packing efficiency, the time the packing took, and, for
comparison, greedy first-fit in file order (up to 50,000 documents: it is quadratic) and
one document per row.

    python bench/packing.py [--docs 20000] [--seq-len 2048] [--sigmas 0.5 1.0 1.5]

The bar (issue 15): efficiency >= 0.95 at seq_len 2048.
"""

import argparse
import time

import numpy as np

from nnxtrain.data.documents import DocumentData, Documents


def lengths(rng: np.random.Generator, n: int, median: float, sigma: float) -> np.ndarray:
    """n log-normal token counts in [20, 2000] (out-of-range draws are drawn again)."""
    out = np.zeros(0, np.int64)
    while len(out) < n:
        draw = np.rint(rng.lognormal(np.log(median), sigma, size=2 * n)).astype(np.int64)
        out = np.concatenate([out, draw[(draw >= 20) & (draw <= 2000)]])
    return out[:n]


def first_fit_rows(places: np.ndarray, seq_len: int) -> int:
    """Rows greedy first-fit in file order needs (the baseline)."""
    free: list[int] = []
    for p in places.tolist():
        for i, f in enumerate(free):
            if f >= p:
                free[i] -= p
                break
        else:
            free.append(seq_len - p)
    return len(free)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=20000)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--median", type=float, default=200.0)
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.5, 1.0, 1.5])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    print(
        f"{args.docs:,} documents, log-normal lengths in [20, 2000] (median {args.median:g}), "
        f"rows of {args.seq_len}"
    )
    print(
        f"{'sigma':>5} {'mean len':>8} {'rows':>7} {'efficiency':>10} {'pack s':>7} "
        f"{'first-fit (file order)':>22} {'one per row':>11}"
    )
    for sigma in args.sigmas:
        n = lengths(rng, args.docs, args.median, sigma)
        docs = Documents.build([np.ones(k, np.int32) for k in n], [np.ones(k, bool) for k in n])
        start = time.perf_counter()
        data = DocumentData(
            docs, None, seq_len=args.seq_len, seed=0, eos_id=0, vocab_size=2, prefetch=0
        )
        took = time.perf_counter() - start
        places = n - 1
        ff = (  # the baseline is quadratic: skipped for large runs
            places.sum() / (first_fit_rows(places, args.seq_len) * args.seq_len)
            if args.docs <= 50_000
            else float("nan")
        )
        single = places.mean() / args.seq_len
        print(
            f"{sigma:5.2f} {n.mean():8.1f} {data.train.rows:7,} {data.train.efficiency:10.4f} "
            f"{took:7.2f} {ff:22.4f} {single:11.4f}"
        )


if __name__ == "__main__":
    main()
