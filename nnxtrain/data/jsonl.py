"""JSONL records read into token documents with loss masks: the reading side of data=jsonl.

    reader = RecordReader(tokenizer, Fields(), seq_len=128, truncate="right",
                          skip_bad=False, chat_template="")
    docs = reader.read(files, key="data.path")     # a `Documents`; reader.report() says what

Each non-blank line is one JSON object, in one of three shapes (the field names are
settings, `Fields`):
- `{"text": ...}`: BOS + text + EOS; every token counts for the loss.
- `{"prompt": ..., "completion": ...}`: BOS + prompt + completion + EOS; only the
  completion and the EOS count. The two are tokenized apart, so no token straddles them.
- `{"messages": [{"role": ..., "content": ...}, ...]}`: the chat template's text
  (`nnxtrain.data.chat`); only the assistant's tokens count. The template writes the
  whole sequence, BOS and end-of-turn tokens included: nothing is added.
BOS is what the tokenizer itself puts before a text (`bos_ids`: none for byte) and EOS its
`eos_id`. A record is tried as messages, then prompt/completion, then text.

A record longer than seq_len + 1 tokens (a document of n tokens fills n - 1 places of a
row) is cut to its first seq_len + 1 tokens (`truncate="right"`), dropped (`"drop"`), or
stops the run naming its line (`"error"`). A bad record (invalid JSON, not an object, a
missing field, a field of the wrong type, an empty text, completion or conversation, a
template that fails on it) stops the run with one line naming `file:line`; with
`skip_bad=True` it is counted and skipped, and `report()` / `bad_summary()` say so.
"""

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from nnxtrain.data.chat import ChatTemplate
from nnxtrain.data.documents import Documents
from nnxtrain.data.tokenizer import RecordTokenizer
from nnxtrain.errors import ConfigError, first_line


@dataclass(frozen=True)
class Fields:
    """The names of the record fields (data.text_field, ...)."""

    text: str = "text"
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"


class BadRecord(Exception):
    """A record that cannot be used: `kind` counts it, the message says why."""

    def __init__(self, kind: str, message: str):
        self.kind = kind
        super().__init__(message)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), "a number")


def _string(record: dict[str, Any], name: str) -> str:
    if name not in record:
        raise BadRecord("missing field", f"no {name!r} field")
    value = record[name]
    if not isinstance(value, str):
        raise BadRecord("wrong type", f"{name!r} must be a string, got {_json_type(value)}")
    return value


class RecordReader:
    """Turns records into token ids and loss masks, and counts what it did."""

    def __init__(
        self,
        tokenizer: RecordTokenizer,
        fields: Fields,
        *,
        seq_len: int,
        truncate: str = "right",
        skip_bad: bool = False,
        chat_template: str = "",
    ):
        self.tok, self.fields, self.seq_len = tokenizer, fields, seq_len
        self.truncate, self.skip_bad, self.chat_template = truncate, skip_bad, chat_template
        self._chat: ChatTemplate | None = None  # loaded at the first messages record
        self.shapes: Counter[str] = Counter()  # records used, by shape
        self.tokens = self.loss_tokens = 0
        self.bad: Counter[str] = Counter()  # skipped, by kind
        self.first_bad: dict[str, str] = {}  # kind -> file:line of its first
        self.truncated = self.dropped = self.lost = 0  # lost: truncated to no loss token

    # -- one record ----------------------------------------------------------------------

    def encode(self, record: Any) -> tuple[np.ndarray, np.ndarray, str]:
        """(ids, loss mask, shape) of one parsed record; raises BadRecord."""
        f = self.fields
        if not isinstance(record, dict):
            raise BadRecord("wrong type", f"a record is a JSON object, got {_json_type(record)}")
        bos = np.array(self.tok.bos_ids, np.int64)
        eos = np.array([self.tok.eos_id], np.int64)
        if f.messages in record:
            return (*self._chat_ids(record[f.messages]), "chat")
        if f.prompt in record or f.completion in record:
            prompt, completion = _string(record, f.prompt), _string(record, f.completion)
            if not completion:
                raise BadRecord("empty", f"{f.completion!r} is empty")
            p, c = self._encode(prompt), self._encode(completion)
            ids = np.concatenate([bos, p, c, eos])
            return ids, np.arange(len(ids)) >= len(bos) + len(p), "prompt/completion"
        if f.text in record:
            text = _string(record, f.text)
            if not text:
                raise BadRecord("empty", f"{f.text!r} is empty")
            ids = np.concatenate([bos, self._encode(text), eos])
            return ids, np.arange(len(ids)) >= len(bos), "text"
        raise BadRecord(
            "missing field",
            f"no {f.text!r}, {f.prompt!r} + {f.completion!r} or {f.messages!r} field",
        )

    def _encode(self, text: str) -> np.ndarray:
        return self.tok.encode([text]).astype(np.int64)

    def _chat_ids(self, messages: Any) -> tuple[np.ndarray, np.ndarray]:
        name = self.fields.messages
        if not isinstance(messages, list):
            raise BadRecord("wrong type", f"{name!r} must be an array, got {_json_type(messages)}")
        if not messages:
            raise BadRecord("empty", f"{name!r} is empty")
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise BadRecord("wrong type", f"{name}[{i}] must be an object")
            for key in ("role", "content"):
                try:
                    _string(m, key)
                except BadRecord as e:
                    raise BadRecord(e.kind, f"{name}[{i}]: {e}") from None
        if self._chat is None:
            self._chat = ChatTemplate.load(self.chat_template, self.tok)
        try:
            return self._chat.encode(messages)
        except Exception as e:  # the template is the user's code: name the record
            raise BadRecord(
                "template error", f"the chat template failed ({first_line(e)})"
            ) from None

    # -- files ---------------------------------------------------------------------------

    def read(self, files: Sequence[str], key: str) -> Documents:
        """The documents of every usable record of `files`, in order."""
        ids_list: list[np.ndarray] = []
        loss_list: list[np.ndarray] = []
        for path in files:
            try:
                with open(path, "rb") as f:
                    for number, line in enumerate(f, 1):
                        if line.strip():
                            got = self._line(line, f"{path}:{number}", key)
                            if got is not None:
                                ids_list.append(got[0])
                                loss_list.append(got[1])
            except OSError as e:
                raise ConfigError(key, f"cannot read {path} ({e.strerror})", "check it") from e
        return Documents.build(ids_list, loss_list)

    def _line(self, line: bytes, where: str, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        try:
            try:
                record = json.loads(line)
            except ValueError as e:  # bad JSON or bad UTF-8
                raise BadRecord("invalid JSON", f"invalid JSON ({first_line(e)})") from None
            ids, loss, shape = self.encode(record)
            if len(ids) < 2:
                raise BadRecord("empty", "fewer than 2 tokens: nothing to predict")
        except BadRecord as e:
            if not self.skip_bad:
                raise ConfigError(
                    key,
                    f"{where}: {e}",
                    "correct or remove that record, or set data.skip_bad_records=true",
                ) from None
            self.bad[e.kind] += 1
            self.first_bad.setdefault(e.kind, where)
            return None
        if len(ids) > self.seq_len + 1:
            if self.truncate == "error":
                raise ConfigError(
                    "data.truncate",
                    f"{where} has {len(ids)} tokens, more than run.seq_len + 1 = "
                    f"{self.seq_len + 1}",
                    "raise run.seq_len, or set data.truncate=right (cut) or drop",
                )
            if self.truncate == "drop":
                self.dropped += 1
                return None
            self.truncated += 1
            self.lost += bool(loss[1:].any() and not loss[1 : self.seq_len + 1].any())
            ids, loss = ids[: self.seq_len + 1], loss[: self.seq_len + 1]
        self.shapes[shape] += 1
        self.tokens += len(ids)
        self.loss_tokens += int(loss[1:].sum())
        return ids, loss

    # -- reports -------------------------------------------------------------------------

    def bad_summary(self) -> str:
        """`skipped N bad record(s): 2 invalid JSON (first a.jsonl:3), ...`."""
        parts = [f"{n} {kind} (first {self.first_bad[kind]})" for kind, n in self.bad.items()]
        return f"skipped {sum(self.bad.values())} bad record(s): {', '.join(parts)}"

    def report(self) -> str:
        """One clause for the start-up line: records, tokens, truncation and skips."""
        shapes = ", ".join(f"{n:,} {s}" for s, n in sorted(self.shapes.items()))
        out = (
            f"{sum(self.shapes.values()):,} records ({shapes or 'none'}), "
            f"{self.tokens:,} tokens of which {self.loss_tokens:,} count for the loss"
        )
        if self.truncated:
            lost = f", {self.lost:,} of them left with no loss token" if self.lost else ""
            out += f"; {self.truncated:,} cut to run.seq_len + 1 tokens{lost}"
        if self.dropped:
            out += f"; {self.dropped:,} longer than run.seq_len + 1 tokens dropped"
        if self.bad:
            out += f"; {self.bad_summary()}"
        return out
