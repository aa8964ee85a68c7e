"""What a DPO run (data=preference) adds to the loop: the loss, and its reference.

    preference = Preference.of(trainer)          # None unless data=preference
    compile_steps(..., preference=preference)    # the DPO train step, wrapped

The loss (`nnxtrain.prefs.dpo`) compares the policy's log-probs of each pair's replies
with a reference's. Where the reference comes from (dpo.reference, dpo.precompute_ref):

- held (the default): the reference parameters live beside the train state, sharded like
  the policy, and go into every step as a second argument (one more forward of the 2B
  rows, no gradient). `init` is the run's starting weights, rebuilt exactly as the run
  built them (the seeded initialisation and `run.init_from`'s weights); a PATH (an HF dir
  or a run dir) is read through `nnxtrain.interop.init_from` like run.init_from. They are
  never in a checkpoint: a resumed run rebuilds the same arrays.
- LoRA (model.lora.rank > 0): the policy's own model with its adapters off
  (`nnxtrain.model.lora.adapters_off`), inside the step: no second copy. The base is
  frozen, so it is the starting model at every step.
- precompute_ref=true: before the first step, one pass computes the reference log-probs
  of every batch the run will still train on (`run.steps` less the steps done), then the
  reference is dropped; each step gets its batch's values as `ref_logps`. A resumed run
  recomputes them for its remaining steps: the same program on the same batches.

The reference is built at the first step (a dry run allocates nothing), so its seconds
count in that step's time.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from nnxtrain.config import Config, DpoConfig
from nnxtrain.errors import ConfigError
from nnxtrain.interop.init_from import load_params, source
from nnxtrain.model.lora import adapters_off
from nnxtrain.prefs import DPO_METRICS, pair_sums, row_logps
from nnxtrain.train.loss import SUM_KEYS
from nnxtrain.train.step import PairLoss

# The model fields a dpo.reference=PATH must share with the policy.
SHAPE = ("vocab_size", "emb_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim")


def reference_model(graphdef: nnx.GraphDef, params: Any, lora: bool) -> Any:
    """The reference model: `params` as a model, with LoRA its adapters off."""
    model = nnx.merge(graphdef, params)
    return adapters_off(model) if lora else model


def dpo_loss(cfg: DpoConfig, graphdef: nnx.GraphDef, lora: bool) -> PairLoss:
    """The train step's loss of a [chosen; rejected] batch: the policy's log-probs in one
    forward of all rows, the reference's from `batch["ref_logps"]` (precomputed), the
    reference parameters `ref`, or (LoRA, `ref` None) the policy with its adapters off."""

    def loss(model: Any, batch: dict[str, jax.Array], ref: Any) -> dict[str, jax.Array]:
        logps = row_logps(model, batch)
        if "ref_logps" in batch:
            ref_logps = batch["ref_logps"]
        elif ref is None:
            ref_logps = row_logps(adapters_off(model), batch)
        else:
            ref_logps = row_logps(reference_model(graphdef, ref, lora), batch)
        lengths = jnp.sum(batch["weights"], axis=-1)
        return pair_sums(
            logps,
            ref_logps,
            lengths,
            beta=cfg.beta,
            loss_type=cfg.loss_type,
            label_smoothing=cfg.label_smoothing,
        )

    return loss


def check_reference(config: Config) -> None:
    """A dpo.reference=PATH must hold a model of the policy's shape (one line if not)."""
    path = config.dpo.reference
    if path == "init":
        return
    try:
        model = source(path).model
    except ConfigError as e:
        raise ConfigError("dpo.reference", e.problem, e.fix) from e
    for name in SHAPE:
        theirs, ours = getattr(model, name), getattr(config.model, name)
        if theirs != ours:
            raise ConfigError(
                "dpo.reference",
                f"{path} has model.{name}={theirs}, the policy {ours}",
                "give the reference of the model being trained (the same shape)",
            )


class Preference:
    """The DPO parts of one run; reads the trainer's plan, mesh and feed when it needs them.
    It keeps the held reference (built once, shared by the train and eval steps) and the
    precomputed log-probs (per train step, and per held-out batch)."""

    def __init__(self, trainer: Any):
        self.trainer, cfg = trainer, trainer.config
        self.config: DpoConfig = cfg.dpo
        self.lora = bool(cfg.model.lora.rank)
        self.precompute = cfg.dpo.precompute_ref
        self.holds_reference = not (self.lora or self.precompute)
        self.reference: Any = None  # the held reference's parameters, once built
        self.train_table: dict[int, jax.Array] | None = None  # step -> [2B] log-probs
        self.eval_table: dict[int, jax.Array] = {}  # held-out batch -> [2B] log-probs
        check_reference(cfg)

    @classmethod
    def of(cls, trainer: Any) -> "Preference | None":
        """The run's Preference, or None when it trains no preferences."""
        return cls(trainer) if trainer.config.data.name == "preference" else None

    def loss(self, graphdef: nnx.GraphDef) -> PairLoss:
        return dpo_loss(self.config, graphdef, self.lora)

    @staticmethod
    def zero_sums() -> dict[str, np.ndarray]:
        """The running totals of a DPO eval pass before its first batch."""
        return {k: np.zeros((), np.float32) for k in (*SUM_KEYS, *DPO_METRICS)}

    def batch_spec(self, replicated: NamedSharding) -> dict[str, jax.ShapeDtypeStruct]:
        """The batch keys the step gets beyond the feed's: the precomputed log-probs."""
        if not self.precompute:
            return {}
        rows = self.trainer.feed.shape[0]
        return {"ref_logps": jax.ShapeDtypeStruct((rows,), jnp.float32, sharding=replicated)}

    def wrap(self, compiled: Any) -> "ReferencedStep":
        return ReferencedStep(compiled, self)

    def wrap_eval(self, compiled: Any) -> "ReferencedEval":
        return ReferencedEval(compiled, self)

    def held(self) -> Any:
        """The held reference's parameters, built at the first call."""
        if self.reference is None:
            self.reference = self.reference_params()
        return self.reference

    def reference_params(self) -> Any:
        """The reference's parameters in the policy's shards: the run's starting weights
        (its seeded initialisation, then run.init_from's), or dpo.reference's."""
        t = self.trainer
        cfg, plan = t.config, t.plan
        init = jax.jit(lambda: plan.init_fn().params, out_shardings=plan.shardings.params)
        params = init()
        if cfg.dpo.reference != "init":
            run = dataclasses.replace(cfg.run, init_from=cfg.dpo.reference)
            return load_params(dataclasses.replace(cfg, run=run), params, t.mesh, t.console)
        if cfg.run.init_from:
            params = load_params(cfg, params, t.mesh, t.console)
        return params

    def precompute_from(self, params: Any, start: int) -> None:
        """The reference log-probs of the batches of steps start .. run.steps - 1 and of
        the held-out batches (`params`: the policy's, for LoRA's adapters off); the
        reference is dropped after."""
        t = self.trainer
        ref = params if self.lora else self.reference_params()
        graphdef, lora = t.plan.graphdef, self.lora
        replicated = NamedSharding(t.mesh, jax.sharding.PartitionSpec())
        logps = jax.jit(
            lambda p, batch: row_logps(reference_model(graphdef, p, lora), batch),
            out_shardings=replicated,
        )
        steps = range(start, t.config.run.steps)
        self.train_table = {s: logps(ref, t.feed.train(s)) for s in steps}
        if t.config.run.eval_every > 0:
            self.eval_table = {
                i: logps(ref, t.feed.eval(i)) for i in range(t.config.run.eval_batches)
            }
        held_out = f" and of {len(self.eval_table)} held-out batches" if self.eval_table else ""
        t.console.print(
            f"dpo: precomputed the reference log-probs of {len(self.train_table)} steps{held_out}"
        )


class ReferencedStep:
    """The compiled DPO train step, called as every train step is: (state, batch, guard).
    It hands the step the reference (held) or the batch's precomputed log-probs; the
    jax Compiled object's attributes (memory_analysis, as_text, ...) pass through."""

    def __init__(self, compiled: Any, preference: Preference):
        self.compiled, self.preference = compiled, preference
        self._next = 0  # the step the next call trains (precomputed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.compiled, name)

    @property
    def reference(self) -> Any:
        return self.preference.reference

    def __call__(self, state: Any, batch: dict[str, jax.Array], guard: jax.Array) -> Any:
        p = self.preference
        if p.holds_reference:
            return self.compiled(state, batch, guard, p.held())
        if p.precompute:
            if p.train_table is None:
                self._next = int(jax.device_get(state.step))
                p.precompute_from(state.params, self._next)
            assert p.train_table is not None
            batch = {**batch, "ref_logps": p.train_table.pop(self._next)}
            self._next += 1
        return self.compiled(state, batch, guard)


class ReferencedEval:
    """The compiled DPO eval step, called as every eval step is: (params, batch, totals).
    A pass starts from the loop's `zero_sums()`, which lacks DPO's keys: they are added,
    and the pass's batches counted (for their precomputed log-probs)."""

    def __init__(self, compiled: Any, preference: Preference):
        self.compiled, self.preference = compiled, preference
        self._index = 0  # the held-out batch of this call

    def __getattr__(self, name: str) -> Any:
        return getattr(self.compiled, name)

    def __call__(self, params: Any, batch: dict[str, jax.Array], totals: Any) -> Any:
        p = self.preference
        if DPO_METRICS[0] not in totals:  # the first batch of a pass
            totals, self._index = {**p.zero_sums(), **totals}, 0
        if p.holds_reference:
            return self.compiled(params, batch, totals, p.held())
        if p.precompute:
            if not p.eval_table:  # (evaluated before any train step: never in the loop)
                p.precompute_from(params, p.trainer.config.run.steps)
            batch = {**batch, "ref_logps": p.eval_table[self._index]}
        self._index += 1
        return self.compiled(params, batch, totals)
