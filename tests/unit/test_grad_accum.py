"""Gradient accumulation: one step over 2 micro-batches equals one step over the whole batch."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TINY
from flax import nnx

from nnxtrain.config import OptimConfig
from nnxtrain.model import Transformer
from nnxtrain.step import TrainState, make_optimizer, make_train_step

BATCH, LENGTH = 4, 8


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


@pytest.fixture(scope="module")
def model_parts() -> tuple[nnx.GraphDef, nnx.State]:
    return nnx.split(Transformer(TINY, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_grad_accum_2_equals_grad_accum_1(kind, model_parts):
    graphdef, params = model_parts
    tx, schedule = optimizer(kind)
    b = batch()
    results = {}
    for accum in (1, 2):
        state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
        step = jax.jit(make_train_step(graphdef, tx, schedule, z_loss=1e-3, grad_accum=accum))
        results[accum] = step(state, b)

    (state1, m1), (state2, m2) = results[1], results[2]
    assert float(m1["total_weights"]) == float(b["weights"].sum()) == 23.0
    assert set(m1) == set(m2)
    for key in m1:
        np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, err_msg=key)
    assert int(state1.step) == int(state2.step) == 1
    before = jax.tree.leaves(params)
    moved = 0
    for p0, p1, p2 in zip(
        before, jax.tree.leaves(state1.params), jax.tree.leaves(state2.params), strict=True
    ):
        np.testing.assert_allclose(p2, p1, rtol=1e-5, atol=1e-7)
        moved += int(not np.allclose(p1, p0))
    assert moved == len(before), "every parameter should have been updated"
