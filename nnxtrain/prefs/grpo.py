"""GRPO's math, as pure functions: group-normalised advantages and the clipped policy loss.

For P prompts with G completions each (rows p*G .. p*G+G-1 are prompt p's), rewards r:

    A_i     = (r_i - mean of its group) / (std of its group + eps)   (std with ddof 1, TRL's)
    ratio   = exp(logp - logp_old)                         per completion token
    loss_t  = -min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A) + beta k3
    k3      = exp(ref - logp) - (ref - logp) - 1           (the KL estimate to the reference)
    loss    = sum of loss_t over every completion token / their count   (token mean)

With one update per batch of samples (logp_old = logp, detached) the ratio is 1, the clip
inactive, and the gradient is -A grad logp per token (tests/unit/test_grpo.py).
`policy_sums` returns the sums the train step adds (`ce`: the loss terms, `weight`: the
tokens; `nnxtrain.train.step`), with the KL's sum beside them.
"""

from typing import Any

import jax
import jax.numpy as jnp


def group_advantages(rewards: jax.Array, group: int, eps: float = 1e-4) -> jax.Array:
    """(r - mean) / (std + eps) within each group of `group` consecutive rewards."""
    r = jnp.asarray(rewards, jnp.float32).reshape(-1, group)
    mean = r.mean(axis=1, keepdims=True)
    std = r.std(axis=1, ddof=1, keepdims=True) if group > 1 else jnp.zeros_like(mean)
    return ((r - mean) / (std + eps)).reshape(-1)


def token_logps(model: Any, batch: dict[str, jax.Array]) -> jax.Array:
    """log p(target) at every place of `batch` ([rows, length], float32)."""
    logits = model.logits(model.hidden(batch["inputs"])).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    one_hot = jax.nn.one_hot(batch["targets"], logits.shape[-1], dtype=logp.dtype)
    return jnp.sum(logp * one_hot, axis=-1)


def policy_sums(
    logps: jax.Array,
    old_logps: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    eps_low: float,
    eps_high: float,
    beta: float = 0.0,
    ref_logps: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """The clipped policy loss's sums over the completion tokens (`mask` 1), and the KL's."""
    mask = mask.astype(jnp.float32)
    ratio = jnp.exp(logps - jax.lax.stop_gradient(old_logps))
    a = advantages[:, None]
    per_token = -jnp.minimum(ratio * a, jnp.clip(ratio, 1 - eps_low, 1 + eps_high) * a)
    kl = jnp.zeros_like(per_token)
    if ref_logps is not None:
        diff = jax.lax.stop_gradient(ref_logps) - logps
        kl = jnp.exp(diff) - diff - 1
        per_token = per_token + beta * kl
    clipped = (ratio < 1 - eps_low) & (a < 0) | (ratio > 1 + eps_high) & (a > 0)
    return {
        "ce": jnp.sum(per_token * mask),
        "z": jnp.zeros((), jnp.float32),
        "weight": jnp.sum(mask),
        "kl": jnp.sum(jax.lax.stop_gradient(kl) * mask),
        "clip_ratio": jnp.sum(clipped * mask),
    }
