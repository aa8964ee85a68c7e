"""The key/value cache that generation carries between decode steps.

    cache = KVCache.empty(model.cfg, batch=2, length=64, dtype=jnp.float32)
    logits, cache = model(prompt, positions, cache=cache)      # prefill: slots 0 .. P-1
    logits, cache = model(token[:, None], pos[:, None], cache=cache)  # one decode step

A functional pytree of two arrays, `k` and `v`, each [layers, batch, length, kv_heads,
head_dim]: only the key/value heads are stored (grouped-query attention shares them among
the query heads). Slot `s` of a row holds the keys and values of position `s`, so the
positions handed to the model are also where its new entries are written, and a query at
position `p` sees exactly the slots `0 .. p`. Rows of a batch may therefore sit at
different positions (right-padded prompts of different lengths): a slot past a row's
position may hold a padding token's entry, but it is masked until that row writes its own
entry there. The training step never builds one: `model(tokens)` is the plain forward.

`KVCache.nbytes` is a cache's size before it exists, and `free_bytes` the memory a device
can still allocate, so that generation refuses a cache that cannot fit before allocating.
"""

import os
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from nnxtrain.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer: k, v [layers, batch, length, kv_heads, head_dim]."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, length: int, dtype: jnp.dtype) -> "KVCache":
        """A zeroed cache for `batch` rows of up to `length` positions."""
        shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @staticmethod
    def nbytes(cfg: ModelConfig, batch: int, length: int, dtype: jnp.dtype) -> int:
        """The bytes of `empty(cfg, batch, length, dtype)`, computed without allocating."""
        per_position = cfg.num_layers * cfg.num_kv_heads * cfg.head_dim
        return 2 * batch * length * per_position * np.dtype(dtype).itemsize

    @property
    def length(self) -> int:
        """Positions a row can hold."""
        return int(self.k.shape[2])


def write(cache: jax.Array, layer: jax.Array | int, new: jax.Array, positions: jax.Array):
    """`cache` [layers, batch, length, kv, d] with `new` [batch, t, kv, d] written into
    `layer` at slots `positions` [batch, t] (a scatter into the whole cache, so the
    surrounding loop updates its buffer in place)."""
    rows = jnp.arange(new.shape[0])[:, None]
    return cache.at[layer, rows, positions].set(new.astype(cache.dtype), mode="drop")


def cached_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    positions: jax.Array,
    window: int | jax.Array = 0,
    scale: float | None = None,
    softcap: float = 0.0,
) -> jax.Array:
    """Attention of q [b, t, h, d] at `positions` [b, t] over the cached k, v [b, s, kv, d]:
    slot j is visible to a query at position p when j <= p, and with a sliding `window`
    (> 0; a traced 0 is none) when p - j < window too; `scale` and `softcap` as
    `attention.causal_attention` takes them. The query heads are grouped
    by the key/value head they share, so the cache is read as stored, never repeated."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(q.dtype)) * (scale or d**-0.5)
    if softcap:
        scores = softcap * jnp.tanh(scores / softcap)
    slots = jnp.arange(k.shape[1])[None, None, :]
    visible = slots <= positions[:, :, None]  # [b, t, s]
    if isinstance(window, jax.Array):
        visible &= (slots > positions[:, :, None] - window) | (window == 0)
    elif window:
        visible &= slots > positions[:, :, None] - window
    scores = jnp.where(
        visible[:, None, None], scores.astype(jnp.float32), jnp.finfo(jnp.float32).min
    )
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(q.dtype))
    return out.reshape(b, t, h, d)


def free_bytes(device: jax.Device) -> int | None:
    """The memory `device` can still allocate: its allocator's limit less what is in use
    (GPU, TPU), or for a CPU device the host's available memory (Linux's MemAvailable);
    None where neither is known."""
    stats = device.memory_stats() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    if device.platform != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        pass
    try:  # other Unix: the physical memory, as an upper bound
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None
