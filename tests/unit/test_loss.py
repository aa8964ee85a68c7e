"""The loss: cross-entropy, masking, total weights, z-loss and perplexity on hand examples."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FLOAT32_EPS

from nnxtrain.train.loss import loss_sums, summarize

# One sequence of two positions over a vocabulary of three tokens.
LOGITS = jnp.array([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])  # [1, 2, 3]
TARGETS = jnp.array([[2, 0]])

# By hand: lse(1, 2, 3) = 3 + log(1 + e^-1 + e^-2); lse(0, 0, 0) = log 3.
LSE0 = 3.0 + math.log(1.0 + math.exp(-1.0) + math.exp(-2.0))  # 3.40760596
LSE1 = math.log(3.0)  # 1.09861229
CE0 = LSE0 - 3.0  # target 2 has logit 3
CE1 = LSE1 - 0.0  # target 0 has logit 0

# float32 against the exact values: each of the loss's ~8 operations (shift by the max, exp,
# sum, log, add back, the target's subtraction, weighted sum, mean) rounds within eps/2 of
# its result, and CE0 = LSE0 - 3 is LSE0 / CE0 = 8.4 times smaller than the lse it comes
# from, which scales its relative error by as much: 8 * 8.4 * eps/2 = 4e-6 (measured 2e-7).
REL = 8 * (LSE0 / CE0) * FLOAT32_EPS / 2


def metrics(logits, targets, weights, z_loss=0.0):
    return {k: float(v) for k, v in summarize(loss_sums(logits, targets, weights, z_loss)).items()}


def test_cross_entropy_by_hand():
    m = metrics(LOGITS, TARGETS, jnp.ones((1, 2)))
    assert math.isclose(CE0, 0.40760596, abs_tol=1e-8)
    assert m["lm_loss"] == pytest.approx((CE0 + CE1) / 2, rel=REL)
    assert m["lm_loss"] == pytest.approx(0.75310912, rel=REL)
    assert m["loss"] == pytest.approx(m["lm_loss"], rel=1e-7)  # no z-loss
    assert m["total_weights"] == 2.0


def test_loss_sums_are_weighted_sums():
    sums = loss_sums(LOGITS, TARGETS, jnp.array([[1.0, 1.0]]), z_loss=0.0)
    assert float(sums["ce"]) == pytest.approx(CE0 + CE1, rel=REL)
    assert float(sums["weight"]) == 2.0


def test_masked_target_does_not_change_the_loss():
    weights = jnp.array([[1.0, 0.0]])
    m = metrics(LOGITS, TARGETS, weights)
    assert m["lm_loss"] == pytest.approx(CE0, rel=REL)
    assert m["total_weights"] == 1.0
    # Neither the masked target nor its logits matter.
    other = metrics(LOGITS.at[0, 1].set(jnp.array([5.0, -3.0, 9.0])), jnp.array([[2, 1]]), weights)
    assert other == m


def test_total_weights_counts_unmasked_targets():
    logits = jnp.zeros((2, 5, 7))
    targets = jnp.zeros((2, 5), jnp.int32)
    weights = jnp.array([[1, 1, 0, 0, 0], [1, 1, 1, 0, 1]], jnp.float32)
    m = metrics(logits, targets, weights)
    assert m["total_weights"] == 6.0
    assert m["lm_loss"] == pytest.approx(math.log(7), rel=REL)  # uniform logits


def test_z_loss_by_hand():
    weight = 1e-2
    m = metrics(LOGITS, TARGETS, jnp.ones((1, 2)), z_loss=weight)
    z = weight * (LSE0**2 + LSE1**2) / 2  # weight * mean(lse^2)
    assert m["z_loss"] == pytest.approx(z, rel=REL)
    assert m["loss"] == pytest.approx((CE0 + CE1) / 2 + z, rel=REL)
    assert m["lm_loss"] == pytest.approx((CE0 + CE1) / 2, rel=REL)


def test_z_loss_respects_the_mask():
    m = metrics(LOGITS, TARGETS, jnp.array([[1.0, 0.0]]), z_loss=0.5)
    assert m["z_loss"] == pytest.approx(0.5 * LSE0**2, rel=REL)


def test_z_loss_is_zero_when_its_weight_is_zero():
    m = metrics(LOGITS, TARGETS, jnp.ones((1, 2)), z_loss=0.0)
    assert m["z_loss"] == 0.0
    assert m["loss"] == m["lm_loss"]


def test_perplexity_is_exp_of_lm_loss():
    m = metrics(LOGITS, TARGETS, jnp.ones((1, 2)), z_loss=0.1)
    assert m["perplexity"] == pytest.approx(math.exp(m["lm_loss"]), rel=REL)
    assert m["perplexity"] != pytest.approx(math.exp(m["loss"]), rel=REL)  # not of total loss


def test_bfloat16_logits_are_reduced_in_float32():
    m16 = metrics(LOGITS.astype(jnp.bfloat16), TARGETS, jnp.ones((1, 2)))
    assert m16["lm_loss"] == pytest.approx((CE0 + CE1) / 2, rel=REL)  # inputs exact in bf16


def test_loss_of_a_larger_random_example_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4, 11)).astype(np.float32)
    targets = rng.integers(0, 11, size=(3, 4))
    weights = (rng.random((3, 4)) < 0.7).astype(np.float32)
    lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    ce = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    m = metrics(jnp.array(logits), jnp.array(targets), jnp.array(weights), z_loss=1e-3)
    expected_lm = (ce * weights).sum() / weights.sum()
    assert m["lm_loss"] == pytest.approx(expected_lm, rel=1e-5)
    assert m["z_loss"] == pytest.approx(1e-3 * (lse**2 * weights).sum() / weights.sum(), rel=1e-5)
