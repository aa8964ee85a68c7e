"""Digests that prove a restored checkpoint holds the values that were saved.

Orbax checksums its own index (the OCDBT manifest and tree nodes) but not the array
bytes, and Orbax 0.12.8 has no option to (it writes Zarr v2 here; its Zarr v3 writer puts
crc32c on shard indexes only, with no hook for the chunks): a byte flipped in a data file
is restored as a changed value without error. So each save writes, into the checkpoint's
meta JSON, two 32-bit digests per array, computed on the device under jit, and
each restore recomputes them on the restored arrays and compares:

    sum   = Σ word_i                      (mod 2^32)
    mixed = Σ fmix32(word_i ^ key(i))     (mod 2^32)

`word_i` is element i's bits as an unsigned int, i its index in the flattened global
array (64-bit elements count as two 32-bit words; PRNG keys by their key data). 8- and
16-bit elements are shifted to their place in the 32-bit word they share in memory, so
`sum` is the sum of the array's bytes read as little-endian 32-bit words whatever the
dtype. Wrap-around integer sums are exact whatever the order of addition, so the digests
do not depend on how the array is sharded: a checkpoint restored onto another mesh, or
onto another number of processes, still verifies. Any change confined to 4 contiguous
bytes of the array (so any changed element of up to 32 bits) changes `sum`: it changes at
most two adjacent words, by amounts that cannot cancel. `mixed` (murmur3's finaliser of
each word keyed by its index) covers what linear sums miss, such as the sign bit flipped
in two elements, with a chance of about 2^-32 of missing any other damage. Only 8 bytes
per array come to the host. The meta JSON also carries a CRC32 of its own contents, so an
edited or garbled meta (a callback's state, the dataset position) is caught like a
damaged array.
"""

import json
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

SCHEME = "u32 sum + fmix32 sum, v1"
_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}


def _words(x: jax.Array) -> tuple[jax.Array, int]:
    """The array's bits as uint32 (a 64-bit element becomes a trailing pair), and the
    width in bits of each element's word."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32), 8
    if x.dtype.itemsize not in _UINT or jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise TypeError(f"no checkpoint digest for arrays of dtype {x.dtype}")
    words = lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize]).astype(jnp.uint32)
    return words, min(8 * x.dtype.itemsize, 32)


def _index(shape: tuple[int, ...]) -> jax.Array:
    """Each word's flat (row-major) index mod 2^32, built from iotas: a reshape of a
    sharded array could move data between devices, an iota never does."""
    index, stride = jnp.zeros(shape, jnp.uint32), 1
    for dim in reversed(range(len(shape))):
        iota = lax.broadcasted_iota(jnp.uint32, shape, dim)
        index = index + iota * jnp.uint32(stride % 2**32)
        stride *= shape[dim]
    return index


def _fmix32(h: jax.Array) -> jax.Array:
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _digest(x: jax.Array) -> jax.Array:
    words, bits = _words(x)
    index = _index(words.shape)
    if bits < 32:  # in place in the little-endian 32-bit word its bytes share in memory
        words = words << (index % jnp.uint32(32 // bits)) * jnp.uint32(bits)
    key = index * jnp.uint32(0x9E3779B9) + jnp.uint32(0x7F4A7C15)
    zero = jnp.uint32(0)
    # One variadic reduce for both sums: XLA's CPU backend fuses it with the hash, where
    # two integer sums would each run through a materialised temporary (~20x slower).
    total, mixed = lax.reduce(
        (words, _fmix32(words ^ key)),
        (zero, zero),
        lambda a, b: (a[0] + b[0], a[1] + b[1]),
        tuple(range(words.ndim)),
    )
    return jnp.stack([total, mixed])


@jax.jit
def _digests(leaves: list[jax.Array]) -> jax.Array:
    return jnp.stack([_digest(x) for x in leaves]) if leaves else jnp.zeros((0, 2), jnp.uint32)


def digests(leaves: Sequence[Any]) -> list[list[int]]:
    """[sum, mixed] of each array, computed where the arrays live. Every process of a
    multi-process run must call this with the same arrays (it is one global reduction)."""
    table = np.asarray(jax.device_get(_digests(list(leaves))))
    return [[int(a), int(b)] for a, b in table]


def _crc(meta: dict[str, Any]) -> int:
    body = {k: v for k, v in meta.items() if k != "crc32"}
    return zlib.crc32(json.dumps(body, sort_keys=True).encode())


def seal(meta: dict[str, Any], rows: dict[str, list[int]]) -> dict[str, Any]:
    """`meta` (JSON-ready) plus the arrays' digests by name and the CRC32 of the whole."""
    sealed = {**meta, "digests": {"scheme": SCHEME, "arrays": rows}}
    return {**sealed, "crc32": _crc(sealed)}


def check_meta(meta: dict[str, Any]) -> None:
    """Raises ValueError when `meta`'s contents are not those that were saved. One with
    neither digests nor CRC32 was saved before nnxtrain wrote them, and passes."""
    if "crc32" not in meta and "digests" not in meta:
        return
    if meta.get("crc32") != _crc(meta):
        raise ValueError("meta/ differs from what was saved: CRC32 mismatch")
    if not isinstance(meta.get("digests"), dict) or meta["digests"].get("scheme") != SCHEME:
        raise ValueError(f"meta/ has no digests of scheme {SCHEME!r}")


def mismatches(meta: dict[str, Any], names: Sequence[str], leaves: Sequence[Any]) -> list[str]:
    """The names of the arrays whose digests differ from those saved in `meta`."""
    saved = meta["digests"]["arrays"]
    return [
        name for name, row in zip(names, digests(leaves), strict=True) if saved.get(name) != row
    ]
