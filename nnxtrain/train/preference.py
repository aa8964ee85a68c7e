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
from flax import nnx
from jax.sharding import NamedSharding

from nnxtrain.config import Config, DpoConfig
from nnxtrain.errors import ConfigError
from nnxtrain.interop.init_from import load_params, source
from nnxtrain.model.lora import adapters_off
from nnxtrain.prefs import pair_sums, row_logps
from nnxtrain.train.step import PairLoss, metric_names

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
    """The DPO parts of one run; reads the trainer's plan, mesh and feed when it needs them."""

    def __init__(self, trainer: Any):
        self.trainer, cfg = trainer, trainer.config
        self.config: DpoConfig = cfg.dpo
        self.lora = bool(cfg.model.lora.rank)
        self.precompute = cfg.dpo.precompute_ref
        self.holds_reference = not (self.lora or self.precompute)
        self.metric_names = metric_names(cfg)
        check_reference(cfg)

    @classmethod
    def of(cls, trainer: Any) -> "Preference | None":
        """The run's Preference, or None when it trains no preferences."""
        return cls(trainer) if trainer.config.data.name == "preference" else None

    def loss(self, graphdef: nnx.GraphDef) -> PairLoss:
        return dpo_loss(self.config, graphdef, self.lora)

    def batch_spec(self, replicated: NamedSharding) -> dict[str, jax.ShapeDtypeStruct]:
        """The batch keys the step gets beyond the feed's: the precomputed log-probs."""
        if not self.precompute:
            return {}
        rows = self.trainer.feed.shape[0]
        return {"ref_logps": jax.ShapeDtypeStruct((rows,), jnp.float32, sharding=replicated)}

    def wrap(self, compiled: Any) -> "ReferencedStep":
        return ReferencedStep(compiled, self)

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

    def precomputed(self, state: Any, start: int) -> dict[int, jax.Array]:
        """The reference log-probs of the batches of steps start .. run.steps - 1."""
        t = self.trainer
        params = state.params if self.lora else self.reference_params()
        graphdef, lora = t.plan.graphdef, self.lora
        replicated = NamedSharding(t.mesh, jax.sharding.PartitionSpec())
        logps = jax.jit(
            lambda p, batch: row_logps(reference_model(graphdef, p, lora), batch),
            out_shardings=replicated,
        )
        table = {s: logps(params, t.feed.train(s)) for s in range(start, t.config.run.steps)}
        t.console.print(f"dpo: precomputed the reference log-probs of {len(table)} steps")
        return table


class ReferencedStep:
    """The compiled DPO train step, called as every train step is: (state, batch, guard).
    It hands the step the reference (held) or the batch's precomputed log-probs; the
    jax Compiled object's attributes (memory_analysis, as_text, ...) pass through."""

    def __init__(self, compiled: Any, preference: Preference):
        self.compiled, self.preference = compiled, preference
        self.reference: Any = None  # the held reference's parameters, once built
        self._table: dict[int, jax.Array] | None = None
        self._next = 0  # the step the next call trains (precomputed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.compiled, name)

    def __call__(self, state: Any, batch: dict[str, jax.Array], guard: jax.Array) -> Any:
        p = self.preference
        if p.holds_reference:
            if self.reference is None:
                self.reference = p.reference_params()
            return self.compiled(state, batch, guard, self.reference)
        if p.precompute:
            if self._table is None:
                self._next = int(jax.device_get(state.step))
                self._table = p.precomputed(state, self._next)
            batch = {**batch, "ref_logps": self._table.pop(self._next)}
            self._next += 1
        return self.compiled(state, batch, guard)
