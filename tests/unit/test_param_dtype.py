"""Training with `model.param_dtype=bfloat16`: the parameters stay bfloat16, the optimizer
state is float32 (whatever the parameters' dtype), and the compiled step's output state
has the dtypes of its input, so that step 2 can take what step 1 returned."""

import io
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from rich.console import Console

from nnxtrain import Trainer, compose
from nnxtrain.config import OptimConfig
from nnxtrain.train.step import make_optimizer


def float_dtypes(tree: object) -> set[jnp.dtype]:
    return {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


def test_bfloat16_parameters_train_with_a_float32_optimizer_state(tmp_path: Path):
    cfg = compose(
        [
            "model=tiny",
            "model.param_dtype=bfloat16",
            "run.steps=3",
            "run.batch_size=4",
            "run.seq_len=16",
            "run.eval_every=0",
            "optim.warmup_steps=0",  # the first step moves the parameters
            "callbacks=none",
            f"run.dir={tmp_path}",
        ]
    )
    trainer = Trainer(cfg, console=Console(file=io.StringIO()))
    result = trainer.fit()
    assert result.reason == "completed" and result.step == 3
    assert np.isfinite(result.metrics["loss"])
    assert result.state is not None
    assert float_dtypes(result.state.params) == {jnp.dtype(jnp.bfloat16)}
    assert float_dtypes(result.state.opt_state) == {jnp.dtype(jnp.float32)}
    assert trainer.plan is not None
    initial = trainer.plan.initialize().params  # the same seed: the state before step 1
    moved = jax.tree.map(
        lambda a, b: not np.array_equal(np.asarray(a), np.asarray(b)), initial, result.state.params
    )
    assert all(jax.tree.leaves(moved))


def test_the_optimizer_state_is_float32_and_its_second_moment_grows():
    """optax alone would keep the moments in the parameters' dtype; in bfloat16 a second
    moment with b2 = 0.999 stops moving once each increment is below half its last bit
    (2^-9 of itself). In float32 it follows (1 - b2) g^2 a step to float32 rounding."""
    cfg = OptimConfig(lr=1e-3, warmup_steps=0, b2=0.999, clip_norm=0.0, weight_decay=0.0)
    tx, _ = make_optimizer(cfg, total_steps=10)
    params = {"w": jnp.ones((4, 4), jnp.bfloat16)}
    state = tx.init(params)
    assert float_dtypes(state) == {jnp.dtype(jnp.float32)}
    grads = {"w": jnp.ones((4, 4), jnp.float32)}
    for _ in range(3):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    nu = jax.tree.leaves(state)
    assert float_dtypes(state) == {jnp.dtype(jnp.float32)}
    assert params["w"].dtype == jnp.bfloat16
    # (1 - b2) (1 + b2 + b2^2) after three steps of g = 1 (from 0)
    expected = (1 - 0.999) * (1 + 0.999 + 0.999**2)
    assert any(np.allclose(np.asarray(x), expected, rtol=1e-5) for x in nu if x.ndim == 2)
