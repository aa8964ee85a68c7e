"""Tokenizers that turn text into token ids: byte, char, Hugging Face and SentencePiece.

    tok = load_tokenizer("byte")                       # 256 byte values + end-of-sequence
    tok = CharTokenizer.build(texts)                   # the characters seen in the corpus
    tok = load_tokenizer("path/to/tokenizer.json")     # Hugging Face `tokenizers`
    tok = load_tokenizer("path/to/spm.model")          # SentencePiece
    ids = tok.encode(["one document", "or pieces of one"])   # 1-D uint32, no EOS added

Every tokenizer has `vocab_size` (ids are in 0 .. vocab_size-1), `eos_id` (appended after
each document when packing) and `describe()` (one line for logs and checkpoints). A
tokenizer file that has no end-of-text token gets one extra id, `vocab_size - 1`.

Byte, Hugging Face and SentencePiece tokenizers are also `RecordTokenizer`s (what
`data=jsonl` needs): `bos_ids` and `bos_text` (what the tokenizer itself puts before a
text: a tokenizer.json's post-processor, a SentencePiece model's BOS; none for byte),
`eos_text` (the string a chat template writes for EOS) and `encode_offsets(text)` (ids and
each token's character span, with special-token strings such as `eos_text` read as ids).

The char vocabulary is saved as JSON (`{"type": "nnxtrain-char", "chars": [...]}`) in the
run directory, so a resumed run tokenizes exactly as before; `load_tokenizer` also accepts
such a file. Bad tokenizer files raise `ConfigError` naming `data.tokenizer`.
"""

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import numpy as np

from nnxtrain.errors import ConfigError, first_line
from nnxtrain.jsonio import write_json

KEY = "data.tokenizer"
CHAR_TYPE = "nnxtrain-char"
# End-of-text tokens of common tokenizer files, tried in order when data.eos_token is empty.
HF_PIECE_CHARS = 1 << 16  # text handed to the Rust tokenizer per parallel piece
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
# How a chat template writes EOS for a tokenizer that has no string for it (byte, or an
# added id); `encode_offsets` reads it back as `eos_id`.
EOS_PLACEHOLDER = "<|endoftext|>"

Offsets = tuple[np.ndarray, np.ndarray]  # ids [n] int64, character spans [n, 2] int64


class Tokenizer(Protocol):
    vocab_size: int  # ids are 0 .. vocab_size - 1
    eos_id: int  # the end-of-sequence id placed after every document

    def encode(self, pieces: Sequence[str]) -> np.ndarray:
        """The ids of the pieces, concatenated (1-D uint32); adds no special tokens."""
        ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def describe(self) -> str:
        """One line naming the tokenizer and its vocabulary, e.g. `byte (257 tokens)`."""
        ...

    def digest(self) -> str:
        """A short hash of the vocabulary, to tell whether a resumed run tokenizes alike."""
        ...


class RecordTokenizer(Tokenizer, Protocol):
    path: str  # the tokenizer's file ("" for byte): its folder may hold tokenizer_config.json
    bos_ids: tuple[int, ...]  # what the tokenizer puts before a text (its BOS), maybe none
    bos_text: str  # their text ("" when none): a chat template's default bos_token
    eos_text: str  # the string a chat template writes for EOS

    def encode_offsets(self, text: str) -> Offsets:
        """One text's ids and each token's (start, end) character span; the strings of
        special tokens (`eos_text` and the tokenizer's own) become their ids."""
        ...


class ByteTokenizer:
    """UTF-8 bytes: ids 0..255 are byte values, 256 is end-of-sequence."""

    vocab_size = 257
    eos_id = 256
    path = ""
    bos_ids: tuple[int, ...] = ()
    bos_text = ""
    eos_text = EOS_PLACEHOLDER

    def encode(self, pieces: Sequence[str]) -> np.ndarray:
        data = "".join(pieces).encode("utf-8", errors="replace")
        return np.frombuffer(data, np.uint8).astype(np.uint32)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def encode_offsets(self, text: str) -> Offsets:
        return _encode_around(text, {EOS_PLACEHOLDER: self.eos_id}, self._offsets)

    def _offsets(self, text: str) -> Offsets:
        char = _char_of_byte(text)[:-1]
        return self.encode([text]).astype(np.int64), np.stack([char, char + 1], axis=1)

    def describe(self) -> str:
        return "byte (257 tokens: 256 bytes + end-of-sequence)"

    def digest(self) -> str:
        return "byte"


class CharTokenizer:
    """One id per character of the training text: 0 is end-of-sequence, 1 unknown."""

    eos_id = 0
    unk_id = 1

    def __init__(self, chars: Sequence[str]):
        self.chars = sorted(set(chars))
        self._codes = np.array([ord(c) for c in self.chars], np.uint32)
        self.vocab_size = len(self.chars) + 2

    @classmethod
    def build(cls, texts: Iterable[str]) -> "CharTokenizer":
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls(sorted(seen))

    @classmethod
    def load(cls, path: str) -> "CharTokenizer":
        data = _read_json(path)
        chars = data.get("chars") if isinstance(data, dict) else None
        if not isinstance(chars, list) or data.get("type") != CHAR_TYPE:
            raise ConfigError(
                KEY, f"{path} is not a char vocabulary", "give a char_vocab.json nnxtrain wrote"
            )
        return cls(chars)

    def save(self, path: str) -> None:
        """Writes the vocabulary atomically (processes of one run may race to write it)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_json(path, {"type": CHAR_TYPE, "chars": self.chars})

    def encode(self, pieces: Sequence[str]) -> np.ndarray:
        codes = np.frombuffer("".join(pieces).encode("utf-32-le"), np.uint32)
        if not len(self._codes):
            return np.full(codes.shape, self.unk_id, np.uint32)
        pos = np.minimum(np.searchsorted(self._codes, codes), len(self._codes) - 1)
        known = self._codes[pos] == codes
        return np.where(known, pos + 2, self.unk_id).astype(np.uint32)

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i - 2] if i >= 2 else "" for i in ids)

    def describe(self) -> str:
        return f"char ({self.vocab_size} tokens: {len(self.chars)} characters + eos, unk)"

    def digest(self) -> str:
        return "char:" + hashlib.sha1("".join(self.chars).encode("utf-8")).hexdigest()[:16]


class HFTokenizer:
    """A Hugging Face `tokenizer.json`, through the `tokenizers` library."""

    def __init__(self, path: str, eos_token: str = ""):
        try:
            from tokenizers import Tokenizer as _HF
        except ImportError as e:
            raise ConfigError(
                KEY, f"{path} needs the `tokenizers` package", "pip install 'nnxtrain[data]'"
            ) from e
        try:
            self._tok = _HF.from_file(path)
        except Exception as e:
            raise ConfigError(
                KEY,
                f"cannot read {path} as a Hugging Face tokenizer.json ({first_line(e)})",
                "give a valid tokenizer.json, a SentencePiece .model, byte or char",
            ) from e
        self.path = path
        base = self._tok.get_vocab_size(with_added_tokens=True)
        eos = _find_eos(eos_token, self._tok.token_to_id, path)
        self.eos_id, self.vocab_size = (eos, base) if eos is not None else (base, base + 1)
        self._base = base
        probe = self._tok.encode("a", add_special_tokens=True)  # what the post-processor adds
        lead = next((i for i, m in enumerate(probe.special_tokens_mask) if not m), 0)
        self.bos_ids = tuple(probe.ids[:lead])
        self.bos_text = "".join(self._tok.id_to_token(i) or "" for i in self.bos_ids)
        self.eos_text = (self._tok.id_to_token(eos) if eos is not None else None) or EOS_PLACEHOLDER
        self._specials = {} if eos is not None else {EOS_PLACEHOLDER: base}

    def encode(self, pieces: Sequence[str]) -> np.ndarray:
        pieces = [q for p in pieces for q in _split_after_newlines(p, HF_PIECE_CHARS) if q]
        if not pieces:
            return np.zeros(0, np.uint32)
        # encode_batch runs the pieces on all cores; cuts fall only after newlines
        encs = self._tok.encode_batch(pieces, add_special_tokens=False)
        return np.concatenate([np.asarray(e.ids, np.uint32) for e in encs])

    def decode(self, ids: Iterable[int]) -> str:
        return str(self._tok.decode([i for i in ids if i < self._base]))

    def encode_offsets(self, text: str) -> Offsets:
        return _encode_around(text, self._specials, self._offsets)

    def _offsets(self, text: str) -> Offsets:
        # the call transformers' apply_chat_template makes, so the spans are the same
        enc = self._tok.encode(text, add_special_tokens=False)
        return np.asarray(enc.ids, np.int64), np.asarray(enc.offsets, np.int64).reshape(-1, 2)

    def describe(self) -> str:
        return f"Hugging Face {os.path.basename(self.path)} ({self.vocab_size} tokens)"

    def digest(self) -> str:
        return "hf:" + _file_hash(self.path)


class SentencePieceTokenizer:
    """A SentencePiece `.model` file."""

    def __init__(self, path: str, eos_token: str = ""):
        try:
            import sentencepiece as spm
        except ImportError as e:
            raise ConfigError(
                KEY, f"{path} needs the `sentencepiece` package", "pip install 'nnxtrain[data]'"
            ) from e
        try:
            self._sp = spm.SentencePieceProcessor(model_file=path)
        except Exception as e:
            raise ConfigError(
                KEY,
                f"cannot read {path} as a SentencePiece model ({first_line(e)})",
                "give a valid .model file, a Hugging Face tokenizer.json, byte or char",
            ) from e
        self.path = path
        base = int(self._sp.get_piece_size())
        if eos_token:
            eos: int | None = _find_eos(eos_token, self._piece_id, path)
        else:
            eos = int(self._sp.eos_id()) if self._sp.eos_id() >= 0 else None
        self.eos_id, self.vocab_size = (eos, base) if eos is not None else (base, base + 1)
        self._base = base
        bos = int(self._sp.bos_id())
        self.bos_ids: tuple[int, ...] = (bos,) if bos >= 0 else ()
        self.bos_text = self._sp.id_to_piece(bos) if bos >= 0 else ""
        # SentencePiece reads control pieces such as </s> in text as characters: map them
        self.eos_text = self._sp.id_to_piece(eos) if eos is not None else EOS_PLACEHOLDER
        self._specials = {self.eos_text: self.eos_id}
        if bos >= 0:
            self._specials[self._sp.id_to_piece(bos)] = bos

    def _piece_id(self, piece: str) -> int | None:
        i = int(self._sp.piece_to_id(piece))
        return i if self._sp.id_to_piece(i) == piece else None

    def encode(self, pieces: Sequence[str]) -> np.ndarray:
        pieces = [p for p in pieces if p]
        if not pieces:
            return np.zeros(0, np.uint32)
        return np.concatenate([np.asarray(ids, np.uint32) for ids in self._sp.encode(pieces)])

    def decode(self, ids: Iterable[int]) -> str:
        return str(self._sp.decode([int(i) for i in ids if i < self._base]))

    def encode_offsets(self, text: str) -> Offsets:
        return _encode_around(text, self._specials, self._offsets)

    def _offsets(self, text: str) -> Offsets:
        pieces = self._sp.encode(text, return_type="proto").pieces  # spans in UTF-8 bytes
        char = _char_of_byte(text)
        ids = np.array([p.id for p in pieces], np.int64)
        spans = np.array([[p.begin, p.end] for p in pieces], np.int64).reshape(-1, 2)
        return ids, char[spans]

    def describe(self) -> str:
        return f"SentencePiece {os.path.basename(self.path)} ({self.vocab_size} tokens)"

    def digest(self) -> str:
        return "sp:" + _file_hash(self.path)


def load_tokenizer(spec: str, eos_token: str = "") -> Tokenizer:
    """`byte`, or a file: SentencePiece `.model`, a char vocabulary or a tokenizer.json.

    `char` needs the corpus and is built by `CharTokenizer.build`, not here.
    """
    if spec == "byte":
        return ByteTokenizer()
    path = os.path.abspath(os.path.expanduser(spec))
    if not os.path.isfile(path):
        raise ConfigError(
            KEY,
            f"no such file {spec!r}",
            "use byte, char, a Hugging Face tokenizer.json or a SentencePiece .model file",
        )
    if path.endswith(".model"):
        return SentencePieceTokenizer(path, eos_token)
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(200)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(KEY, f"cannot read {path} ({first_line(e)})", "check the file") from e
    if CHAR_TYPE in head:
        return CharTokenizer.load(path)
    return HFTokenizer(path, eos_token)


def _split_after_newlines(text: str, size: int) -> list[str]:
    """`text` in pieces of about `size` characters, each cut just after a newline."""
    out, start = [], 0
    while len(text) - start > size:
        cut = text.rfind("\n", start, start + size) + 1
        if cut <= start:  # no newline in reach: take the whole line
            cut = text.find("\n", start + size) + 1 or len(text)
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


def _char_of_byte(text: str) -> np.ndarray:
    """For each byte of `text` in UTF-8 (a lone surrogate: one "?"), the index of its
    character; one more entry, len(text), for the end."""
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)
    width = 1 + (codes >= 0x80).astype(np.int64) + (codes >= 0x800) + (codes >= 0x10000)
    width[(codes >= 0xD800) & (codes < 0xE000)] = 1
    return np.append(np.repeat(np.arange(len(codes)), width), len(codes))


def _encode_around(
    text: str, specials: dict[str, int], encode: Callable[[str], Offsets]
) -> Offsets:
    """`encode` applied to the text between the `specials` strings, each of which becomes
    its id; the spans are those of the whole text."""
    if not specials:
        return encode(text)
    ids, spans, pos = [], [], 0
    pattern = "|".join(map(re.escape, sorted(specials, key=len, reverse=True)))
    for m in [*re.finditer(pattern, text), None]:
        end = m.start() if m else len(text)
        piece_ids, piece_spans = encode(text[pos:end])
        ids += [piece_ids, np.array([specials[m.group()]] if m else [], np.int64)]
        spans += [piece_spans + pos, np.array([m.span()] if m else [], np.int64).reshape(-1, 2)]
        pos = m.end() if m else pos
    return np.concatenate(ids), np.concatenate(spans)


def _find_eos(eos_token: str, lookup: Any, path: str) -> int | None:
    if eos_token:
        i = lookup(eos_token)
        if i is None:
            raise ConfigError(
                "data.eos_token",
                f"{eos_token!r} is not a token of {path}",
                "give one of its special tokens, or leave it empty to add one",
            )
        return int(i)
    for cand in EOS_CANDIDATES:
        i = lookup(cand)
        if i is not None:
            return int(i)
    return None


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(KEY, f"cannot read {path} ({first_line(e)})", "check the file") from e


def _file_hash(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()[:16]
