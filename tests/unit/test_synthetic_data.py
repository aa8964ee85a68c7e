"""Synthetic Markov data: reproducible batches, shifted targets, and an honest loss floor."""

import math

import numpy as np
import pytest

from nnxtrain import compose
from nnxtrain.data import MarkovSource, SyntheticData, build_dataset

VOCAB, BRANCHING = 8, 3


def data(seed: int = 0) -> SyntheticData:
    return SyntheticData(VOCAB, BRANCHING, source_seed=7, seed=seed)


def dense_transitions(src: MarkovSource) -> np.ndarray:
    """P[i, j]: probability of token j after token i, as a dense matrix."""
    v = src.vocab_size
    p = np.full((v, v), src.floor / v)
    for i in range(v):
        p[i, src.successors[i]] += (1 - src.floor) * src.probs[i]
    return p


def test_batch_shapes_dtypes_and_range():
    b = data().batch(3, batch_size=4, seq_len=10)
    assert set(b) == {"inputs", "targets", "weights"}
    for key in ("inputs", "targets", "weights"):
        assert b[key].shape == (4, 10)
    assert b["inputs"].dtype == np.int32 and b["targets"].dtype == np.int32
    assert b["weights"].dtype == np.float32
    assert np.all(b["weights"] == 1.0)
    assert b["inputs"].min() >= 0 and b["inputs"].max() < VOCAB


def test_batch_is_a_pure_function_of_seed_and_step():
    first = data().batch(5, 4, 10)
    again = data().batch(5, 4, 10)  # a fresh object: what a resumed run does
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    data().batch(4, 4, 10)  # drawing other steps in between changes nothing
    np.testing.assert_array_equal(data().batch(5, 4, 10)["inputs"], first["inputs"])


def test_batches_differ_across_steps_seeds_and_splits():
    d = data()
    a = d.batch(5, 4, 10)["inputs"]
    assert not np.array_equal(a, d.batch(6, 4, 10)["inputs"])
    assert not np.array_equal(a, data(seed=1).batch(5, 4, 10)["inputs"])
    assert not np.array_equal(a, d.batch(5, 4, 10, split="eval")["inputs"])


def test_targets_are_inputs_shifted_by_one():
    b = data().batch(2, 4, 10)
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])


def test_transitions_are_a_probability_matrix():
    src = data().source
    p = dense_transitions(src)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-12)
    for row in src.successors:
        assert len(set(row.tolist())) == BRANCHING  # distinct successors


def test_entropy_rate_matches_a_dense_computation():
    src = data().source
    p = dense_transitions(src)
    # Stationary distribution: left eigenvector of P for eigenvalue 1.
    eigvals, eigvecs = np.linalg.eig(p.T)
    pi = np.real(eigvecs[:, np.argmin(np.abs(eigvals - 1))])
    pi = pi / pi.sum()
    np.testing.assert_allclose(src.stationary, pi, rtol=1e-8, atol=1e-12)
    expected = float(-(pi[:, None] * p * np.log(p)).sum())
    rate = src.entropy_rate()
    assert rate == pytest.approx(expected, rel=1e-9)
    assert 0 < rate < math.log(VOCAB)
    assert data().loss_floor == pytest.approx(rate)


def test_samples_follow_the_source():
    """The mean negative log-likelihood of sampled transitions estimates the entropy rate."""
    src = data().source
    p = dense_transitions(src)
    tokens = src.sample(np.random.default_rng(0), batch=64, length=300)
    nll = -np.log(p[tokens[:, :-1], tokens[:, 1:]]).mean()
    # 64*299 transitions: the standard error is below 0.01 nats.
    assert nll == pytest.approx(src.entropy_rate(), abs=0.05)


@pytest.mark.parametrize("vocab", [64, 256])
def test_loss_floor_of_shipped_configs_is_in_range(vocab):
    cfg = compose([f"model.vocab_size={vocab}"])
    floor = build_dataset(cfg).loss_floor
    assert 0 < floor < math.log(vocab)
