"""Preference pairs for DPO (data=preference): a prompt, a chosen and a rejected reply.

    reader = PairReader(tokenizer, seq_len=128, max_prompt=0, max_reply=0, ...)
    pairs = reader.read(files, "data.path")          # `Pairs`; reader.report() says what
    data = PreferenceData(pairs, seq_len=128, seed=0, ...)
    data.batch(step, 2 * B, 128)   # rows 0..B-1 the chosen replies, B..2B-1 the rejected

Each non-blank line is one JSON object with "prompt", "chosen" and "rejected":
- strings: BOS + prompt, then the reply + EOS. Prompt and reply are tokenized apart (as
  data=jsonl's prompt/completion records), so no token straddles them.
- chat: "prompt" a list of messages, "chosen" and "rejected" each a list of messages (or
  a string: one assistant message). The tokenizer's chat template (data.chat_template, as
  for data=jsonl) renders prompt + reply; the reply is every token after the prompt's
  tokens (the prompt rendered with the generation prompt), end-of-turn tokens included.
  Where the two renderings part earlier (tokens merging across the boundary), the reply
  starts where they part, as TRL does.

Limits, in this order, each counted in `report()`: a prompt keeps its last
data.max_prompt_len tokens, a reply its first data.max_completion_len (0: no limit); then
prompt + reply must fit run.seq_len + 1 tokens: with data.truncate=right the reply is cut
to fit (a pair whose prompt leaves no room for either reply is dropped, counted), with
drop the pair is dropped, with error the run stops naming its line. Bad lines get
data=jsonl's one-line errors (`nnxtrain.data.jsonl`), and data.skip_bad_records.

A training batch of B pairs is a pure function of (seed, step): pair j of step s is the
pair at global index s*B + j of a seeded per-epoch permutation (`IndexShuffle`, as for
the other sources), so a resumed run reads the same pairs. Held-out batch i holds the
held-out pairs i*B .. i*B + B - 1 in order (data.val_path's, else the last
data.val_fraction of the pairs); rows past their end are padding (weight 0: no pair).
Each row holds one sequence from place 0, padded on the right (weights 0 there and on
the prompt).
"""

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from nnxtrain.data.batch import Batch
from nnxtrain.data.chat import ChatTemplate, TemplateLimitError
from nnxtrain.data.jsonl import BadRecord, _json_type, _string, check_messages
from nnxtrain.data.shuffle import IndexShuffle
from nnxtrain.data.stepped import StepBatches
from nnxtrain.data.tokenizer import RecordTokenizer
from nnxtrain.errors import ConfigError, first_line

SIDES = ("chosen", "rejected")


@dataclass(frozen=True)
class Pairs:
    """Tokenized pairs: per pair its prompt's ids and its two replies' ids."""

    prompts: list[np.ndarray]
    chosen: list[np.ndarray]
    rejected: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.prompts)

    def split(self, at: int) -> tuple["Pairs", "Pairs"]:
        """The first `at` pairs and the rest."""
        parts = (self.prompts, self.chosen, self.rejected)
        return Pairs(*(x[:at] for x in parts)), Pairs(*(x[at:] for x in parts))

    def digest(self) -> str:
        h = hashlib.sha256()
        for parts in zip(self.prompts, self.chosen, self.rejected, strict=True):
            for ids in parts:
                h.update(np.int64(len(ids)).tobytes() + ids.astype(np.int32).tobytes())
        return h.hexdigest()[:16]


def _messages(value: Any, name: str) -> list[dict[str, Any]]:
    if isinstance(value, str):  # a reply given as its text: one assistant message
        return [{"role": "assistant", "content": value}]
    return check_messages(value, name)


def _common(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


class PairReader:
    """Turns preference records into token ids, applying the limits, and counts what it did."""

    def __init__(
        self,
        tokenizer: RecordTokenizer,
        *,
        seq_len: int,
        max_prompt: int = 0,
        max_reply: int = 0,
        truncate: str = "right",
        skip_bad: bool = False,
        chat_template: str = "",
    ):
        self.tok, self.seq_len = tokenizer, seq_len
        self.max_prompt, self.max_reply = max_prompt, max_reply
        self.truncate, self.skip_bad, self.chat_template = truncate, skip_bad, chat_template
        self._chat: ChatTemplate | None = None
        self.shapes: Counter[str] = Counter()
        self.bad: Counter[str] = Counter()
        self.first_bad: dict[str, str] = {}
        self.cut = Counter({"prompts": 0, "replies": 0, "to fit": 0, "dropped": 0})

    def encode(self, record: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
        """(prompt ids, chosen ids, rejected ids, shape) of one parsed record."""
        if not isinstance(record, dict):
            raise BadRecord("wrong type", f"a record is a JSON object, got {_json_type(record)}")
        for name in ("prompt", *SIDES):
            if name not in record:
                raise BadRecord("missing field", f"no {name!r} field")
        if isinstance(record["prompt"], list):
            return (*self._chat_ids(record), "chat")
        if not isinstance(record["prompt"], str):
            got = _json_type(record["prompt"])
            raise BadRecord(
                "wrong type", f"'prompt' must be a string or an array of messages, got {got}"
            )
        prompt = _string(record, "prompt")
        bos = np.array(self.tok.bos_ids, np.int64)
        eos = np.array([self.tok.eos_id], np.int64)
        replies = []
        for side in SIDES:
            text = _string(record, side)
            if not text:
                raise BadRecord("empty", f"{side!r} is empty")
            replies.append(np.concatenate([self.tok.encode([text]).astype(np.int64), eos]))
        p = np.concatenate([bos, self.tok.encode([prompt]).astype(np.int64)])
        return p, replies[0], replies[1], "prompt/chosen/rejected"

    def _chat_ids(self, record: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        prompt = _messages(record["prompt"], "prompt")
        if self._chat is None:
            self._chat = ChatTemplate.load(self.chat_template, self.tok)
        try:
            p, _ = self._chat.encode(prompt, add_generation_prompt=True)
            full = [self._chat.encode(prompt + _messages(record[s], s))[0] for s in SIDES]
        except (TemplateLimitError, BadRecord):
            raise
        except Exception as e:  # the template is the user's code: name the record
            raise BadRecord(
                "template error", f"the chat template failed ({first_line(e)})"
            ) from None
        p = np.asarray(p, np.int64)
        start = min(_common(p, np.asarray(f, np.int64)) for f in full)
        c, r = (np.asarray(f, np.int64)[start:] for f in full)
        if not len(c) or not len(r):
            raise BadRecord("empty", "a reply renders to no token after the prompt")
        return p[:start], c, r

    def _limit(self, p: np.ndarray, c: np.ndarray, r: np.ndarray, where: str) -> Any:
        """The pair after the length limits, or None when it is dropped."""
        if self.max_prompt and len(p) > self.max_prompt:
            p, self.cut["prompts"] = p[-self.max_prompt :], self.cut["prompts"] + 1
        if self.max_reply and max(len(c), len(r)) > self.max_reply:
            c, r = c[: self.max_reply], r[: self.max_reply]
            self.cut["replies"] += 1
        room = self.seq_len + 1 - len(p)
        if max(len(c), len(r)) <= room:
            return p, c, r
        if self.truncate == "error":
            raise ConfigError(
                "data.truncate",
                f"{where} has {len(p) + max(len(c), len(r))} tokens (prompt + the longer "
                f"reply), more than run.seq_len + 1 = {self.seq_len + 1}",
                "raise run.seq_len, set data.max_prompt_len / data.max_completion_len, "
                "or data.truncate=right (cut) or drop",
            )
        if self.truncate == "drop" or room < 1:
            self.cut["dropped"] += 1
            return None
        self.cut["to fit"] += 1
        return p, c[:room], r[:room]

    def _line(self, line: bytes, where: str, key: str) -> Any:
        try:
            try:
                record = json.loads(line)
            except ValueError as e:
                raise BadRecord("invalid JSON", f"invalid JSON ({first_line(e)})") from None
            except RecursionError:
                raise BadRecord(
                    "nested too deep", "nested deeper than Python's JSON reader goes"
                ) from None
            p, c, r, shape = self.encode(record)
        except TemplateLimitError as e:
            raise ConfigError(
                "data.chat_template",
                f"the chat template went over its limits on {where}: {e}",
                "give a template that renders a conversation in bounded time and size",
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
        self.shapes[shape] += 1
        return self._limit(p, c, r, where)

    def read(self, files: Sequence[str], key: str) -> Pairs:
        """The pairs of every usable record of `files`, in order."""
        out: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]] = ([], [], [])
        for path in files:
            try:
                with open(path, "rb") as f:
                    for number, line in enumerate(f, 1):
                        if line.strip() and (got := self._line(line, f"{path}:{number}", key)):
                            for into, ids in zip(out, got, strict=True):
                                into.append(ids.astype(np.int32))
            except OSError as e:
                raise ConfigError(key, f"cannot read {path} ({e.strerror})", "check it") from e
        return Pairs(*out)

    def report(self) -> str:
        """One clause for the start-up line: pairs, limits, cuts, drops and skips."""
        shapes = ", ".join(f"{n:,} {s}" for s, n in sorted(self.shapes.items()))
        out = f"{sum(self.shapes.values()):,} pairs ({shapes or 'none'})"
        what = {
            "prompts": "prompts cut to data.max_prompt_len",
            "replies": "pairs' replies cut to data.max_completion_len",
            "to fit": "pairs' replies cut to fit run.seq_len + 1",
            "dropped": "pairs over run.seq_len + 1 dropped",
        }
        out += "".join(f"; {n:,} {what[k]}" for k, n in self.cut.items() if n)
        if self.bad:
            parts = [f"{n} {k} (first {self.first_bad[k]})" for k, n in self.bad.items()]
            out += f"; skipped {sum(self.bad.values())} bad record(s): {', '.join(parts)}"
        return out


def _parts(pairs: Pairs) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    return pairs.prompts, pairs.chosen, pairs.rejected


class PreferenceData(StepBatches):
    """Training batches of pairs: 2 rows per pair, chosen block then rejected block."""

    rows_per_example = 2  # nnxtrain.train.feed: a batch of B pairs has 2B rows
    document_mask = False  # one sequence per row, from place 0: nothing to keep apart
    loss_floor: float | None = None

    def __init__(
        self,
        pairs: Pairs,
        val: Pairs | None = None,
        *,
        seq_len: int,
        seed: int,
        shuffle: bool,
        eos_id: int,
        vocab_size: int,
        tokenizer: str,
        tokenizer_digest: str,
        prefetch: int,
        summary: str,
    ):
        super().__init__(seed, shuffle, prefetch)
        self.pairs, self.seq_len, self.eos_id, self.vocab_size = pairs, seq_len, eos_id, vocab_size
        self.val = val if val is not None and len(val) else None
        self.tokenizer, self.tokenizer_digest, self.summary = tokenizer, tokenizer_digest, summary
        self._fingerprint: dict[str, Any] | None = None
        # per pair and side, the tokens of its row (prompt + reply, at most seq_len + 1)
        self._lengths = np.array(
            [[len(p) + len(c), len(p) + len(r)] for p, c, r in zip(*_parts(pairs), strict=True)],
            np.int64,
        ).reshape(-1, 2)

    def check(self, batch_size: int, seq_len: int, evaluate: bool) -> None:
        if not len(self.pairs):
            raise ConfigError("data.path", "no usable pair to train on", "give pairs")
        if evaluate and self.val is None:
            raise ConfigError(
                "data.val_fraction",
                "the held-out split has no pairs",
                "raise data.val_fraction, give data.val_path, or set run.eval_every=0",
            )

    def _which(self, step: int, rows: int, asked: np.ndarray | None, split: str) -> Any:
        """For each asked row: its pair's index, its side (0 chosen, 1 rejected) and
        whether it is real (held-out rows past the split's end are padding)."""
        r = np.arange(rows) if asked is None else np.asarray(asked, np.int64)
        side, j = np.divmod(r, rows // 2)
        g = step * (rows // 2) + j
        if split == "eval":  # held-out batch `step`: pairs step*B .. step*B + B - 1, in order
            assert self.val is not None
            real = g < len(self.val)
            return np.where(real, g, 0), side, real
        epoch, pos = np.divmod(g, len(self.pairs))
        which = IndexShuffle(len(self.pairs), self.seed)(pos, epoch) if self.shuffle else pos
        return np.asarray(which, np.int64), side, np.ones(len(r), bool)

    def count_tokens(self, step: int, batch_size: int, seq_len: int, split: str = "train") -> int:
        which, side, _ = self._which(step, batch_size, None, "train")
        return int(np.sum(self._lengths[which, side] - 1))

    def _make(
        self, step: int, batch_size: int, seq_len: int, split: str, rows: np.ndarray | None
    ) -> Batch:
        which, side, real = self._which(step, batch_size, rows, split)
        shape = (len(which), seq_len)
        out = {
            "inputs": np.full(shape, self.eos_id, np.int32),
            "targets": np.full(shape, self.eos_id, np.int32),
            "weights": np.zeros(shape, np.float32),
        }
        source = self.val if split == "eval" else self.pairs
        assert source is not None
        prompts, chosen, rejected = _parts(source)
        for i, (k, s) in enumerate(zip(which, side, strict=True)):
            if not real[i]:
                continue
            p = prompts[k]
            ids = np.concatenate([p, (chosen if s == 0 else rejected)[k]])
            n = len(ids) - 1
            out["inputs"][i, :n], out["targets"][i, :n] = ids[:-1], ids[1:]
            out["weights"][i, max(len(p) - 1, 0) : n] = 1.0  # the targets that are the reply's
        return out

    def fingerprint(self) -> dict[str, Any]:
        if self._fingerprint is None:
            self._fingerprint = {
                "kind": "preference",
                "tokenizer": self.tokenizer_digest,
                "seq_len": self.seq_len,
                "train_pairs": len(self.pairs),
                "train_digest": self.pairs.digest(),
                "val_pairs": len(self.val) if self.val is not None else 0,
            }
        return self._fingerprint

    def describe(self) -> str:
        held = f"{len(self.val):,} pairs" if self.val is not None else "none"
        return (
            f"data: preference, {self.summary}; one pair is 2 rows of {self.seq_len} "
            f"(chosen, rejected); held-out {held}; tokenizer {self.tokenizer}"
        )
