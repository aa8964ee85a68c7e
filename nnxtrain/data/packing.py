"""Packed token streams cut into fixed-length sequences: the dataset behind text and tokens.

    train = TokenStream([np.load("train.npy", mmap_mode="r")])
    data = PackedData(train, val, seed=0, ...)
    data.batch(step, batch_size=16, seq_len=128)              # the global batch of `step`
    data.batch(step, 16, 128, rows=np.array([8, 9, ..., 15]))  # only this process's rows
    data.batch(i, 16, 128, split="eval")                      # i-th held-out batch

Documents, each followed by EOS, are concatenated into one stream (across files too) and
cut into windows of `seq_len + 1` tokens that overlap by one: window w holds the stream's
tokens w*L .. w*L+L, its inputs are the first L and its targets the last L, so every
token of the stream is a target exactly once per epoch. The last window is padded with EOS
and its padding targets have weight 0.

Training sequence j of step s is global index g = s*B + j; epoch e = g // n and position
g % n go through a seeded permutation of the n windows (`IndexShuffle`), so the batch of
any step is a pure function of (seed, step): a resumed run, any process, and any prefetch
thread read exactly what the uninterrupted run reads. Evaluation batch i holds held-out
windows i*B .. i*B+B-1 in order (rows past the end are all padding, weight 0), so every
evaluation scores the same tokens, each once.

With the document mask on (`document_mask=True`, data.document_mask), each batch also
holds `segment_ids` and `positions` [batch, seq_len] computed from the row's inputs: a new
segment starts after each EOS input (the EOS belongs to the document it ends), so a
document cut by a window boundary starts again at segment 1, position 0 in the next
window; padding places (past the stream's end) get segment 0. `count_tokens(step, ...)`
counts the non-padding places of a batch without reading it.

A background thread prepares the next `prefetch` training batches while the device runs
the step, and `state_dict()` / `load_state_dict()` keep the position across a resume
(`nnxtrain.data.stepped.StepBatches`); the fingerprint holds the token counts and a hash
of each split's ends.
"""

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from nnxtrain.data.batch import Batch
from nnxtrain.data.shuffle import IndexShuffle
from nnxtrain.data.stepped import StepBatches
from nnxtrain.errors import ConfigError, UserError


class TokenStream:
    """Several 1-D token arrays (in memory or memory-mapped) read as one, over [lo, hi)."""

    def __init__(
        self, arrays: Sequence[np.ndarray], names: Sequence[str] = (), lo: int = 0, hi: int = -1
    ):
        self.arrays = list(arrays)
        self.names = list(names) or [f"array {i}" for i in range(len(self.arrays))]
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])
        total = int(self.starts[-1])
        self.lo, self.hi = lo, total if hi < 0 else hi

    def __len__(self) -> int:
        return self.hi - self.lo

    def split(self, at: int) -> tuple["TokenStream", "TokenStream"]:
        """The first `at` tokens and the rest (views: nothing is copied)."""
        cut = self.lo + at
        return (
            TokenStream(self.arrays, self.names, self.lo, cut),
            TokenStream(self.arrays, self.names, cut, self.hi),
        )

    def read(self, starts: np.ndarray, length: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows of `length` tokens from each start (relative to lo), and each row's valid
        length; tokens past the end are `pad`. Rows are int64, whatever the files hold, so
        that ids are checked before anything narrows them (an int64 id >= 2**31 would
        wrap around in int32)."""
        out = np.full((len(starts), length), pad, np.int64)
        valid = np.zeros(len(starts), np.int64)
        for r, start in enumerate(starts):
            a, b = self.lo + int(start), min(self.lo + int(start) + length, self.hi)
            valid[r] = max(b - a, 0)
            pos = a
            while pos < b:
                f = int(np.searchsorted(self.starts, pos, side="right")) - 1
                end = min(b, int(self.starts[f + 1]))
                off = int(self.starts[f])
                out[r, pos - a : end - a] = self.arrays[f][pos - off : end - off]
                pos = end
        return out, valid

    def head_and_tail_digest(self, k: int = 1 << 14) -> str:
        """A hash of the first and last k tokens and the length: cheap, catches edits."""
        n = len(self)
        rows, _ = self.read(np.array([0, max(n - k, 0)]), min(k, n), 0)
        h = hashlib.sha1(rows.astype(np.int32).tobytes())  # as digested since format 1
        h.update(str(n).encode())
        return h.hexdigest()[:16]


class PackedData(StepBatches):
    """Fixed-length training and held-out batches over packed token streams."""

    def __init__(
        self,
        train: TokenStream,
        val: TokenStream | None,
        *,
        kind: str,
        seed: int,
        shuffle: bool = True,
        eos_id: int,
        vocab_size: int | None,
        id_limit: int,
        tokenizer: str = "",
        tokenizer_digest: str = "",
        prefetch: int = 2,
        train_key: str = "data.path",
        val_key: str = "data.val_fraction",
        document_mask: bool = False,
        seq_len: int = 0,
    ):
        super().__init__(seed, shuffle, prefetch)
        self.train, self.val = train, val
        self.document_mask = document_mask  # emit segment_ids and positions
        self.seq_len = seq_len  # the run's (0: unknown), for describe()
        self.kind = kind
        self.eos_id = eos_id
        self.vocab_size = vocab_size  # the tokenizer's; None: ids are only checked
        self.id_limit = id_limit  # every token id must be below this
        self.tokenizer = tokenizer
        self.tokenizer_digest = tokenizer_digest
        self.train_key, self.val_key = train_key, val_key
        self.loss_floor: float | None = None  # unknown for real data
        self._fingerprint: dict[str, Any] | None = None

    # -- sizes and checks ----------------------------------------------------------------

    @staticmethod
    def num_windows(tokens: int, seq_len: int) -> int:
        """Sequences of seq_len targets a stream of `tokens` tokens gives (last one padded)."""
        return -(-(tokens - 1) // seq_len) if tokens > 1 else 0

    def check(self, batch_size: int, seq_len: int, evaluate: bool) -> None:
        """Fails in one line if the splits are too small for this batch shape."""
        if len(self.train) < seq_len + 1:
            raise ConfigError(
                self.train_key,
                f"the training split has {len(self.train)} tokens, fewer than one sequence "
                f"(run.seq_len + 1 = {seq_len + 1})",
                "give a longer corpus, lower run.seq_len or hold out less (data.val_fraction)",
            )
        if evaluate:
            n_val = self.num_windows(len(self.val), seq_len) if self.val is not None else 0
            if n_val < batch_size:
                raise ConfigError(
                    self.val_key,
                    f"the held-out split has {len(self.val) if self.val else 0} tokens = "
                    f"{n_val} sequence(s) of run.seq_len={seq_len}, fewer than one batch "
                    f"of run.batch_size={batch_size}",
                    "raise data.val_fraction, give a longer data.val_path, lower "
                    "run.batch_size or run.seq_len, or set run.eval_every=0",
                )

    # -- batches -------------------------------------------------------------------------

    def _windows(
        self, step: int, batch_size: int, seq_len: int, split: str, rows: np.ndarray | None
    ) -> tuple[TokenStream, np.ndarray, np.ndarray]:
        """The stream, and for each asked row its window and whether it is real (eval rows
        past the end of the held-out split are all padding)."""
        r = np.arange(batch_size) if rows is None else np.asarray(rows, np.int64)
        g = step * batch_size + r
        if split == "train":
            stream = self.train
            n = self.num_windows(len(stream), seq_len)
            epoch, pos = np.divmod(g, n)
            windows = IndexShuffle(n, self.seed)(pos, epoch) if self.shuffle else pos
            real = np.ones(len(r), bool)
        elif split == "eval":
            n = self.num_windows(len(self.val), seq_len) if self.val is not None else 0
            if n < batch_size:  # none held out, or too little: raises, naming the key
                self.check(batch_size, seq_len, evaluate=True)
            assert self.val is not None
            stream = self.val
            real = g < n
            windows = np.where(real, g, 0)
        else:
            raise ValueError(f"unknown split {split!r}")
        return stream, windows, real

    def count_tokens(self, step: int, batch_size: int, seq_len: int, split: str = "train") -> int:
        """Non-padding places of the global batch `step` (inputs whose target is a real
        token): tokens/s counts these. Reads no token."""
        stream, windows, real = self._windows(step, batch_size, seq_len, split, None)
        targets = np.clip(len(stream) - windows * seq_len - 1, 0, seq_len)
        return int(np.sum(targets * real))

    def _make(
        self, step: int, batch_size: int, seq_len: int, split: str, rows: np.ndarray | None
    ) -> Batch:
        stream, windows, real = self._windows(step, batch_size, seq_len, split, rows)
        tokens, valid = stream.read(windows * seq_len, seq_len + 1, self.eos_id)
        top, bottom = int(tokens.max(initial=0)), int(tokens.min(initial=0))
        if top >= self.id_limit:
            raise UserError(
                f"{self.train_key}: token id {top} is not below the vocabulary size "
                f"{self.id_limit} (files {', '.join(stream.names[:3])}). Fix: give the "
                "tokenizer the corpus was made with (data.tokenizer) or a larger "
                "model.vocab_size with data.vocab_size_from_tokenizer=false."
            )
        if bottom < 0:
            raise UserError(
                f"{self.train_key}: token id {bottom} is negative (files "
                f"{', '.join(stream.names[:3])}). Fix: token files hold ids >= 0; rebuild "
                "them with python -m nnxtrain.data.pretokenize."
            )
        tokens = tokens.astype(np.int32)  # every id is in [0, id_limit): nothing wraps
        weights = (np.arange(seq_len)[None, :] < (valid[:, None] - 1)) & real[:, None]
        batch = {
            "inputs": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "weights": weights.astype(np.float32),
        }
        if self.document_mask:
            inside = (np.arange(seq_len)[None, :] < valid[:, None]) & real[:, None]
            batch.update(segments_after_eos(batch["inputs"], self.eos_id, inside))
        return batch

    # -- state ---------------------------------------------------------------------------

    def fingerprint(self) -> dict[str, Any]:
        if self._fingerprint is None:
            self._fingerprint = {
                "kind": self.kind,
                "tokenizer": self.tokenizer_digest,
                "train_tokens": len(self.train),
                "train_digest": self.train.head_and_tail_digest(),
                "val_tokens": len(self.val) if self.val is not None else 0,
                "val_digest": self.val.head_and_tail_digest() if self.val is not None else "",
            }
        return self._fingerprint

    def efficiency(self, seq_len: int) -> float:
        """The non-padding share of the training windows' places (only the last is padded)."""
        n = self.num_windows(len(self.train), seq_len)
        return (len(self.train) - 1) / (n * seq_len) if n else 0.0

    def describe(self) -> str:
        val = f"{len(self.val):,}" if self.val is not None else "none"
        packing = ""
        if self.seq_len:
            eff = self.efficiency(self.seq_len)
            packing = f"; packing efficiency {eff:.3f} (non-padding share)"
        mask = "on" if self.document_mask else "off"
        return (
            f"data: {self.kind}, {len(self.train):,} training tokens, held-out {val}{packing}; "
            f"document mask {mask}; tokenizer {self.tokenizer or 'none'}"
        )


def segments_after_eos(
    inputs: np.ndarray, eos_id: int, inside: np.ndarray
) -> dict[str, np.ndarray]:
    """Segment ids (1, 2, ... per row; 0 where `inside` is false: padding) and positions
    (0 at each segment's first place) of rows of `inputs`: a segment ends with, and
    includes, each EOS; the next starts after it."""
    length = inputs.shape[1]
    is_eos = inputs == eos_id
    # EOS strictly before each place: its segment's number, less one
    before = np.cumsum(is_eos, axis=1) - is_eos
    place = np.arange(length)[None, :]
    # the first place of each place's segment: one past the last EOS before it (else 0)
    after_eos = np.where(is_eos, place + 1, 0)
    shifted = np.concatenate([np.zeros_like(after_eos[:, :1]), after_eos[:, :-1]], axis=1)
    start = np.maximum.accumulate(shifted, axis=1)
    return {
        "segment_ids": np.where(inside, before + 1, 0).astype(np.int32),
        "positions": np.where(inside, place - start, 0).astype(np.int32),
    }
