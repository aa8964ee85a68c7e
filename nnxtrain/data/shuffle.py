"""A random permutation of 0..n-1 that maps any index on its own, in O(1) memory.

    perm = IndexShuffle(n, seed=0)
    perm(np.arange(n), epoch=0)          # a permutation of 0..n-1 (a new one each epoch)
    perm(np.array([5]), epoch=3)         # where position 5 lands in epoch 3, without the rest

Training reads sequence `perm(pos, epoch)` at position `pos` of an epoch. Materialising a
permutation would cost 8 bytes per sequence and a full pass at each epoch; this one is a
4-round Feistel network on the smallest even number of bits covering n, keyed by
(seed, epoch), with cycle-walking to stay below n (the same idea as grain's index
shuffle). Integer arithmetic only, so the order is identical on every machine and process.
"""

import numpy as np

_M64 = (1 << 64) - 1


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fast, well-mixing hash of uint64 values."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class IndexShuffle:
    """Bijection of 0..n-1 for each (seed, epoch)."""

    rounds = 4

    def __init__(self, n: int, seed: int):
        self.n = int(n)
        bits = max(2, (self.n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)
        self.seed = int(seed) & _M64

    def __call__(self, pos: np.ndarray, epoch: np.ndarray | int) -> np.ndarray:
        """The shuffled index of each position (int64), each with its own epoch."""
        pos = np.asarray(pos, np.int64)
        if self.n <= 1:
            return np.zeros_like(pos)
        with np.errstate(over="ignore"):
            key = _mix(np.uint64(self.seed) ^ _mix(np.asarray(epoch, np.uint64)))
            key = np.broadcast_to(key, pos.shape)
            round_keys = np.stack([_mix(key + np.uint64(r)) for r in range(self.rounds)])
            x = self._encrypt(pos.astype(np.uint64), round_keys)
            out = np.flatnonzero(x >= np.uint64(self.n))
            while len(out):  # cycle-walk: a few rounds at most, since 2**bits < 4n
                x[out] = self._encrypt(x[out], round_keys[:, out])
                out = out[x[out] >= np.uint64(self.n)]
        return x.astype(np.int64)

    def _encrypt(self, x: np.ndarray, round_keys: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x >> h, x & self.mask
        for rk in round_keys:
            left, right = right, left ^ (_mix(right ^ rk) & self.mask)
        return (left << h) | right
