"""The key/value cache that generation carries between decode steps.

    cache = KVCache.empty(model.cfg, batch=2, length=64, dtype=jnp.float32)
    logits, cache = model(prompt, positions, cache=cache)      # prefill: positions 0 .. P-1
    logits, cache = model(token[:, None], pos[:, None], cache=cache)  # one decode step

A functional pytree of two stacks of keys and values, each [layers of its kind, batch,
slots, kv_heads, head_dim]: only the key/value heads are stored (grouped-query attention
shares them among the query heads). `k`, `v` hold the global layers (every key stays
visible), one slot per position: `length` slots. `local_k`, `local_v` hold the
sliding-window layers (Mistral's every layer, Gemma's 5 in 6) in a ring of
`min(window, length)` slots: position p goes to slot p % slots, over the key of position
p - slots, which no later query can see. A model without one kind has a stack of 0
layers. A layer's cache is its kind's stack at the layer's index among its kind
(`stack_index`); in a scanned mixed stack the kind rides along the scan, `lax.cond` picks
the stack to attend over, and the write to the other stack is dropped.

Which position a slot holds follows from the call's positions [batch, t] alone, so no
position table is stored: a call's positions are consecutive per row from p0, and every
position before p0 was written by earlier calls (generation prefills from 0, then steps
one token at a time). A slot then holds the latest position before p0 that maps to it,
unless this call wrote it: the call's keys and values are written first (a stack read
before its write would be copied), then attended to straight from the chunk (a prefill
longer than the ring overwrites its own early keys), the slots it wrote masked. A
position of -1 is padding: never written, and it sees no key. So rows of a batch may sit
at different positions (right-padded prompts of different lengths). The training step
never builds a cache: `model(tokens)` is the plain forward.

`KVCache.nbytes` is a cache's size before it exists, and `free_bytes` the memory a device
can still allocate, so that generation refuses a cache that cannot fit before allocating.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from nnxtrain.config import ModelConfig


def layer_kinds(cfg: ModelConfig) -> tuple[bool, ...]:
    """Per layer, whether it is a sliding-window layer (every layer of a model with a
    window; with `global_every`, all but every global_every-th)."""
    every = cfg.global_every if cfg.sliding_window else 0
    return tuple(
        bool(cfg.sliding_window) and (not every or (i + 1) % every != 0)
        for i in range(cfg.num_layers)
    )


def stack_index(cfg: ModelConfig) -> tuple[int, ...]:
    """Per layer, its index in its kind's stack of the cache."""
    kinds = layer_kinds(cfg)
    return tuple(sum(k == kind for k in kinds[:i]) for i, kind in enumerate(kinds))


def _shapes(cfg: ModelConfig, batch: int, length: int) -> tuple[tuple[int, ...], ...]:
    """(the global stack's shape, the local ring's shape)."""
    kinds = layer_kinds(cfg)
    ring = min(cfg.sliding_window, length) if any(kinds) else 0
    tail = (cfg.num_kv_heads, cfg.head_dim)
    return (
        (len(kinds) - sum(kinds), batch, length, *tail),
        (sum(kinds), batch, ring, *tail),
    )


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class KVCache:
    """Keys and values: k, v [global layers, batch, length, kv_heads, head_dim]; local_k,
    local_v [sliding-window layers, batch, min(window, length), kv_heads, head_dim]."""

    k: jax.Array
    v: jax.Array
    local_k: jax.Array
    local_v: jax.Array

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, length: int, dtype: jnp.dtype) -> "KVCache":
        """A zeroed cache for `batch` rows of up to `length` positions."""
        full, ring = _shapes(cfg, batch, length)
        return cls(*(jnp.zeros(s, dtype) for s in (full, full, ring, ring)))

    @staticmethod
    def nbytes(cfg: ModelConfig, batch: int, length: int, dtype: jnp.dtype) -> int:
        """The bytes of `empty(cfg, batch, length, dtype)`, computed without allocating."""
        elements = sum(int(np.prod(s)) for s in _shapes(cfg, batch, length))
        return 2 * elements * np.dtype(dtype).itemsize

    def attend(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        positions: jax.Array,
        index: jax.Array | int,
        local: jax.Array | bool | None,
        window: int,
        scale: float | None = None,
        softcap: float = 0.0,
    ) -> tuple[jax.Array, "KVCache"]:
        """Attention of one layer's q [b, t, h, d] over its cached keys and the chunk's own
        k, v [b, t, kv, d] at `positions` [b, t]; the chunk written into the layer's stack
        at `index`. `local`: the layer's kind where a model has both (a traced flag in a
        scanned stack); the local kind sees the `window` latest keys."""

        def attention(kind: bool) -> Callable[..., jax.Array]:
            def run(k_stack: jax.Array, v_stack: jax.Array) -> jax.Array:
                w = window if kind else 0
                return ring_attention(
                    q, k_stack[index], v_stack[index], k, v, positions, w, scale, softcap
                )

            return run

        if not self.local_k.shape[0] or not self.k.shape[0] or isinstance(local, bool):
            kind = bool(self.local_k.shape[0]) if local is None else bool(local)
            ks, vs = (self.local_k, self.local_v) if kind else (self.k, self.v)
            # written first, then read: a stack read before its write would be copied
            ks, vs = (write(a, index, new, positions, ring=kind) for a, new in ((ks, k), (vs, v)))
            out = attention(kind)(ks, vs)
            if kind:
                return out, KVCache(self.k, self.v, ks, vs)
            return out, KVCache(ks, vs, self.local_k, self.local_v)
        assert local is not None, "a model with both kinds of layer passes each layer's kind"
        # Only the attention is a branch: a branch that returned an updated stack would make
        # XLA copy every stack per layer and step. Both stacks are written, the other
        # kind's write dropped (an index out of range).
        at_local = jnp.where(local, index, self.local_k.shape[0])
        at_global = jnp.where(local, self.k.shape[0], index)
        cache = KVCache(
            write(self.k, at_global, k, positions),
            write(self.v, at_global, v, positions),
            write(self.local_k, at_local, k, positions, ring=True),
            write(self.local_v, at_local, v, positions, ring=True),
        )
        out = jax.lax.cond(
            local,
            lambda: attention(True)(cache.local_k, cache.local_v),
            lambda: attention(False)(cache.k, cache.v),
        )
        return out, cache


def write(
    stack: jax.Array,
    layer: jax.Array | int,
    new: jax.Array,
    positions: jax.Array,
    ring: bool = False,
) -> jax.Array:
    """`stack` [layers, batch, slots, kv, d] with `new` [batch, t, kv, d] written into
    `layer` at slots `positions`, or in a `ring` at `positions % slots` (a scatter into the
    whole stack, so the surrounding loop updates its buffer in place). Padding (-1) is not
    written, nor a position past a global stack's end (generation's last block may run
    past the tokens asked for), nor one that a later one of the same row overwrites (a
    chunk longer than a ring)."""
    slots = stack.shape[2]
    last = jnp.max(positions, axis=1, keepdims=True)
    keep = (positions >= 0) & (positions > last - slots)
    at = jnp.where(keep, positions % slots, slots) if ring else positions
    at = jnp.where(at >= 0, at, slots)  # out of range: dropped
    rows = jnp.arange(new.shape[0])[:, None]
    return stack.at[layer, rows, at].set(new.astype(stack.dtype), mode="drop")


def ring_attention(
    q: jax.Array,
    cached_k: jax.Array,
    cached_v: jax.Array,
    k: jax.Array,
    v: jax.Array,
    positions: jax.Array,
    window: int = 0,
    scale: float | None = None,
    softcap: float = 0.0,
) -> jax.Array:
    """Attention of q [b, t, h, d] at `positions` [b, t] over the cached keys and values
    [b, slots, kv, d] (the chunk already written: its slots are read from the chunk, the
    others hold positions before its first; see the module docstring) and the chunk's own
    k, v [b, t, kv, d]: a key at position j is visible to a query at
    p when 0 <= j <= p, and with a `window` (> 0) when p - j < window too; `scale` and
    `softcap` as `attention.causal_attention` takes them. The query heads are grouped by
    the key/value head they share, so the cache is read as stored, never repeated."""
    b, t, h, d = q.shape
    kv, slots = k.shape[2], cached_k.shape[1]
    slot = jnp.arange(slots)[None]
    before = positions[:, :1] - 1  # the last position written before this call
    held = before - jnp.mod(before - slot, slots)  # [b, slots]; < 0: never written
    # The slots this call wrote (its last `slots` real positions) are read from the chunk.
    last = jnp.max(positions, axis=1, keepdims=True)
    since = jnp.maximum(before + 1, last - slots + 1)
    fresh = jnp.mod(slot - since, slots) < last - since + 1
    held = jnp.where(fresh, -1, held)
    keys = jnp.concatenate([held, positions], axis=1)[:, None, :]  # [b, 1, slots + t]
    p = positions[:, :, None]
    visible = (keys >= 0) & (keys <= p)
    if window:
        visible &= p - keys < window
    q = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.concatenate(
        [
            jnp.einsum("btkgd,bskd->bkgts", q, cached_k.astype(q.dtype)),
            jnp.einsum("btkgd,bskd->bkgts", q, k.astype(q.dtype)),
        ],
        axis=-1,
    ) * (scale or d**-0.5)
    if softcap:
        scores = softcap * jnp.tanh(scores / softcap)
    scores = jnp.where(
        visible[:, None, None], scores.astype(jnp.float32), jnp.finfo(jnp.float32).min
    )
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs[..., :slots], cached_v.astype(q.dtype))
    out += jnp.einsum("bkgts,bskd->btkgd", probs[..., slots:], v.astype(q.dtype))
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
