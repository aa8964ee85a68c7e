"""The DPO loss and its metrics, as TRL's DPOTrainer defines them (trl 1.16).

A preference batch holds 2B rows: rows 0..B-1 are the chosen replies of B pairs, rows
B..2B-1 the rejected ones, in the same order (TRL's layout: splitting a batch into
micro-batches by row keeps each pair's two rows together). Each row is prompt + reply;
its `weights` are 1 on the reply's targets, 0 on the prompt and padding.

    logp(y|x)    = sum over the reply's targets of log softmax(logits)[target]   (float32)
    r_c, r_r     = beta * (logp_policy - logp_ref) of the chosen and rejected reply
    d            = (logp_c - ref_c) - (logp_r - ref_r)
    sigmoid      = -(1 - ls) * log sigmoid(beta d) - ls * log sigmoid(-beta d)
    ipo          = ((logp_c - ref_c) / n_c - (logp_r - ref_r) / n_r - 1 / (2 beta))^2

n_c, n_r: the replies' target counts. The loss is the mean over pairs; the metrics are the
means over pairs of r_c (`rewards/chosen`), r_r, [r_c > r_r] (`rewards/accuracies`),
r_c - r_r (`rewards/margins`), logp_c (`logps/chosen`) and logp_r. TRL 1.16's `sigmoid`
ignores label_smoothing; ls > 0 is conservative DPO as TRL defined it before 1.0 (and
MaxText and Tunix do), which TRL 1.16 computes per pair as its `aot` loss of a one-pair
batch (tests/interop/test_dpo_trl.py).

`pair_sums` returns sums over pairs (the train step adds them over micro-batches and
divides by `weight`, the number of pairs), in the train step's keys: `ce` (the loss),
`z` (0) and `weight`, and one per metric.
"""

from typing import Any

import jax
import jax.numpy as jnp

DPO_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def sequence_logps(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
    """Per row, the sum of log p(target) over the positions of weight 1, in float32."""
    logits = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    # A one-hot product rather than a gather: its backward is a multiply, not a scatter.
    picked = jnp.sum(logp * jax.nn.one_hot(targets, logits.shape[-1], dtype=logp.dtype), -1)
    return jnp.sum(picked * weights.astype(jnp.float32), axis=-1)


def row_logps(model: Any, batch: dict[str, jax.Array]) -> jax.Array:
    """`sequence_logps` of `model` on every row of `batch`: one forward of all 2B rows."""
    logits = model.logits(model.hidden(batch["inputs"]))
    return sequence_logps(logits, batch["targets"], batch["weights"])


def pair_sums(
    logps: jax.Array,
    ref_logps: jax.Array,
    lengths: jax.Array,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> dict[str, jax.Array]:
    """The loss and metric sums over the pairs of a [chosen; rejected] batch (see the module
    docstring); `lengths`: each row's reply targets. A pair with an empty reply counts in
    no sum (weight 0)."""
    logps, ref_logps = logps.astype(jnp.float32), jax.lax.stop_gradient(ref_logps)
    half = logps.shape[0] // 2
    chosen, rejected = logps[:half], logps[half:]
    chosen_ratio = chosen - ref_logps[:half]
    rejected_ratio = rejected - ref_logps[half:]
    n_c, n_r = lengths[:half].astype(jnp.float32), lengths[half:].astype(jnp.float32)
    if loss_type == "ipo":
        delta = chosen_ratio / jnp.maximum(n_c, 1.0) - rejected_ratio / jnp.maximum(n_r, 1.0)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        logits = beta * (chosen_ratio - rejected_ratio)
        losses = -jax.nn.log_sigmoid(logits) * (1 - label_smoothing)
        if label_smoothing:
            losses = losses - jax.nn.log_sigmoid(-logits) * label_smoothing
    valid = ((n_c > 0) & (n_r > 0)).astype(jnp.float32)
    chosen_rewards = jax.lax.stop_gradient(beta * chosen_ratio)
    rejected_rewards = jax.lax.stop_gradient(beta * rejected_ratio)
    per_pair = {
        "ce": losses,
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(jnp.float32),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": jax.lax.stop_gradient(chosen),
        "logps/rejected": jax.lax.stop_gradient(rejected),
    }
    sums = {k: jnp.sum(v * valid) for k, v in per_pair.items()}
    return {**sums, "z": jnp.zeros((), jnp.float32), "weight": jnp.sum(valid)}
