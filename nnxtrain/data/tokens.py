"""Pre-tokenized corpora on disk: `.npy` arrays and raw `.bin` token files, memory-mapped.

    arrays, meta = open_token_files(["/data/owt/train.bin"], dtype="auto", key="data.path")

Nothing is read into memory up front: each file is mapped (`np.memmap` / `np.load(...,
mmap_mode="r")`) and a batch reads only its windows, so a corpus larger than RAM works.
A `.npy` file carries its dtype; a `.bin` file is a flat array of `data.token_dtype`
(uint16 or uint32), or of the dtype in a `meta.json` beside it. `meta.json`, written by
`python -m nnxtrain.data.pretokenize`, also gives the vocabulary size and the
end-of-sequence id:

    {"format": "nnxtrain-tokens", "dtype": "uint16", "vocab_size": 257, "eos_id": 256,
     "tokenizer": "byte (257 tokens: ...)", "tokenizer_digest": "byte",
     "files": {"train.bin": 1003854, "val.bin": 111540}}
"""

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from nnxtrain.config import TOKEN_DTYPES
from nnxtrain.errors import ConfigError

META_NAME = "meta.json"
META_FORMAT = "nnxtrain-tokens"


def read_meta(files: Sequence[str], key: str) -> dict[str, Any] | None:
    """The `meta.json` beside the files (all must share one, or none), or None."""
    metas = {os.path.join(os.path.dirname(f), META_NAME) for f in files}
    found = {m for m in metas if os.path.isfile(m)}
    if not found:
        return None
    loaded = []
    for path in sorted(found):
        try:
            with open(path, encoding="utf-8") as fh:
                meta = json.load(fh)
        except (OSError, ValueError) as e:
            raise ConfigError(key, f"cannot read {path} ({e})", "fix or remove it") from e
        if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
            raise ConfigError(key, f"{path} is not an nnxtrain token meta.json", "remove it")
        loaded.append(meta)
    first = loaded[0]
    for other in loaded[1:]:
        if any(other.get(k) != first.get(k) for k in ("dtype", "vocab_size", "eos_id")):
            raise ConfigError(
                key,
                f"the files' meta.json files disagree ({sorted(found)})",
                "use files pre-tokenized with one tokenizer",
            )
    return first


def open_token_files(
    files: Sequence[str], dtype: str, key: str, meta: dict[str, Any] | None = None
) -> list[np.ndarray]:
    """Each file as a read-only 1-D integer array mapped from disk."""
    if dtype == "auto":  # (a dtype set by data.token_dtype is checked by nnxtrain.config)
        dtype = str(meta["dtype"]) if meta and meta.get("dtype") else "uint16"
        if dtype not in TOKEN_DTYPES:
            raise ConfigError(
                key,
                f"the {META_NAME} beside the files gives dtype {dtype!r}, not uint16 or uint32",
                "pre-tokenize the files again, or set data.token_dtype",
            )
    arrays = []
    for path in files:
        if path.endswith(".npy"):
            try:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise ConfigError(key, f"cannot read {path} as .npy ({e})", "check it") from e
            if arr.ndim != 1 or arr.dtype.kind not in "iu":
                raise ConfigError(
                    key,
                    f"{path} holds a {arr.dtype} array of shape {arr.shape}",
                    "save a 1-D integer array of token ids",
                )
        elif path.endswith(".bin"):
            item = np.dtype(dtype).itemsize
            size = os.path.getsize(path)
            if size % item:
                raise ConfigError(
                    key,
                    f"{path} has {size} bytes, not a whole number of {dtype} tokens",
                    "set data.token_dtype to the dtype the file was written with",
                )
            arr = np.memmap(path, dtype=dtype, mode="r")
        else:
            raise ConfigError(
                key,
                f"{path} is neither .npy nor .bin",
                "data=tokens reads pre-tokenized arrays; use data=text for text files",
            )
        if len(arr) == 0:
            raise ConfigError(key, f"{path} holds no tokens", "remove it")
        arrays.append(arr)
    return arrays
