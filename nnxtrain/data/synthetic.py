"""Learnable synthetic tokens from a fixed random first-order Markov source.

Each token has `branching` likely successors with random (Dirichlet) probabilities, mixed
with a small uniform floor so that the chain is ergodic. The source's entropy rate, in
nats per token, is the lowest loss any model can reach on it: the trainer prints it as
the loss floor, so the default run shows real learning against a known target.

Batches are a pure function of (seed, step): any step's batch can be regenerated, and a
resumed run sees exactly the batches it would have seen.
"""

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from nnxtrain.data.batch import Batch


@dataclass(frozen=True)
class MarkovSource:
    """The chain: successors[i] with probabilities probs[i]; uniform mass `floor` on all."""

    successors: np.ndarray  # [vocab, branching] int32
    probs: np.ndarray  # [vocab, branching] float64, rows sum to 1
    floor: float  # probability of a uniformly random next token

    @classmethod
    def create(
        cls, vocab_size: int, branching: int, seed: int, floor: float = 0.02
    ) -> "MarkovSource":
        rng = np.random.default_rng(seed)
        successors = np.stack(
            [rng.choice(vocab_size, size=branching, replace=False) for _ in range(vocab_size)]
        ).astype(np.int32)
        probs = rng.dirichlet(np.ones(branching), size=vocab_size)
        return cls(successors, probs, floor)

    @property
    def vocab_size(self) -> int:
        return int(self.successors.shape[0])

    @cached_property
    def stationary(self) -> np.ndarray:
        """The stationary distribution, by power iteration on the sparse chain."""
        v = self.vocab_size
        pi = np.full(v, 1.0 / v)
        for _ in range(500):
            nxt = np.full(v, self.floor / v)
            np.add.at(nxt, self.successors, (1 - self.floor) * pi[:, None] * self.probs)
            pi = nxt / nxt.sum()
        return pi

    def entropy_rate(self) -> float:
        """H = -sum_i pi_i sum_j P_ij log P_ij, in nats per token: the loss floor."""
        v, k = self.successors.shape
        uniform = self.floor / v
        p_succ = (1 - self.floor) * self.probs + uniform
        row_h = -(p_succ * np.log(p_succ)).sum(axis=1) - (v - k) * uniform * np.log(uniform)
        return float(self.stationary @ row_h)

    def sample(self, rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
        """Token sequences [batch, length] started from the stationary distribution."""
        v, k = self.successors.shape
        cum = np.cumsum(self.probs, axis=1)
        # All random draws up front: the loop below only indexes (it runs on the host
        # while the device trains, so it should cost little).
        first = rng.choice(v, size=batch, p=self.stationary)
        u = rng.random((length, batch, 1))
        jump = rng.random((length, batch)) < self.floor
        anywhere = rng.integers(0, v, size=(length, batch), dtype=np.int32)
        out = np.empty((length, batch), np.int32)
        out[0] = first
        for t in range(1, length):
            prev = out[t - 1]
            pick = np.minimum((cum[prev] < u[t]).sum(axis=1), k - 1)
            out[t] = np.where(jump[t], anywhere[t], self.successors[prev, pick])
        return np.ascontiguousarray(out.T)


class SyntheticData:
    """Batches for step s: inputs, next-token targets and weights (all ones: no padding)."""

    def __init__(self, vocab_size: int, branching: int, source_seed: int, seed: int):
        self.source = MarkovSource.create(vocab_size, branching, source_seed)
        self.seed = seed
        self.loss_floor = self.source.entropy_rate()
        self.document_mask = False  # one endless stream: no documents to keep apart

    def count_tokens(self, step: int, batch_size: int, seq_len: int, split: str = "train") -> int:
        """Non-padding places of a batch: all of them (synthetic rows are never padded)."""
        return batch_size * seq_len

    def batch(
        self,
        step: int,
        batch_size: int,
        seq_len: int,
        split: str = "train",
        rows: np.ndarray | None = None,
    ) -> Batch:
        """Rows `rows` (default: all) of the global batch of `step`; `split="eval"` draws
        from a separate stream."""
        stream = 0 if split == "train" else 1
        rng = np.random.default_rng([self.seed, stream, step])
        tokens = self.source.sample(rng, batch_size, seq_len + 1)
        if rows is not None:  # the chain is sampled for all rows at once: take ours
            tokens = tokens[rows]
        batch_size = len(tokens)
        return {
            "inputs": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "weights": np.ones((batch_size, seq_len), np.float32),
        }
