"""Compiling a run: the abstract state, its shardings, and the AOT train and eval steps.

Nothing here allocates a parameter. `plan_state` builds the model abstractly
(`eval_shape`), derives every array's sharding from its logical axis names, and returns
what the trainer needs to initialise the state later, already sharded. `compile_steps`
lowers and compiles the train step (state donated) and the eval step ahead of time, both
inside `use_rules(mesh, rules)`, so both carry the activations' sharding constraints and
neither compiles in the middle of training. Each compiled step comes with XLA's memory
analysis, its lower and compile seconds, the activations it annotated, and (read from its
HLO when asked) the collectives it runs.
"""

import dataclasses
import functools
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from nnxtrain.errors import UserError
from nnxtrain.parallel.collectives import CollectiveAccount, parse_collectives
from nnxtrain.parallel.preemption import interruptible
from nnxtrain.parallel.sharding import ActivationRecord, state_shardings, use_rules
from nnxtrain.train.step import (
    GUARD_OFF,
    METRIC_NAMES,
    TrainState,
    make_eval_step,
    make_train_step,
    pack_metrics,
    split_trainable,
    zero_sums,
)
from nnxtrain.units import format_bytes

Rules = Mapping[str, tuple[str, ...] | None]
ModelFactory = Callable[[nnx.Rngs], nnx.Module]


@dataclass(frozen=True)
class CompiledMemory:
    """A compiled step's memory per device, in bytes (XLA's memory analysis)."""

    argument: int  # inputs: state and batch
    output: int  # outputs: new state and metrics
    alias: int  # outputs that reuse donated input buffers
    temp: int  # scratch space during the step
    total: int  # argument + output - alias + temp: peak the step needs

    @classmethod
    def of(cls, compiled: Any) -> "CompiledMemory":
        m = compiled.memory_analysis()
        if m is None:
            return cls(0, 0, 0, 0, 0)
        arg, out = int(m.argument_size_in_bytes), int(m.output_size_in_bytes)
        alias, temp = int(m.alias_size_in_bytes), int(m.temp_size_in_bytes)
        return cls(arg, out, alias, temp, arg + out - alias + temp)

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        return ", ".join(f"{k} {format_bytes(v)}" for k, v in self.as_dict().items())


@dataclass(frozen=True)
class CompiledStep:
    """One step, lowered and compiled ahead of time under the logical-axis rules."""

    name: str  # "train" or "eval"
    compiled: Any  # the jax Compiled object: .memory_analysis(), .cost_analysis(), .as_text()
    memory: CompiledMemory  # per-device argument/output/alias/temp/total bytes
    lower_seconds: float  # time to trace and lower the step
    compile_seconds: float  # time XLA took to compile it (or to load it from the cache)
    activations: Mapping[str, ActivationRecord]  # annotated activations, as traced

    @functools.cached_property
    def collectives(self) -> CollectiveAccount:
        """What the step moves between devices, read from its HLO on first use (a few
        tenths of a second per MB of HLO text)."""
        return parse_collectives(self.compiled.as_text())

    def summary(self) -> str:
        return (
            f"compiled {self.name} step: lower {self.lower_seconds:.2f} s, compile "
            f"{self.compile_seconds:.2f} s; memory per device: {self.memory.summary()}"
        )


@dataclass(frozen=True)
class StatePlan:
    """The train state before it exists: its structure, shapes and shardings."""

    graphdef: nnx.GraphDef  # the model's structure (merge it with params to call it)
    abstract: TrainState  # ShapeDtypeStructs that carry their shardings
    shardings: Any  # TrainState of NamedShardings
    num_params: int  # every parameter leaf, embeddings and norms included
    init_fn: Callable[[], TrainState]  # builds the real state (traced, never called bare)
    trainable: Any = nnx.Param  # the parameters the optimizer updates (LoRA: the adapters)
    num_trainable: int = 0  # their elements

    def initialize(self) -> TrainState:
        """The freshly initialised state, each array created directly in its shards."""
        return jax.jit(self.init_fn, out_shardings=self.shardings)()


def plan_state(
    model_factory: ModelFactory,
    tx: optax.GradientTransformation,
    seed: int,
    mesh: Mesh,
    rules: Rules,
    trainable: Any = nnx.Param,
) -> StatePlan:
    """Builds the model and optimizer state abstractly and shards them by their names; the
    optimizer state covers the `trainable` parameters only."""

    def init_fn() -> TrainState:
        _, params = nnx.split(model_factory(nnx.Rngs(seed)))
        train, _ = split_trainable(params, trainable)
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(train))

    graphdef, _ = nnx.split(nnx.eval_shape(lambda: model_factory(nnx.Rngs(seed))))
    abstract = jax.eval_shape(init_fn)
    shardings = state_shardings(abstract, mesh, rules)
    placed = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
    train, _ = split_trainable(abstract.params, trainable)
    num_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(train))
    return StatePlan(graphdef, placed, shardings, num_params, init_fn, trainable, num_train)


class OutOfMemory(UserError):
    """XLA refused to compile a step: it needs more memory than a device has."""

    def __init__(self, step: str, devices: str, xla_message: str):
        # XLA:TPU says e.g. "... HLO temporaries (37.55G) exceeds available HBM (31.25G)."
        sizes = re.findall(r"\(([\d.]+\s*[KMGT]?i?B?)\)", xla_message)
        need = (
            f"{sizes[0]} (HLO temporaries) but {devices} have {sizes[1]}" if len(sizes) == 2 else ""
        )
        detail = need or (xla_message.strip().splitlines() or ["?"])[0][:200]
        super().__init__(
            f"the {step} step does not fit in memory on {devices}: it needs {detail}. "
            "Fix: lower run.batch_size or run.seq_len, set model.remat=full, raise "
            "run.grad_accum, or use a larger mesh.target"
        )
        self.step, self.xla_message = step, xla_message


def _compile(name: str, mesh: Mesh, rules: Rules, jitted: Any, *args: Any) -> CompiledStep:
    with use_rules(mesh, rules) as records:
        t0 = time.perf_counter()
        lowered = jitted.lower(*args)
        t1 = time.perf_counter()
        try:
            compiled = interruptible(lowered.compile)  # SIGTERM/Ctrl-C stop it
        except Exception as e:  # as on hardware: XLA's RESOURCE_EXHAUSTED
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            kind = mesh.devices.flat[0].device_kind
            raise OutOfMemory(name, f"{mesh.size} {kind} devices", str(e)) from e
        t2 = time.perf_counter()
    return CompiledStep(name, compiled, CompiledMemory.of(compiled), t1 - t0, t2 - t1, records)


def compile_steps(
    plan: StatePlan,
    mesh: Mesh,
    rules: Rules,
    batch: Mapping[str, jax.ShapeDtypeStruct],
    *,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    z_loss: float,
    grad_accum: int,
    loss_chunk: int = 0,
    with_eval: bool,
    preference: Any = None,
    names: tuple[str, ...] = METRIC_NAMES,
) -> tuple[CompiledStep, CompiledStep | None]:
    """The train step `(state, batch, guard) -> (state, metrics vector)`, state donated
    (guard: float32 [on, loss limit, grad-norm limit], see `step.GUARD_OFF`), and (when
    `with_eval`) the eval step `(params, batch, totals) -> (totals, means)`, both compiled
    for `batch`'s shapes and shardings on `mesh` under `rules`. With `preference`
    (`nnxtrain.train.preference.Preference`: DPO) the train step computes its loss, and
    is called as above through `preference.wrap`, which hands it the reference. The
    metrics vector holds `names` (`step.metric_names` of the run), in that order."""
    pair_loss = preference.loss(plan.graphdef) if preference is not None else None
    step_fn = make_train_step(
        plan.graphdef, tx, schedule, z_loss, grad_accum, loss_chunk, plan.trainable, pair_loss
    )
    replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
    batch = batch if preference is None else {**batch, **preference.batch_spec(replicated)}
    batch_shardings = {k: v.sharding for k, v in batch.items()}

    def train_step(
        state: TrainState, batch: dict[str, jax.Array], guard: jax.Array, *ref: Any
    ) -> tuple[Any, jax.Array]:
        state, metrics = step_fn(state, batch, guard, *ref)
        return state, pack_metrics(metrics, names)

    holds = preference is not None and preference.holds_reference
    ref_args = (plan.abstract.params,) if holds else ()
    train = jax.jit(
        train_step,
        in_shardings=(plan.shardings, batch_shardings, replicated)
        + ((plan.shardings.params,) if holds else ()),
        out_shardings=(plan.shardings, None),
        donate_argnums=0,
    )
    guard = jax.ShapeDtypeStruct((len(GUARD_OFF),), jnp.float32, sharding=replicated)
    compiled_train = _compile("train", mesh, rules, train, plan.abstract, batch, guard, *ref_args)
    if preference is not None:
        compiled_train = dataclasses.replace(
            compiled_train, compiled=preference.wrap(compiled_train.compiled)
        )
    if not with_eval:
        return compiled_train, None
    zero = zero_sums() if preference is None else preference.zero_sums()
    totals = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=replicated) for k, v in zero.items()
    }
    evaluate = jax.jit(
        make_eval_step(plan.graphdef, z_loss, loss_chunk, pair_loss),
        in_shardings=(plan.shardings.params, batch_shardings, replicated)
        + ((plan.shardings.params,) if holds else ()),
        out_shardings=replicated,
    )
    args = (plan.abstract.params, batch, totals, *ref_args)
    compiled_eval = _compile("eval", mesh, rules, evaluate, *args)
    if preference is not None:
        compiled_eval = dataclasses.replace(
            compiled_eval, compiled=preference.wrap_eval(compiled_eval.compiled)
        )
    return compiled_train, compiled_eval
