"""Step-indexed batches, read ahead on a background thread, with a resumable position.

    class MyData(StepBatches):
        def _make(self, step, batch_size, seq_len, split, rows): ...  # pure in (seed, step)
        def fingerprint(self): ...                                     # what must not change

    data.batch(step, 16, 128)                   # the global batch of training step `step`
    data.batch(i, 16, 128, split="eval")        # i-th held-out batch (never read ahead)

The datasets that read files (`packing.PackedData` for text and tokens,
`documents.DocumentData` for jsonl) share this: a training batch is a pure function of
(seed, step), so the next `prefetch` batches can be made on a thread while the device runs
the step, and a resumed run needs only the step. `state_dict()` records the position, the
seed, the shuffle switch and the subclass's fingerprint of the data; `load_state_dict()`
restores the position and warns if any of them changed since.
"""

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from nnxtrain.data.batch import Batch
from nnxtrain.data.text import log

STATE_FORMAT = 1


class StepBatches:
    """The serving half of a dataset: prefetch, position and state; `_make` makes batches."""

    def __init__(self, seed: int, shuffle: bool, prefetch: int):
        self.seed, self.shuffle = int(seed), shuffle
        self.next_step = 0  # the training batch after the last one served
        self._prefetch = prefetch
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: dict[tuple[Any, ...], Future[Batch]] = {}

    def _make(
        self, step: int, batch_size: int, seq_len: int, split: str, rows: np.ndarray | None
    ) -> Batch:
        """Rows `rows` (None: all) of batch `step` of `split`; a pure function of its inputs."""
        raise NotImplementedError

    def fingerprint(self) -> dict[str, Any]:
        """What must be unchanged for a resumed run to read the same batches."""
        raise NotImplementedError

    def batch(
        self,
        step: int,
        batch_size: int,
        seq_len: int,
        split: str = "train",
        rows: np.ndarray | None = None,
    ) -> Batch:
        """Rows `rows` (default: all) of the global batch `step` of `split`."""
        if split != "train":
            return self._make(step, batch_size, seq_len, split, rows)
        key = (step, batch_size, seq_len, None if rows is None else tuple(rows.tolist()))
        fut = self._ahead.pop(key, None)
        out = fut.result() if fut is not None else self._make(*key[:3], split, rows)
        self.next_step = step + 1
        if self._prefetch > 0:
            self._schedule(key, rows)
        return out

    def next_batch(self, batch_size: int, seq_len: int, rows: np.ndarray | None = None) -> Batch:
        """The training batch after the last one served (iterator-style use)."""
        return self.batch(self.next_step, batch_size, seq_len, rows=rows)

    def _schedule(self, key: tuple[Any, ...], rows: np.ndarray | None) -> None:
        step = key[0]
        for stale in [k for k in self._ahead if k[0] <= step or k[1:] != key[1:]]:
            self._ahead.pop(stale).cancel()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="nnxtrain-data")
        for s in range(step + 1, step + 1 + self._prefetch):
            k = (s, *key[1:])
            if k not in self._ahead:
                self._ahead[k] = self._pool.submit(self._make, s, key[1], key[2], "train", rows)

    def state_dict(self) -> dict[str, Any]:
        """The position (next training step), seed, shuffle and the data's fingerprint."""
        return {
            "format": STATE_FORMAT,
            "next_step": self.next_step,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "fingerprint": self.fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues from `state`; warns when the data or order differ from the saved run."""
        changed = [
            k for k, v in state.get("fingerprint", {}).items() if self.fingerprint().get(k) != v
        ]
        if state.get("seed", self.seed) != self.seed:
            changed.append(f"seed {state['seed']} -> {self.seed}")
        if state.get("shuffle", self.shuffle) != self.shuffle:
            changed.append("data.shuffle")
        if changed:
            log.warning(
                "data: the dataset differs from the checkpoint's (%s); the resumed run will "
                "not see the batches the original run would have",
                ", ".join(changed),
            )
        self.next_step = int(state.get("next_step", 0))
        self.close()

    def close(self) -> None:
        """Drops prefetched batches and stops the background thread."""
        for fut in self._ahead.values():
            fut.cancel()
        self._ahead.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
