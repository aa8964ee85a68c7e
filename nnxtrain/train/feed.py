"""Batch placement: the dataset's host batches, laid out on the mesh as global arrays.

    feed = Feed(dataset, mesh, batch_size=16, seq_len=128)
    batch = feed.train(step)            # dict of global jax.Arrays, split over data x fsdp
    feed.spec()                         # their ShapeDtypeStructs, to compile the steps for
    feed.count_tokens(step)             # its non-padding tokens (for tokens/s)

Each process asks the dataset only for the global rows its own devices hold
(`process_rows`), so a multi-host run reads each row once. Reading ahead is the dataset's
job (its prefetch thread); the loop asks for step N+1's batch while the device runs step
N, so placing it overlaps with the device's work.

With the dataset's document mask on (`dataset.document_mask`, from data.document_mask)
batches also carry `segment_ids` and `positions`, and `spec()` lists them, so the steps are
compiled to keep packed documents apart; with it off they hold exactly the three keys of
BATCH_DTYPES (the compiled steps are then the same as without documents).
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from nnxtrain.data import process_rows
from nnxtrain.parallel.mesh import batch_sharding

# What every batch holds: inputs and targets [batch, length], and the targets' weights
# (0 marks padding that the loss ignores).
BATCH_DTYPES = {"inputs": jnp.int32, "targets": jnp.int32, "weights": jnp.float32}
# What a batch also holds with the document mask on: each place's document (1, 2, ... per
# row; 0 = padding) and its position in that document. Other keys a dataset returns (the
# segments of a jsonl run with the mask off) are not placed.
DOCUMENT_DTYPES = {"segment_ids": jnp.int32, "positions": jnp.int32}


class Feed:
    """Turns `dataset.batch(step, batch_size, seq_len, split, rows)` into global arrays."""

    def __init__(self, dataset: Any, mesh: Mesh, batch_size: int, seq_len: int):
        # a preference dataset gives two rows (chosen, rejected) per example of the batch
        rows = batch_size * getattr(dataset, "rows_per_example", 1)
        self.dataset, self.shape = dataset, (rows, seq_len)
        self.sharding = batch_sharding(mesh)
        self.rows = process_rows(self.sharding, rows)  # None: this process holds all
        self.dtypes = dict(BATCH_DTYPES)
        if getattr(dataset, "document_mask", False):
            self.dtypes.update(DOCUMENT_DTYPES)

    def spec(self) -> dict[str, jax.ShapeDtypeStruct]:
        """The batch's shapes, dtypes and shardings (what the steps are compiled for)."""
        return {
            k: jax.ShapeDtypeStruct(self.shape, dtype, sharding=self.sharding)
            for k, dtype in self.dtypes.items()
        }

    def count_tokens(self, step: int) -> int:
        """Non-padding tokens of train step `step`'s global batch (tokens/s counts these):
        the dataset's `count_tokens`, else every place. Host-side, and reads no batch. The
        FLOPs and MFU stay per full row: the device computes the padding too."""
        count = getattr(self.dataset, "count_tokens", None)
        if count is None:  # a dataset handed in from Python without the method
            return self.shape[0] * self.shape[1]
        return int(count(step, *self.shape))

    def train(self, step: int) -> dict[str, jax.Array]:
        """The batch of train step `step` (0-based), placed on the mesh."""
        return self._put(self.dataset.batch(step, *self.shape, rows=self.rows))

    def eval(self, index: int) -> dict[str, jax.Array]:
        """Held-out batch number `index`, placed on the mesh."""
        return self._put(self.dataset.batch(index, *self.shape, "eval", rows=self.rows))

    def _put(self, host: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        # `host` holds only this process's rows; the global array is assembled from them.
        return {
            k: jax.make_array_from_process_local_data(
                self.sharding, np.asarray(host[k], dtype), self.shape
            )
            for k, dtype in self.dtypes.items()
        }
