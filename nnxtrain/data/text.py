"""Reading a text corpus: file lists from paths and globs, documents, and their tokens.

    files = expand_paths(["books/*.txt", "extra.txt"], "data.path")
    tokens = encode_files(files, tokenizer, separator="", key="data.path")  # 1-D, EOS-packed

Files are read as UTF-8 in chunks (`iter_pieces`), so a file larger than memory can be
streamed (`nnxtrain.data.pretokenize` does). Each file is one document, or several when
`separator` is given (for example a blank line, "\\n\\n"); every document is followed by the
tokenizer's end-of-sequence id. Long documents are handed to the tokenizer in pieces cut
after a newline, so a subword tokenizer may split a word differently only at such a cut.

Invalid UTF-8 bytes are replaced with U+FFFD, and one warning per corpus (logger
`nnxtrain.data`) says which files had them. A missing file, a glob matching nothing, a
directory or an empty file raise `ConfigError` naming the key.
"""

import codecs
import functools
import glob
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from nnxtrain.data.tokenizer import Tokenizer
from nnxtrain.errors import ConfigError

CHUNK_BYTES = 1 << 20  # bytes read, decoded and tokenized at a time


log = logging.getLogger("nnxtrain.data")  # data problems that do not stop the run


def unescape(separator: str) -> str:
    """`\\n`, `\\t` and `\\r` typed on a command line as the characters they name."""
    return separator.replace("\\n", "\n").replace("\\t", "\t").replace("\\r", "\r")


def as_list(value: str | Sequence[str]) -> list[str]:
    """A path setting (a string or a list of strings: `nnxtrain.config` checks which) as a
    list; empty entries dropped."""
    return [v for v in ([value] if isinstance(value, str) else value) if v]


def expand_paths(value: str | Sequence[str], key: str) -> list[str]:
    """Absolute file paths from paths and glob patterns, in order, each file once."""
    out: list[str] = []
    for entry in as_list(value):
        entry = os.path.expanduser(entry)
        if glob.has_magic(entry):
            matches = sorted(p for p in glob.glob(entry, recursive=True) if os.path.isfile(p))
            if not matches:
                raise ConfigError(key, f"no files match {entry!r}", "check the pattern")
        elif os.path.isdir(entry):
            raise ConfigError(
                key, f"{entry!r} is a directory", f"give files or a glob such as {entry}/*.txt"
            )
        elif not os.path.isfile(entry):
            raise ConfigError(key, f"no such file {entry!r}", "check the path")
        else:
            matches = [entry]
        for m in map(os.path.abspath, matches):
            if m not in out:
                out.append(m)
    for path in out:
        if os.path.getsize(path) == 0:
            raise ConfigError(key, f"{path} is empty", "remove it or give a non-empty file")
        if not os.access(path, os.R_OK):
            raise ConfigError(key, f"{path} is not readable", "check its permissions")
    return out


class _BadBytes:
    """Counts invalid UTF-8 bytes replaced while decoding one file."""

    def __init__(self) -> None:
        self.count = 0


_current = threading.local()  # the _BadBytes of the file being decoded on this thread


def _replace_and_count(err: UnicodeError) -> tuple[str, int]:
    assert isinstance(err, UnicodeDecodeError)
    bad = getattr(_current, "bad", None)
    if bad is not None:
        bad.count += err.end - err.start
    return "\ufffd", err.end


@functools.cache
def _count_errors() -> str:
    """The name of the error handler that replaces and counts invalid bytes. A decoder
    takes a handler only by a name registered for the whole process (codecs cannot
    unregister one), so it is registered once, by the first decode that needs it."""
    codecs.register_error("nnxtrain-replace", _replace_and_count)
    return "nnxtrain-replace"


def iter_pieces(
    path: str, separator: str = "", chunk_bytes: int = CHUNK_BYTES, bad: _BadBytes | None = None
) -> Iterator[tuple[str, bool]]:
    """Yields (text, ends_document) pieces of `path`; a piece never splits a character."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors=_count_errors())
    carry, in_doc = "", False
    keep = max(len(separator), 1)  # a separator may straddle two reads: keep its length
    with open(path, "rb") as f:
        while True:
            raw = f.read(chunk_bytes)
            _current.bad = bad
            try:
                carry += decoder.decode(raw, final=not raw)
            finally:
                _current.bad = None
            if separator:
                *docs, carry = carry.split(separator)
                for doc in docs:
                    if doc or in_doc:
                        yield doc, True
                    in_doc = False
            if not raw:
                break
            if len(carry) > chunk_bytes:  # a long document: hand over what ends at a newline
                cut = carry.rfind("\n", 0, len(carry) - keep) + 1 or len(carry) - keep + 1
                yield carry[:cut], False
                carry, in_doc = carry[cut:], True
    if carry or in_doc:
        yield carry, True


def encode_files(
    files: Sequence[str], tokenizer: Tokenizer, separator: str = "", key: str = "data.path"
) -> np.ndarray:
    """All documents of `files` tokenized, each followed by EOS, as one 1-D array."""
    parts = list(iter_token_chunks(files, tokenizer, separator, key))
    return np.concatenate(parts) if parts else np.zeros(0, token_dtype(tokenizer.vocab_size))


def token_dtype(vocab_size: int) -> type[np.unsignedinteger[Any]]:
    """The smallest unsigned dtype that holds every id."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def iter_token_chunks(
    files: Sequence[str], tokenizer: Tokenizer, separator: str = "", key: str = "data.path"
) -> Iterator[np.ndarray]:
    """The EOS-packed tokens of `files`, in chunks of about CHUNK_BYTES of text."""
    dtype = token_dtype(tokenizer.vocab_size)
    eos = np.array([tokenizer.eos_id], dtype)
    bad_files: list[tuple[str, int]] = []
    for path in files:
        bad = _BadBytes()
        pending: list[str] = []
        try:
            for text, ends in iter_pieces(path, separator, bad=bad):
                pending.append(text)
                if ends or sum(map(len, pending)) >= CHUNK_BYTES:
                    yield tokenizer.encode(pending).astype(dtype)
                    pending = []
                if ends:
                    yield eos
        except OSError as e:
            raise ConfigError(key, f"cannot read {path} ({e.strerror})", "check the file") from e
        if bad.count:
            bad_files.append((path, bad.count))
    warn_bad_utf8(bad_files, key)


def iter_texts(files: Sequence[str], separator: str = "") -> Iterator[str]:
    """The text of every file in pieces (for building a char vocabulary)."""
    for path in files:
        for text, _ in iter_pieces(path, separator):
            yield text


def warn_bad_utf8(bad_files: Sequence[tuple[str, int]], key: str) -> None:
    """One warning for all the files of a corpus that had invalid UTF-8."""
    if not bad_files:
        return
    total = sum(n for _, n in bad_files)
    first = bad_files[0][0]
    more = f" and {len(bad_files) - 1} more file(s)" if len(bad_files) > 1 else ""
    log.warning(
        "%s: %d byte(s) that are not valid UTF-8 in %s%s were replaced with U+FFFD",
        key,
        total,
        first,
        more,
    )
