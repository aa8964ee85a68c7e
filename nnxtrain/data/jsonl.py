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
stops the run naming its line (`"error"`). A bad record (invalid JSON, nested deeper than
Python's JSON reader goes, not an object, a missing field, a field of the wrong type, a
string holding a lone UTF-16 surrogate such as `"\ud800"`, an empty text, completion or
conversation, a template that fails on it) stops the run with one line naming `file:line`;
with `skip_bad=True` it is counted and skipped, and `report()` / `bad_summary()` say so.
A chat template over its time or size limits stops the run whatever `skip_bad` says.

A record may leave no token for the loss: cut before its completion ("too long"), a chat
with no assistant turn, or one whose template's `{% generation %}` block gave nothing.
`no_loss` counts them by why; `check_loss` fails in one line when no record of a split
has a loss token, and `read` when the template's generation block fired for none of the
chats that have an assistant turn.
"""

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from nnxtrain.data.chat import ChatTemplate, TemplateLimitError
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


SURROGATE = re.compile("[\ud800-\udfff]")  # JSON's "\ud800": no character, not Unicode text
# Why a record has no loss token -> (how the error line counts them, the fix)
NO_LOSS = {
    "too long": (
        "cut at run.seq_len + 1 tokens before their first loss token",
        "raise run.seq_len, or shorten the prompts",
    ),
    "no assistant turn": (
        "chats with no assistant turn (only the assistant's tokens count)",
        "give chats with a message of role 'assistant'",
    ),
    "no generation block": (
        "chats whose template's {% generation %} block gave no text",
        "give a template whose {% generation %} block wraps each assistant reply "
        "(data.chat_template=FILE.jinja, or default)",
    ),
}


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
    _unicode(value, repr(name))
    return value


def check_messages(messages: Any, name: str) -> list[dict[str, Any]]:
    """`messages` (the record's field `name`) as a chat: a non-empty array of objects, each
    with a string role and content; BadRecord naming the first that is not."""
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
    return messages


def _unicode(text: str, what: str) -> None:
    """Raises BadRecord when `text` holds a lone surrogate (tokenizers cannot encode it)."""
    if m := SURROGATE.search(text):
        raise BadRecord(
            "lone surrogate",
            f"{what} holds a lone UTF-16 surrogate (\\u{ord(m.group()):04x} at character "
            f"{m.start()}), which is not Unicode text",
        )


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
        self.no_loss: Counter[str] = Counter()  # records with no loss token, by why (NO_LOSS)
        self.why: list[str] = []  # per document read: why it has no loss token ("": it has)
        self.assistant_chats = self.fired = 0  # chats with an assistant turn; of them, masked
        self.unfired: tuple[str, list[dict[str, Any]]] | None = None  # the first that was not

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
        check_messages(messages, self.fields.messages)
        if self._chat is None:
            self._chat = ChatTemplate.load(self.chat_template, self.tok)
        try:
            text, spans = self._chat.render(messages)
        except TemplateLimitError:
            raise
        except Exception as e:  # the template is the user's code: name the record
            raise BadRecord(
                "template error", f"the chat template failed ({first_line(e)})"
            ) from None
        _unicode(text, "the chat template's text")  # from a field other than role/content
        return self._chat.tokenize(text, spans)

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
        self._check_generation()
        return Documents.build(ids_list, loss_list)

    def _check_generation(self) -> None:
        """Fails when the template marked no token of any chat that has an assistant turn."""
        if not self.assistant_chats or self.fired or self.unfired is None:
            return
        assert self._chat is not None
        where, messages = self.unfired
        try:  # a generation block inside `{% if add_generation_prompt %}` is common
            prompt_only = bool(self._chat.render(messages, add_generation_prompt=True)[1])
        except Exception:
            prompt_only = False
        how = "fires only with add_generation_prompt" if prompt_only else "never fires"
        raise ConfigError(
            "data.chat_template",
            f"the chat template, {self._chat.where}, marks no token of any of the "
            f"{self.assistant_chats:,} chats with an assistant turn (the first: {where}): its "
            f"{{% generation %}} block {how}, so no chat token would count for the loss",
            NO_LOSS["no generation block"][1],
        )

    def _line(self, line: bytes, where: str, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        try:
            try:
                record = json.loads(line)
            except ValueError as e:  # bad JSON or bad UTF-8
                raise BadRecord("invalid JSON", f"invalid JSON ({first_line(e)})") from None
            except RecursionError:
                raise BadRecord(
                    "nested too deep", "nested deeper than Python's JSON reader goes"
                ) from None
            ids, loss, shape = self.encode(record)
            if len(ids) < 2:
                raise BadRecord("empty", "fewer than 2 tokens: nothing to predict")
        except TemplateLimitError as e:
            assert self._chat is not None
            raise ConfigError(
                "data.chat_template",
                f"the chat template, {self._chat.where}, went over its limits on {where}: {e}",
                "give a template that renders a conversation in bounded time and size "
                "(data.chat_template=FILE.jinja, or default)",
            ) from None
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
        targets = bool(loss[1:].any())  # before any cut
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
        why = self._no_loss(record, shape, targets, bool(loss[1:].any()), where)
        if why:
            self.no_loss[why] += 1
        self.why.append(why)
        self.shapes[shape] += 1
        self.tokens += len(ids)
        self.loss_tokens += int(loss[1:].sum())
        return ids, loss

    def _no_loss(
        self, record: dict[str, Any], shape: str, targets: bool, kept: bool, where: str
    ) -> str:
        """Why a record has no loss token (a key of NO_LOSS), "" when it has one; `targets`:
        it had loss targets before any cut, `kept`: after."""
        if shape == "chat":
            if any(m["role"] == "assistant" for m in record[self.fields.messages]):
                self.assistant_chats += 1
                self.fired += targets
                if not targets and self.unfired is None:
                    self.unfired = (where, record[self.fields.messages])
            elif not targets:
                return "no assistant turn"
        if kept:
            return ""
        return "too long" if targets else "no generation block"

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
        for why, n in self.no_loss.items():
            if why != "too long":  # (counted with the cuts above)
                out += f"; {n:,} {NO_LOSS[why][0]}"
        if self.bad:
            out += f"; {self.bad_summary()}"
        if self._chat is not None:
            out += f"; chat template: {self._chat.where}"
        return out


def check_loss(why: Sequence[str], key: str, what: str) -> None:
    """Fails in one line when no record of a split has a loss token; `why` holds each
    record's reason (`RecordReader.why`: "" for a record with a loss token)."""
    if not why or "" in why:
        return
    counts = Counter(why).most_common()
    parts = ", ".join(f"{n:,} {NO_LOSS[k][0]}" for k, n in counts)
    raise ConfigError(
        key,
        f"no token of {what} counts for the loss: of its {len(why):,} records, {parts}",
        "; or ".join(NO_LOSS[k][1] for k, _ in counts),
    )


def describe_files(files: Sequence[str]) -> str:
    """`a.jsonl, b.jsonl and 3 more`: files named in one line."""
    names = ", ".join(files[:3])
    return names + (f" and {len(files) - 3:,} more" if len(files) > 3 else "")
