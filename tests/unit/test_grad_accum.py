"""Gradient accumulation: one step over 2 micro-batches equals one step over the whole batch.

The two steps sum the same float32 terms in a different order, so they agree to rounding,
not bitwise. The comparison is on the gradients the optimizer receives (and, for AdamW, its
first moment, which is linear in them): Adam's division by sqrt(v) would turn a rounding
difference in a gradient near zero into a difference of up to the learning rate.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TINY, assert_equal_to_rounding, rounding_tolerance
from flax import nnx

from nnxtrain.config import OptimConfig
from nnxtrain.model import Transformer
from nnxtrain.train.step import TrainState, make_optimizer, make_train_step

BATCH, LENGTH = 4, 8

# A gradient entry sums BATCH·LENGTH = 32 token positions, each through contractions no
# longer than the vocabulary (32): at most 32·32 = 1024 terms, a tolerance of 1.2e-4
# (see conftest.rounding_tolerance). Measured: 2e-7 of each leaf's largest entry.
TERMS = BATCH * LENGTH * TINY.vocab_size


def batch() -> dict[str, jax.Array]:
    """A batch whose micro-batches hold different numbers of unmasked targets."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, TINY.vocab_size, size=(BATCH, LENGTH + 1)).astype(np.int32)
    weights = np.ones((BATCH, LENGTH), np.float32)
    weights[0, 2:] = 0  # row 0 goes to micro-batch 0 with row 2, rows 1 and 3 to the other
    weights[2, 5:] = 0
    return {
        "inputs": jnp.array(tokens[:, :-1]),
        "targets": jnp.array(tokens[:, 1:]),
        "weights": jnp.array(weights),
    }


def optimizer(kind: str) -> tuple[optax.GradientTransformation, optax.Schedule]:
    if kind == "sgd":  # the update is proportional to the gradient: a scale error shows
        return optax.sgd(0.5), optax.constant_schedule(0.5)
    # AdamW as the trainer builds it; no warmup so the first step really moves.
    cfg = dataclasses.replace(OptimConfig(), lr=1e-2, warmup_steps=0, clip_norm=1.0)
    return make_optimizer(cfg, total_steps=10)


def recording(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx`, behind a transformation that keeps the gradients it is given in its state."""
    keep = optax.GradientTransformation(
        init=lambda params: jax.tree.map(jnp.zeros_like, params),
        update=lambda grads, state, params=None: (grads, grads),
    )
    return optax.chain(keep, tx)


@pytest.fixture(scope="module")
def model_parts() -> tuple[nnx.GraphDef, nnx.State]:
    return nnx.split(Transformer(TINY, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_grad_accum_2_equals_grad_accum_1(kind, model_parts):
    graphdef, params = model_parts
    tx, schedule = optimizer(kind)
    tx = recording(tx)
    b = batch()
    results = {}
    for accum in (1, 2):
        state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
        step = jax.jit(make_train_step(graphdef, tx, schedule, z_loss=1e-3, grad_accum=accum))
        results[accum] = step(state, b)

    (state1, m1), (state2, m2) = results[1], results[2]
    assert float(m1["total_weights"]) == float(b["weights"].sum()) == 23.0
    assert set(m1) == set(m2)
    for key in m1:  # means of sums over the 23 unmasked targets
        np.testing.assert_allclose(m2[key], m1[key], rtol=rounding_tolerance(TERMS), err_msg=key)
    assert int(state1.step) == int(state2.step) == 1
    grads1, grads2 = state1.opt_state[0], state2.opt_state[0]
    assert_equal_to_rounding(grads2, grads1, TERMS, "gradients")
    if kind == "sgd":  # params - 0.5 * grads: the same comparison, on the update
        delta = [jax.tree.map(lambda p, p0: p - p0, s.params, params) for s in (state1, state2)]
        assert_equal_to_rounding(delta[1], delta[0], TERMS, "sgd updates")
    else:  # (1 - b1) * clipped gradients: the moment Adam divides, before the division
        mu = [optax.tree.get(s.opt_state, "mu") for s in (state1, state2)]
        assert_equal_to_rounding(mu[1], mu[0], TERMS, "first moment")
    before = jax.tree.leaves(params)
    moved = 0
    for p0, p1, p2 in zip(
        before, jax.tree.leaves(state1.params), jax.tree.leaves(state2.params), strict=True
    ):
        moved += int(not np.allclose(p1, p0) and not np.allclose(p2, p0))
    assert moved == len(before), "every parameter should have been updated"
