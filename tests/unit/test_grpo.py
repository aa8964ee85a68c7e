"""GRPO: the group-normalised advantages, the policy loss's gradient, the toy task's
reward rising, and bad reward functions as one line."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY
from flax import nnx

from nnxtrain import compose
from nnxtrain.cli.grpo import toy
from nnxtrain.errors import UserError
from nnxtrain.model import Transformer
from nnxtrain.prefs.grpo import group_advantages, policy_sums, token_logps
from nnxtrain.prefs.rewards import sum_rows
from nnxtrain.train.grpo import GRPO, Reward, score


def test_advantages_are_the_closed_form_per_group():
    rewards = np.array([1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2.0, 2.0, -1.0, 3.0, 0.0, 1.0], np.float32)
    got = np.asarray(group_advantages(jnp.asarray(rewards), group=4))
    for g in range(3):
        r = rewards[4 * g : 4 * g + 4].astype(np.float64)
        # (r - mean) / (sample std + 1e-4): a group of equal rewards has no advantage
        expected = (r - r.mean()) / (np.sqrt(((r - r.mean()) ** 2).sum() / 3) + 1e-4)
        np.testing.assert_allclose(got[4 * g : 4 * g + 4], expected, rtol=1e-6, atol=1e-7)
    assert not got[4:8].any()


def test_with_old_equal_to_new_and_no_kl_the_gradient_is_minus_a_grad_logp():
    cfg = dataclasses.replace(TINY, dtype="float32")
    model = nnx.jit(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))()
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (4, 9)).astype(np.int32)
    mask = np.zeros((4, 8), np.float32)
    for i, start in enumerate([2, 3, 5, 1]):  # completions of unequal lengths
        mask[i, start : start + 2 + i] = 1.0
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": mask}
    adv = jnp.asarray([1.5, -0.5, 0.25, -1.25], jnp.float32)

    def loss(p: nnx.State) -> jax.Array:
        logps = token_logps(nnx.merge(graphdef, p), batch)
        sums = policy_sums(logps, logps, adv, batch["weights"], eps_low=0.2, eps_high=0.28)
        return sums["ce"] / sums["weight"]

    def expected(p: nnx.State) -> jax.Array:  # -A logp per token, token mean
        logps = token_logps(nnx.merge(graphdef, p), batch)
        return -jnp.sum(adv[:, None] * logps * mask) / mask.sum()

    value, got, want = jax.jit(lambda p: (loss(p), jax.grad(loss)(p), jax.grad(expected)(p)))(
        params
    )
    tokens_mean = -float(jnp.sum(adv * mask.sum(1)) / mask.sum())  # ratio 1: -A, token mean
    assert abs(float(value) - tokens_mean) < 1e-6
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        # the same terms, one multiplied by exp(0) = 1 first: equal to float32 rounding
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert any(float(jnp.abs(a).max()) > 0 for a in jax.tree.leaves(got))


@pytest.mark.slow  # the toy task: 40 GRPO steps of a tiny model (~10 s)
def test_the_toy_tasks_reward_rises():
    history = toy(["run.steps=40", "run.log_every=40"])
    assert np.mean(history[-10:]) > np.mean(history[:10]) + 0.1


def test_bad_grpo_keys_and_reward_functions_are_one_line():
    for key, value in [("generations", 1), ("temperature", 0), ("epsilon_high", 1.5)]:
        with pytest.raises(UserError, match=rf"^grpo.{key}: .*Fix: "):
            compose([f"grpo.{key}={value}"])
    with pytest.raises(UserError, match=r"^grpo.rewards.x: needs a _target_"):
        compose(["+grpo.rewards.x.weight=2"])
    base = ["model=tiny", "mesh=single", "run.steps=1", "run.batch_size=2", "grpo.max_new_tokens=2"]
    bad = compose([*base, "+grpo.rewards.x._target_=nnxtrain.prefs.rewards.nope"])
    with pytest.raises(UserError, match=r"grpo.rewards.x._target_: cannot import"):
        GRPO(bad, sum_rows(4))
    rows = sum_rows(2)
    with pytest.raises(UserError, match=r"grpo.rewards.x raised TypeError"):
        score(Reward("x", divmod, 1.0), rows, ["1", "2"])  # type: ignore[arg-type]
    with pytest.raises(UserError, match=r"grpo.rewards.y returned str, not a number"):
        score(Reward("y", lambda p, c, r: c, 1.0), rows, ["1", "2"])  # type: ignore[arg-type]
