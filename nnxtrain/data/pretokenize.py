"""Pre-tokenize a text corpus into token files that `data=tokens` memory-maps.

    python -m nnxtrain.data.pretokenize --out data/owt --tokenizer tokenizer.json \\
        --val-fraction 0.005 'raw/*.txt'
    nnxtrain data=tokens data.path=data/owt/train.bin data.val_path=data/owt/val.bin

Streams every file in chunks (memory stays bounded however large the corpus), tokenizes
each document exactly as `data=text` would (same pieces, same end-of-sequence ids) and
appends the ids to OUT/train.bin (raw uint16, or uint32 for vocabularies over 65,536
tokens) or OUT/train.npy. With `--val-fraction F` the last F of the tokens move to
OUT/val.bin. OUT/meta.json records the dtype, vocabulary size, end-of-sequence id and the
tokenizer; `data=tokens` reads it from beside the files. With `--tokenizer char` the
vocabulary is built in a first pass and saved as OUT/char_vocab.json.
"""

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from nnxtrain.data.text import (
    expand_paths,
    iter_texts,
    iter_token_chunks,
    token_dtype,
    unescape,
)
from nnxtrain.data.tokenizer import ByteTokenizer, CharTokenizer, Tokenizer, load_tokenizer
from nnxtrain.data.tokens import META_FORMAT, META_NAME
from nnxtrain.errors import UserError
from nnxtrain.jsonio import write_json

COPY_TOKENS = 1 << 24  # tokens copied at a time when splitting or converting


def pretokenize(
    files: Sequence[str],
    out: str,
    tokenizer: str = "byte",
    val_fraction: float = 0.0,
    fmt: str = "bin",
    separator: str = "",
    eos_token: str = "",
) -> dict[str, Any]:
    """Writes OUT/train.{bin,npy} (and val) and OUT/meta.json; returns the meta."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction: must be in [0, 1), got {val_fraction}")
    if fmt not in ("bin", "npy"):
        raise UserError(f"--format: use bin or npy, not {fmt!r}")
    paths = expand_paths(list(files), "files")
    if not paths:
        raise UserError("files: none given. Fix: name the text files (or a glob)")
    os.makedirs(out, exist_ok=True)
    tok: Tokenizer
    if tokenizer == "char":
        tok = CharTokenizer.build(iter_texts(paths, separator))
        tok.save(os.path.join(out, "char_vocab.json"))
    elif tokenizer == "byte":
        tok = ByteTokenizer()
    else:
        tok = load_tokenizer(tokenizer, eos_token)
    dtype = np.dtype(token_dtype(tok.vocab_size))
    raw = os.path.join(out, "train.bin.partial")
    total = 0
    with open(raw, "wb") as f:
        for chunk in iter_token_chunks(paths, tok, separator, "files"):
            f.write(chunk.astype(dtype, copy=False).tobytes())
            total += len(chunk)
    held = round(total * val_fraction)
    counts = {f"train.{fmt}": total - held}
    src = np.memmap(raw, dtype=dtype, mode="r") if total else np.zeros(0, dtype)
    if held:
        counts[f"val.{fmt}"] = held
        _write(src[total - held :], os.path.join(out, f"val.{fmt}"), fmt)
    if fmt == "npy" or held:
        _write(src[: total - held], os.path.join(out, f"train.{fmt}"), fmt)
        del src
        os.remove(raw)
    else:
        del src
        os.replace(raw, os.path.join(out, "train.bin"))
    meta: dict[str, Any] = {
        "format": META_FORMAT,
        "dtype": dtype.name,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "tokenizer": tok.describe(),
        "tokenizer_digest": tok.digest(),
        "files": counts,
        "sources": paths[:100],
    }
    write_json(os.path.join(out, META_NAME), meta)
    return meta


def _write(tokens: np.ndarray, path: str, fmt: str) -> None:
    """Copies tokens to a .bin or .npy file in bounded chunks."""
    if fmt == "npy":
        dst = np.lib.format.open_memmap(path, mode="w+", dtype=tokens.dtype, shape=(len(tokens),))
        for i in range(0, len(tokens), COPY_TOKENS):
            dst[i : i + COPY_TOKENS] = tokens[i : i + COPY_TOKENS]
        dst.flush()
        del dst
    else:
        with open(path, "wb") as f:
            for i in range(0, len(tokens), COPY_TOKENS):
                f.write(np.asarray(tokens[i : i + COPY_TOKENS]).tobytes())


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m nnxtrain.data.pretokenize",
        description="Tokenize UTF-8 text files into .bin/.npy token files for data=tokens.",
    )
    p.add_argument("files", nargs="+", help="text files or glob patterns (quote globs)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tokenizer", default="byte", help="byte, char, tokenizer.json or .model")
    p.add_argument("--val-fraction", type=float, default=0.0, help="tail share to val file")
    p.add_argument("--format", default="bin", choices=("bin", "npy"), help="output format")
    p.add_argument("--doc-separator", default="", help="string between documents in a file")
    p.add_argument("--eos-token", default="", help="end-of-document token of the tokenizer")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        meta = pretokenize(
            args.files,
            args.out,
            args.tokenizer,
            args.val_fraction,
            args.format,
            unescape(args.doc_separator),
            args.eos_token,
        )
    except UserError as e:
        print(f"pretokenize: error: {e}", file=sys.stderr)
        sys.exit(2)
    files = ", ".join(f"{k} ({v:,} tokens)" for k, v in meta["files"].items())
    print(
        f"wrote {files} and {META_NAME} to {args.out} in {time.perf_counter() - t0:.1f} s; "
        f"tokenizer {meta['tokenizer']}"
    )


if __name__ == "__main__":
    main()
