"""Pure functions of the training math: the train state, the optimizer, the steps.

Nothing here touches the host: the trainer jits and compiles these functions once, with
the state donated. Batches are dicts of `inputs`, `targets` and `weights` ([batch, length];
weight 0 marks a padding target that the loss ignores), and with the document mask on also
`segment_ids` and `positions` (packed documents: the loss hands them to the model, so
attention stays inside each document and positions restart). The loss and its chunked
form are in `nnxtrain.train.loss`.
"""

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nnxtrain.config import OptimConfig
from nnxtrain.model.lora import lora_dropout
from nnxtrain.prefs import DPO_METRICS
from nnxtrain.train.loss import SUM_KEYS, batch_loss_sums, summarize

Metrics = dict[str, jax.Array]
# A loss other than cross-entropy (DPO, `nnxtrain.train.preference`): (model, batch, the
# reference or None) -> sums in `loss.SUM_KEYS` (and any metric's sum), over what `weight` counts.
PairLoss = Callable[[Any, dict[str, jax.Array], Any], dict[str, jax.Array]]

# The scalars every train step reports, in the order of `pack_metrics`.
METRIC_NAMES = (
    "loss",
    "lm_loss",
    "z_loss",
    "perplexity",
    "total_weights",
    "grad_norm",
    "lr",
    "skipped",
)

# A mixture of experts' train-step metrics (model.moe; nnxtrain.train.loss.MOE_SUM_KEYS):
# the load-balancing loss, the busiest and idlest expert's tokens over the mean (the worst
# layer's), the share of (token, expert) pairs dropped (capacity mode).
MOE_METRIC_NAMES = ("moe_aux_loss", "moe_load_max", "moe_load_min", "moe_dropped")


# The metrics a step (or evaluation) with no loss token (total weights 0) cannot measure: the
# step reports 0 and 1 for them, which are no measurement, and must not read as a perfect loss.
LOSS_METRICS = ("loss", "lm_loss", "z_loss", "perplexity")


def without_loss(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`metrics` as a dict, its loss metrics (`prefix` + LOSS_METRICS) None when its
    `prefix + "total_weights"` is 0: for plugins that print or log a step's metrics."""
    out = dict(metrics)
    if out.get(f"{prefix}total_weights", 1) != 0:
        return out
    return {k: None if k.removeprefix(prefix) in LOSS_METRICS else v for k, v in out.items()}


# The skip guard a train step honours: [on, loss limit, gradient-norm limit]. With `on`
# set, a step whose loss or gradient norm is not finite or above its limit keeps the
# parameters and optimizer state bitwise as they were (the step counter still advances:
# the batch is consumed). An input, not a constant: limits change without recompiling.
GUARD_OFF = (0.0, math.inf, math.inf)


def metric_names(config: Any) -> tuple[str, ...]:
    """The scalars a run's train step reports, in `pack_metrics`' order: METRIC_NAMES, then
    DPO's with data=preference, then a mixture of experts' (model.moe)."""
    dpo = DPO_METRICS if config.data.name == "preference" else ()
    return METRIC_NAMES + dpo + (MOE_METRIC_NAMES if config.model.moe.experts else ())


def pack_metrics(metrics: Metrics, names: tuple[str, ...] = METRIC_NAMES) -> jax.Array:
    """The step's scalars as one float32 vector: one device-to-host copy instead of seven."""
    return jnp.stack([jnp.asarray(metrics[k], jnp.float32) for k in names])


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class TrainState:
    """Everything a step updates: the step counter, the parameters and the optimizer state."""

    step: jax.Array  # int32 scalar: optimizer steps taken so far
    params: nnx.State  # the model's parameters (nnx.Param variables with logical names)
    opt_state: Any  # optax state, mirroring params


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves] or [jnp.array(True)]))


def all_finite(tree: Any) -> bool:
    """Whether every float in `tree` (e.g. a TrainState) is finite. One pass over the
    arrays on their devices, and one scalar back: cheap next to a checkpoint's copy."""
    return bool(_all_finite(tree))


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to lr, then cosine decay to min_lr_ratio * lr."""
    warmup = cfg.warmup_steps
    if cfg.warmup_fraction > 0:
        warmup = math.ceil(cfg.warmup_fraction * total_steps)
    decay = cfg.decay_steps or max(total_steps - warmup, 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=warmup + decay,
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def _float32(tree: Any) -> Any:
    """`tree` with its floating-point leaves in float32 (others as they are)."""
    return jax.tree.map(
        lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


def in_float32(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` seeing float32 parameters and gradients, whatever the parameters' dtype: its
    state (Adam's moments) is created and kept in float32, and its updates are float32
    (`optax.apply_updates` casts each back to its parameter's dtype). Left to itself,
    optax makes the moments in the parameters' dtype: a bfloat16 second moment cannot
    take an increment below 2^-9 of itself (b2 = 0.999: every one), and the first moment
    turns float32 on the first update (the gradients are float32), so the state changes
    dtype under the compiled step. With float32 parameters this is the identity."""

    def init(params: Any) -> Any:
        return tx.init(_float32(params))

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        return tx.update(_float32(updates), state, None if params is None else _float32(params))

    return optax.GradientTransformation(init, update)


def make_optimizer(
    cfg: OptimConfig, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with the schedule and global-norm clipping; weight decay on matrices only. Its
    state is float32 whatever `model.param_dtype` (`in_float32`)."""
    schedule = make_schedule(cfg, total_steps)
    adamw = optax.adamw(
        schedule,
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params),
    )
    chain = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    return in_float32(optax.chain(*chain, adamw)), schedule


def split_trainable(
    params: nnx.State, trainable: nnx.filterlib.Filter = nnx.Param
) -> tuple[nnx.State, nnx.State | None]:
    """(what the optimizer trains, the frozen rest or None when every parameter trains)."""
    if trainable is nnx.Param:
        return params, None
    train, frozen = nnx.split_state(params, trainable, ...)
    return train, frozen


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    z_loss: float,
    grad_accum: int,
    loss_chunk: int = 0,
    trainable: nnx.filterlib.Filter = nnx.Param,
    pair_loss: PairLoss | None = None,
) -> Callable[..., tuple[TrainState, Metrics]]:
    """The train step: forward, backward (over `grad_accum` micro-batches), update; with a
    `guard` ([on, loss limit, grad-norm limit], see GUARD_OFF) a bad step is skipped. A
    batch with no loss token (total weight 0) keeps the state bitwise as well, unskipped:
    there is nothing to learn from it. The loss projects `loss_chunk` positions at a time
    (`loss.batch_loss_sums`). Only the parameters `trainable` selects (LoRA: the adapters,
    `nnxtrain.model.trainable`) get a gradient and an update; `tx`'s state covers them
    alone (`split_trainable`). With `pair_loss` (DPO) the loss is its sums, given `ref`."""

    def step(
        state: TrainState,
        batch: dict[str, jax.Array],
        guard: jax.Array | None = None,
        ref: Any = None,
    ) -> tuple[TrainState, Metrics]:
        train, frozen = split_trainable(state.params, trainable)

        def sums_and_grads(
            params: nnx.State, batch: dict[str, jax.Array], micro: jax.Array | int = 0
        ) -> tuple[Any, Any]:
            # LoRA dropout's masks: a key per step and micro-batch (a resumed step draws
            # the same; the micro-batches of one step draw apart)
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0x10A), state.step), micro)

            def total(p: nnx.State) -> tuple[jax.Array, dict[str, jax.Array]]:
                model = nnx.merge(graphdef, p) if frozen is None else nnx.merge(graphdef, p, frozen)
                with lora_dropout(key):
                    if pair_loss is not None:
                        sums = pair_loss(model, batch, ref)
                    else:
                        sums = batch_loss_sums(model, batch, z_loss, loss_chunk)
                return sums["ce"] + sums["z"] + sums.get("moe_loss", 0.0), sums

            (_, sums), grads = jax.value_and_grad(total, has_aux=True)(params)
            return sums, grads

        if grad_accum == 1:
            sums, grads = sums_and_grads(train, batch)
        else:
            # [B, L] -> [A, B/A, L]: row i goes to micro-batch i % A, which keeps each
            # micro-batch spread over the data-parallel devices like the full batch. Every
            # key goes the same way (segment ids and positions stay with their rows).
            micro = jax.tree.map(
                lambda x: jnp.swapaxes(x.reshape(-1, grad_accum, *x.shape[1:]), 0, 1), batch
            )

            def accumulate(
                carry: Any, xs: tuple[dict[str, jax.Array], jax.Array]
            ) -> tuple[Any, None]:
                sums, grads = sums_and_grads(train, *xs)
                return jax.tree.map(jnp.add, carry, (sums, grads)), None

            zero = jax.tree.map(
                jnp.zeros_like,
                jax.eval_shape(sums_and_grads, train, jax.tree.map(lambda x: x[0], micro)),
            )
            (sums, grads), _ = jax.lax.scan(accumulate, zero, (micro, jnp.arange(grad_accum)))
        # Gradients of sums over tokens -> gradient of the mean over unmasked tokens.
        grads = jax.tree.map(lambda g: g / jnp.maximum(sums["weight"], 1.0), grads)
        updates, opt_state = tx.update(grads, state.opt_state, train)
        params = optax.apply_updates(train, updates)  # in the parameters' dtypes
        # The compiled step's output is its next input: a transformation whose state comes
        # out in other dtypes than it went in (optax's moments follow the gradients' dtype)
        # is kept in the dtypes its init chose.
        opt_state = jax.tree.map(lambda new, old: new.astype(old.dtype), opt_state, state.opt_state)
        metrics = summarize(sums)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["lr"] = schedule(state.step)
        skip = jnp.asarray(False)
        if guard is not None:
            loss, norm = metrics["loss"], metrics["grad_norm"]
            bad = ~jnp.isfinite(loss) | ~jnp.isfinite(norm) | (loss > guard[1]) | (norm > guard[2])
            skip = (guard[0] > 0) & bad
        # A batch with no loss token has no gradient, yet AdamW would still move the
        # parameters (momentum, weight decay): that step keeps the state as it was too.
        keep = functools.partial(jnp.where, skip | (sums["weight"] == 0))
        params = jax.tree.map(keep, train, params)
        opt_state = jax.tree.map(keep, state.opt_state, opt_state)
        metrics["skipped"] = skip
        if frozen is not None:  # the base passes through untouched
            params = nnx.merge_state(frozen, params)
        return TrainState(state.step + 1, params, opt_state), metrics

    return step


def make_eval_step(
    graphdef: nnx.GraphDef, z_loss: float, loss_chunk: int = 0, pair_loss: PairLoss | None = None
) -> Callable[..., Any]:
    """The eval step: adds one batch's weighted loss sums to the running `totals` under the
    current parameters (no update); returns the new totals and their means.

    Evaluating N batches is N calls threading `totals` (start from `zero_sums()`); the
    means the last call returns are the pass's metrics, and nothing runs outside the
    compiled step. With `pair_loss` (DPO) its sums, given the reference `ref`.
    """

    def eval_step(
        params: nnx.State, batch: dict[str, jax.Array], totals: dict[str, jax.Array], *ref: Any
    ) -> tuple[dict[str, jax.Array], Metrics]:
        model = nnx.merge(graphdef, params)
        if pair_loss is not None:
            sums = pair_loss(model, batch, ref[0] if ref else None)
        else:
            sums = batch_loss_sums(model, batch, z_loss, loss_chunk)
        # the keys `totals` holds: a mixture of experts' router losses train it, and its
        # evaluation reports the language-model loss alone
        totals = jax.tree.map(jnp.add, totals, {k: sums[k] for k in totals})
        return totals, summarize(totals)

    return eval_step


def zero_sums() -> dict[str, np.ndarray]:
    """The running totals of an eval pass before its first batch (host arrays)."""
    return {k: np.zeros((), np.float32) for k in SUM_KEYS}
