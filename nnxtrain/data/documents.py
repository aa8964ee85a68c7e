"""Whole documents packed into rows, with segment ids and positions: the dataset of jsonl.

    docs = Documents.build(ids_list, loss_list)      # tokens, and which targets count
    data = DocumentData(train_docs, val_docs, seq_len=128, seed=0, ...)
    data.batch(step, 16, 128)   # inputs, targets, weights, segment_ids, positions

A document of n tokens fills n - 1 places of a row: its inputs are tokens 0..n-2 and its
targets tokens 1..n-1, so it fits when n <= seq_len + 1, and no target ever lies in
another document. Documents never cross rows: `pack` puts them whole into rows of seq_len
places, best-fit decreasing (longest first, each into the fullest row it fits), and
padding fills only what is left at the end of a row. Each place carries a segment id
(0 = padding, 1, 2, ... for the documents of the row, in order) and a position that starts
at 0 in each document; its weight is 1 where the target counts for the loss (the
document's loss mask at the target: 0 on prompts, non-assistant turns and padding).

The packing is fixed at start-up (it depends on the data and seq_len only). Training row j
of step s is the packed row at global index g = s*B + j of a seeded per-epoch permutation
(`IndexShuffle`, as for text), so a batch is a pure function of (seed, step); evaluation
batch i holds held-out rows i*B .. i*B+B-1 in order, rows past the end all padding.
`count_tokens(step, ...)` gives a batch's non-padding places from the packing alone.
Batches always hold segment_ids and positions; `document_mask` (data.document_mask) says
whether the trainer hands them to the model (`nnxtrain.train.feed`).
"""

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from nnxtrain.data.batch import Batch
from nnxtrain.data.shuffle import IndexShuffle
from nnxtrain.data.stepped import StepBatches
from nnxtrain.errors import ConfigError


@dataclass(frozen=True)
class Documents:
    """Documents' tokens and loss masks, concatenated; document i is [starts[i], starts[i+1])."""

    tokens: np.ndarray  # int32
    loss: np.ndarray  # bool: this token counts for the loss when it is a target
    starts: np.ndarray  # int64, len(documents) + 1

    @classmethod
    def build(cls, ids: list[np.ndarray], loss: list[np.ndarray]) -> "Documents":
        starts = np.cumsum([0] + [len(a) for a in ids]).astype(np.int64)
        cat = np.concatenate(ids) if ids else np.zeros(0)
        mask = np.concatenate(loss) if loss else np.zeros(0)
        return cls(cat.astype(np.int32), mask.astype(bool), starts)

    def __len__(self) -> int:
        return len(self.starts) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.starts)

    def split(self, at: int) -> tuple["Documents", "Documents"]:
        """The first `at` documents and the rest."""
        cut = int(self.starts[at])
        return (
            Documents(self.tokens[:cut], self.loss[:cut], self.starts[: at + 1]),
            Documents(self.tokens[cut:], self.loss[cut:], self.starts[at:] - cut),
        )

    def digest(self) -> str:
        h = hashlib.sha1(self.tokens.tobytes())
        h.update(self.loss.tobytes())
        h.update(self.starts.tobytes())
        return h.hexdigest()[:16]


def pack(places: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing: (documents in row order, row starts into it) for documents that
    take `places` (each 1..seq_len) of rows of `seq_len`. Row r holds documents
    order[row_starts[r]:row_starts[r+1]]."""
    by_free: list[list[int]] = [[] for _ in range(seq_len + 1)]  # open rows by free places
    free_bits = 0  # bit f set: some open row has exactly f free places
    row_of = np.empty(len(places), np.int64)
    rows = 0
    # longest first; ties in file order (a stable sort), so the packing is deterministic
    longest_first = np.argsort(-np.asarray(places), kind="stable")
    for d in longest_first.tolist():
        need = int(places[d])
        fits = free_bits >> need
        if fits:  # the row with the fewest free places that still fit this document
            free = need + (fits & -fits).bit_length() - 1
            row = by_free[free].pop()
            if not by_free[free]:
                free_bits &= ~(1 << free)
        else:
            row, free, rows = rows, seq_len, rows + 1
        row_of[d] = row
        if free - need:
            by_free[free - need].append(row)
            free_bits |= 1 << (free - need)
    # each row's documents in the order they were placed (longest first)
    placed = np.empty(len(places), np.int64)
    placed[longest_first] = np.arange(len(places))
    order = np.lexsort((placed, row_of))
    row_starts = np.concatenate([[0], np.cumsum(np.bincount(row_of, minlength=rows))])
    return order, row_starts.astype(np.int64)


@dataclass(frozen=True)
class Packed:
    """Documents packed into rows of seq_len places."""

    docs: Documents
    order: np.ndarray
    row_starts: np.ndarray
    seq_len: int

    @classmethod
    def of(cls, docs: Documents, seq_len: int) -> "Packed":
        return cls(docs, *pack(docs.lengths - 1, seq_len), seq_len)

    @property
    def rows(self) -> int:
        return len(self.row_starts) - 1

    @property
    def row_places(self) -> np.ndarray:
        """Places each row's documents fill (the rest of the row is padding)."""
        filled = np.concatenate([[0], np.cumsum((self.docs.lengths - 1)[self.order])])
        return np.diff(filled[self.row_starts])

    @property
    def efficiency(self) -> float:
        """The share of places that hold a document (not padding)."""
        used = int((self.docs.lengths - 1).sum())
        return used / (self.rows * self.seq_len) if self.rows else 0.0

    def fill(self, row: int, out: dict[str, np.ndarray], i: int) -> None:
        """Writes packed row `row` into row i of the batch arrays `out`."""
        d, place = self.docs, 0
        for seg, doc in enumerate(self.order[self.row_starts[row] : self.row_starts[row + 1]]):
            a, b = int(d.starts[doc]), int(d.starts[doc + 1])
            end = place + b - a - 1
            out["inputs"][i, place:end] = d.tokens[a : b - 1]
            out["targets"][i, place:end] = d.tokens[a + 1 : b]
            out["weights"][i, place:end] = d.loss[a + 1 : b]
            out["segment_ids"][i, place:end] = seg + 1
            out["positions"][i, place:end] = np.arange(end - place)
            place = end


class DocumentData(StepBatches):
    """Training and held-out batches of packed documents."""

    def __init__(
        self,
        train: Documents,
        val: Documents | None,
        *,
        seq_len: int,
        seed: int,
        shuffle: bool = True,
        eos_id: int,
        vocab_size: int,
        tokenizer: str = "",
        tokenizer_digest: str = "",
        prefetch: int = 2,
        kind: str = "jsonl",
        summary: str = "",
        val_key: str = "data.val_fraction",
        document_mask: bool = True,
    ):
        super().__init__(seed, shuffle, prefetch)
        # Batches always hold segment_ids and positions; whether the steps get them (and
        # attention stays inside each document) is this switch (nnxtrain.train.feed reads it).
        self.document_mask = document_mask
        self.train = Packed.of(train, seq_len)
        self.val = Packed.of(val, seq_len) if val is not None and len(val) else None
        self.seq_len, self.eos_id, self.vocab_size = seq_len, eos_id, vocab_size
        self.kind, self.tokenizer, self.tokenizer_digest = kind, tokenizer, tokenizer_digest
        self.summary, self.val_key = summary, val_key
        self._train_places = self.train.row_places  # count_tokens runs every step
        self.loss_floor: float | None = None
        self._fingerprint: dict[str, Any] | None = None

    def check(self, batch_size: int, seq_len: int, evaluate: bool) -> None:
        """Fails in one line when there is nothing to train or evaluate on."""
        if seq_len != self.seq_len:
            raise ValueError(f"packed for seq_len {self.seq_len}, asked for {seq_len}")
        if not self.train.rows:
            raise ConfigError("data.path", "no records to train on", "give records")
        if evaluate and self.val is None:
            raise ConfigError(
                self.val_key,
                "the held-out split has no records",
                "raise data.val_fraction, give data.val_path, or set run.eval_every=0",
            )

    def _rows(
        self, step: int, batch_size: int, seq_len: int, split: str, rows: np.ndarray | None
    ) -> tuple[Packed, np.ndarray, np.ndarray]:
        """The packing, and for each asked batch row its packed row and whether it is real
        (eval rows past the end of the held-out split are all padding)."""
        self.check(batch_size, seq_len, evaluate=split != "train")
        r = np.arange(batch_size) if rows is None else np.asarray(rows, np.int64)
        g = step * batch_size + r
        if split == "train":
            packed = self.train
            epoch, pos = np.divmod(g, packed.rows)
            which = IndexShuffle(packed.rows, self.seed)(pos, epoch) if self.shuffle else pos
            real = np.ones(len(r), bool)
        elif split == "eval":
            assert self.val is not None
            packed = self.val
            real = g < packed.rows
            which = np.where(real, g, 0)
        else:
            raise ValueError(f"unknown split {split!r}")
        return packed, which, real

    def count_tokens(self, step: int, batch_size: int, seq_len: int, split: str = "train") -> int:
        """Non-padding places of the global batch `step`: tokens/s counts these."""
        packed, which, real = self._rows(step, batch_size, seq_len, split, None)
        places = self._train_places if packed is self.train else packed.row_places
        return int(np.sum(places[which] * real))

    def _make(
        self, step: int, batch_size: int, seq_len: int, split: str, rows: np.ndarray | None
    ) -> Batch:
        packed, which, real = self._rows(step, batch_size, seq_len, split, rows)
        shape = (len(which), seq_len)
        out = {
            "inputs": np.full(shape, self.eos_id, np.int32),
            "targets": np.full(shape, self.eos_id, np.int32),
            "weights": np.zeros(shape, np.float32),
            "segment_ids": np.zeros(shape, np.int32),
            "positions": np.zeros(shape, np.int32),
        }
        for i in np.flatnonzero(real):
            packed.fill(int(which[i]), out, int(i))
        return out

    def fingerprint(self) -> dict[str, Any]:
        if self._fingerprint is None:
            val = self.val.docs if self.val is not None else None
            self._fingerprint = {
                "kind": self.kind,
                "tokenizer": self.tokenizer_digest,
                "seq_len": self.seq_len,
                "train_documents": len(self.train.docs),
                "train_digest": self.train.docs.digest(),
                "val_documents": len(val) if val is not None else 0,
                "val_digest": val.digest() if val is not None else "",
            }
        return self._fingerprint

    def describe(self) -> str:
        t, v = self.train, self.val
        held = f"{len(v.docs):,} documents in {v.rows:,} rows" if v is not None else "none"
        return (
            f"data: {self.kind}, {self.summary}; packed into {t.rows:,} rows of "
            f"{self.seq_len}: packing efficiency {t.efficiency:.3f} (non-padding share); "
            f"held-out {held}; document mask {'on' if self.document_mask else 'off'}; "
            f"tokenizer {self.tokenizer}"
        )
