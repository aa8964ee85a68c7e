"""The `Trainer`: owns the training loop, the compiled step and the events plugins hear.

    from nnxtrain import Trainer
    from nnxtrain.config import compose
    result = Trainer(compose(["run.steps=50"])).fit()
    result.metrics["loss"], result.state

What `fit()` does, in order: build the mesh and check the config against it; build the
model abstractly (`eval_shape`: no parameter memory) and derive every array's sharding
from its logical axis names; fire `on_setup` (a plugin may restore `trainer.state` here);
lower and compile the train step ahead of time with the state donated and fire
`on_compile`; write `run_info.json`; stop here on a dry run. Otherwise initialise the state
already sharded (unless restored), fire `on_train_start`, and loop: dispatch a step, fire
`on_step_end`, evaluate every `run.eval_every` steps. The loop keeps at most two steps in
flight and never waits on the device for a step nothing reads; `nnxtrain.timing` measures
true step times from completions. It ends when the steps are done, a plugin asked to
stop, SIGTERM/SIGINT arrived (`nnxtrain.preemption`: every process stops at the same
step), or a loss or gradient norm is not finite; `on_train_end` fires, then every
callback's `teardown`, also after an exception (which fires `on_exception` first).
"""

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from omegaconf import OmegaConf
from rich.console import Console

from nnxtrain.accounting import FlopsReport, step_flops
from nnxtrain.config import Config
from nnxtrain.data import build_dataset, process_rows, resolve_vocab
from nnxtrain.distributed import start_jax
from nnxtrain.errors import ConfigError, PluginError, UserError
from nnxtrain.events import (
    HOOKS,
    Callback,
    CompileEvent,
    EvalEndEvent,
    ExceptionEvent,
    LazyMetrics,
    SetupEvent,
    StepEndEvent,
    TrainEndEvent,
    TrainStartEvent,
    overrides,
)
from nnxtrain.mesh import batch_sharding, build_mesh, data_parallel_size
from nnxtrain.model import Transformer
from nnxtrain.preemption import Preemption
from nnxtrain.registry import build_callbacks
from nnxtrain.sharding import ActivationRecord, merge_rules, state_shardings, use_rules
from nnxtrain.step import (
    METRIC_NAMES,
    TrainState,
    make_eval_step,
    make_optimizer,
    make_train_step,
    pack_metrics,
)
from nnxtrain.timing import StepWatcher


@dataclass(frozen=True)
class CompiledMemory:
    """The compiled step's memory per device, in bytes (XLA's memory analysis)."""

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
        parts = ", ".join(f"{k} {_bytes(v)}" for k, v in self.as_dict().items())
        return f"compiled step memory per device: {parts}"


def _bytes(n: float) -> str:
    """Bytes in the largest binary unit (up to GiB) that keeps the number >= 1."""
    if abs(n) < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if abs(n) < 1024:
            return f"{n:.3f} {unit}"
    return f"{n / 1024:.3f} GiB"


@dataclass(frozen=True)
class FitResult:
    """What `Trainer.fit()` returns."""

    state: TrainState | None  # final state (None after a dry run)
    step: int  # steps done
    reason: str  # completed | stopped: ... | not finite: ... | dry run
    metrics: dict[str, float]  # the last step's metrics
    eval_metrics: dict[str, float]  # the last evaluation's metrics (empty if none)
    run_dir: str
    seconds: float = 0.0  # wall time of the loop
    best_eval_loss: float | None = None  # lowest eval/loss of the run (None without eval)


ModelFactory = Callable[[nnx.Rngs], nnx.Module]


class Trainer:
    """Trains a decoder LM from a `Config`, firing events to callbacks in order.

    Parts can be swapped from Python: `callbacks` (default: built from `config.callbacks`),
    `model_factory` (rngs -> nnx.Module returning logits), `dataset` (an object with
    `batch(step, batch_size, seq_len, split, rows)` and `loss_floor`), `optimizer` (an optax
    transformation and its learning-rate schedule), `devices`.
    """

    def __init__(
        self,
        config: Config,
        callbacks: Sequence[Callback] | None = None,
        *,
        model_factory: ModelFactory | None = None,
        dataset: Any = None,
        optimizer: tuple[optax.GradientTransformation, optax.Schedule] | None = None,
        devices: Sequence[jax.Device] | None = None,
        console: Console | None = None,
    ):
        start_jax(config)  # before anything asks JAX for its devices
        self.config = config
        self.callbacks = (
            list(callbacks) if callbacks is not None else build_callbacks(config.callbacks)
        )
        for cb in self.callbacks:
            cb.name = cb.name or type(cb).__name__
        names = [cb.name for cb in self.callbacks]
        if len(set(names)) != len(names):
            raise PluginError(
                f"callbacks: two plugins share a name in {names}. "
                "Fix: give each callback its own name."
            )
        self._hooks = {h: [cb for cb in self.callbacks if overrides(cb, h)] for h in HOOKS}
        self.model_factory: ModelFactory = model_factory or (
            lambda rngs: Transformer(config.model, rngs=rngs)
        )
        self.dataset = dataset if dataset is not None else build_dataset(config)
        # model.vocab_size from the tokenizer; rebinding `config` also updates model_factory
        config = self.config = resolve_vocab(config, self.dataset)
        self._optimizer = optimizer
        self._devices = devices
        self.console = console or Console(quiet=jax.process_index() != 0, soft_wrap=True)
        # Filled in by fit(); public so that plugins can read them.
        self.mesh: jax.sharding.Mesh | None = None
        self.run_dir = ""
        self.flops: FlopsReport | None = None
        self.graphdef: nnx.GraphDef | None = None
        self.abstract_state: Any = None  # TrainState of ShapeDtypeStructs with shardings
        self.state_shardings: Any = None
        self.activations: dict[str, ActivationRecord] = {}
        self.compiled: Any = None
        self.state: TrainState | None = None  # a plugin may set it in on_setup (restore)
        self.step = 0
        self.stop_reason: str | None = None
        self.save_requested = False
        self.preempted: str | None = None  # the signal all processes agreed to stop on
        self.preemption = Preemption(config.run.preempt_check_every, config.mesh.heartbeat_timeout)
        self.run_info: dict[str, Any] = {}
        self.num_params = 0
        self.best_eval_loss: float | None = None
        self._fit_started = 0.0
        self._tx: optax.GradientTransformation | None = None
        self._eval_step: Any = None
        self._watcher: StepWatcher | None = None

    # -- control, for plugins ------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        """Ends the loop before the next step; `on_train_end` then reports the reason."""
        if self.stop_reason is None:
            self.stop_reason = reason

    def request_save(self) -> None:
        """Asks the checkpointing plugin to save after the current step."""
        self.save_requested = True

    def consume_save_request(self) -> bool:
        """For the checkpointing plugin: whether a save was requested; clears the request."""
        requested, self.save_requested = self.save_requested, False
        return requested

    # -- the run -------------------------------------------------------------------------

    def fit(self) -> FitResult:
        """Runs setup, compilation and the loop; returns the final state and metrics."""
        where = "setup"
        self._fit_started = time.perf_counter()
        self.preemption.install()
        try:
            self._setup()
            if self.config.run.dry_run:
                self.console.print("dry run: step compiled, no parameters allocated; exiting")
                return FitResult(None, 0, "dry run", {}, {}, self.run_dir)
            where = "loop"
            return self._train()
        except BaseException as e:
            self._fire_exception(e, where)
            lost = self.preemption.lost_processes(e) if where == "loop" else None
            if lost is not None and lost is not e:
                raise lost from e
            raise
        finally:
            self._teardown()

    def _setup(self) -> None:
        cfg = self.config
        self.mesh = build_mesh(cfg.mesh, self._devices)
        cfg = self.config = self._resolve_batch(cfg, self.mesh)
        self.run_dir = self._make_run_dir(cfg)
        rules = merge_rules(cfg.mesh.rules)
        self.flops = step_flops(cfg.model, cfg.run.batch_size, cfg.run.seq_len, self.mesh.size)
        tx, schedule = self._optimizer or make_optimizer(cfg.optim, cfg.run.steps)
        self._tx = tx

        abstract_model = nnx.eval_shape(lambda: self.model_factory(nnx.Rngs(cfg.run.seed)))
        self.graphdef, _ = nnx.split(abstract_model)
        abstract = jax.eval_shape(self._init_fn)
        self.state_shardings = state_shardings(abstract, self.mesh, rules)
        self.abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract,
            self.state_shardings,
        )
        self.num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
        floor = getattr(self.dataset, "loss_floor", None)
        self._print_header(floor)
        self._fire(
            "on_setup",
            SetupEvent(cfg, self.mesh, self.abstract_state, self.flops, self.run_dir, floor),
        )

        self._batch_sharding = batch_sharding(self.mesh)
        self._rows = process_rows(self._batch_sharding, cfg.run.batch_size)
        step_fn = make_train_step(self.graphdef, tx, schedule, cfg.optim.z_loss, cfg.run.grad_accum)

        def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[Any, jax.Array]:
            state, metrics = step_fn(state, batch)
            return state, pack_metrics(metrics)

        t0 = time.perf_counter()
        with use_rules(self.mesh, rules) as records:
            jitted = jax.jit(
                train_step,
                in_shardings=(self.state_shardings, self._batch_sharding),
                out_shardings=(self.state_shardings, None),
                donate_argnums=0,
            )
            lowered = jitted.lower(self.abstract_state, self._batch_spec(cfg.run.batch_size))
            t1 = time.perf_counter()
            self.compiled = lowered.compile()
            if cfg.run.eval_every:
                self._eval_step = jax.jit(make_eval_step(self.graphdef, cfg.optim.z_loss))
        t2 = time.perf_counter()
        self.activations = dict(records)
        memory = CompiledMemory.of(self.compiled)
        self.console.print(f"compiled train step: lower {t1 - t0:.2f} s, compile {t2 - t1:.2f} s")
        self.console.print(memory.summary())
        self.run_info = {
            "model": cfg.model.name,
            **self.flops.as_dict(),
            "num_params": self.num_params,
            "compiled_memory": memory.as_dict(),
            "loss_floor": floor,
            "mesh": dict(self.mesh.shape),
            "backend": jax.default_backend(),
            "batch_size": cfg.run.batch_size,
            "seq_len": cfg.run.seq_len,
            "lower_seconds": t1 - t0,
            "compile_seconds": t2 - t1,
            "jax_version": jax.__version__,
        }
        self._write_run_info()
        self._fire("on_compile", CompileEvent(self.compiled, memory, t1 - t0, t2 - t1))

    def _train(self) -> FitResult:
        cfg = self.config
        if self.state is None:
            init = jax.jit(self._init_fn, out_shardings=self.state_shardings)
            self.state = init()
        self.step = start_step = int(jax.device_get(self.state.step))
        self._fire("on_train_start", TrainStartEvent(self.step, cfg.run.steps))
        watcher = self._watcher = StepWatcher(METRIC_NAMES)
        t_start = time.perf_counter()
        reason, eval_metrics = "completed", {}
        next_batch = self._device_batch(self.step) if self.step < cfg.run.steps else None
        while self.step < cfg.run.steps:
            if (signal := self.preemption.agreed_stop(self.step)) is not None:
                self.preempted, reason = signal, f"preempted: {signal}"
                break
            if self.stop_reason is not None:
                reason = f"stopped: {self.stop_reason}"
                break
            if watcher.nonfinite is not None:
                reason = self._nonfinite_reason(watcher.nonfinite)
                break
            watcher.throttle(self.step + 1)
            t = time.perf_counter()
            self.state, metrics = self.compiled(self.state, next_batch)
            self.step = step = self.step + 1
            watcher.submit(step, t, metrics)
            if step < cfg.run.steps:
                next_batch = self._device_batch(step)  # overlaps with the device's work
            record = functools.partial(watcher.wait, step)
            self._fire(
                "on_step_end",
                StepEndEvent(
                    step,
                    cfg.run.steps,
                    self.flops.tokens_per_step if self.flops else 0,
                    LazyMetrics(record),
                    record,
                ),
            )
            if cfg.run.eval_every and (step % cfg.run.eval_every == 0 or step == cfg.run.steps):
                eval_metrics = self.evaluate()
        # A resumed run that had already finished runs no step: nothing to wait for.
        final = watcher.wait(self.step).metrics if self.step > start_step else {}
        if reason == "completed" and watcher.nonfinite is not None:
            reason = self._nonfinite_reason(watcher.nonfinite)
        seconds = time.perf_counter() - t_start
        self.console.print(
            f"done: step {self.step}/{cfg.run.steps} in {seconds:.1f} s ({reason})"
            + (f"; final loss {final['loss']:.4f}" if final else "")
        )
        self.run_info["final"] = {
            "step": self.step,
            "reason": reason,
            "seconds": seconds,
            "metrics": dict(final),
            "eval_metrics": eval_metrics,
            "best_eval_loss": self.best_eval_loss,
        }
        if watcher.first is not None:  # start-up cost: setup, compile (or cache), first step
            self.run_info["seconds_to_first_step"] = watcher.first.completed_at - self._fit_started
        self._write_run_info()
        self._fire("on_train_end", TrainEndEvent(self.step, reason, seconds))
        return FitResult(
            self.state,
            self.step,
            reason,
            dict(final),
            eval_metrics,
            self.run_dir,
            seconds,
            self.best_eval_loss,
        )

    def evaluate(self) -> dict[str, float]:
        """Mean loss over `run.eval_batches` held-out batches; fires `on_eval_end`."""
        assert self.state is not None
        run = self.config.run
        t0 = time.perf_counter()
        totals: dict[str, float] = {}
        for i in range(run.eval_batches):
            host = self.dataset.batch(i, run.batch_size, run.seq_len, "eval", rows=self._rows)
            sums = jax.device_get(self._eval_step(self.state.params, self._put(host)))
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        denom = max(totals["weight"], 1.0)
        lm = totals["ce"] / denom
        metrics = {
            "eval/loss": lm + totals["z"] / denom,
            "eval/lm_loss": lm,
            "eval/perplexity": math.exp(min(lm, 80.0)),
            "eval/total_weights": denom,
        }
        if self.best_eval_loss is None or metrics["eval/loss"] < self.best_eval_loss:
            self.best_eval_loss = metrics["eval/loss"]
        self._fire(
            "on_eval_end",
            EvalEndEvent(self.step, metrics, run.eval_batches, time.perf_counter() - t0),
        )
        return metrics

    # -- helpers -------------------------------------------------------------------------

    def _init_fn(self) -> TrainState:
        model = self.model_factory(nnx.Rngs(self.config.run.seed))
        _, params = nnx.split(model)
        assert self._tx is not None
        return TrainState(jnp.zeros((), jnp.int32), params, self._tx.init(params))

    def _batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        shape, sh = (batch_size, self.config.run.seq_len), self._batch_sharding
        return {
            "inputs": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sh),
            "targets": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sh),
            "weights": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sh),
        }

    def _put(self, host: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        # `host` holds only this process's rows (`self._rows`, or all); multi-host safe.
        shape = (self.config.run.batch_size, self.config.run.seq_len)
        return {
            k: jax.make_array_from_process_local_data(self._batch_sharding, v, shape)
            for k, v in host.items()
        }

    def _device_batch(self, step: int) -> dict[str, jax.Array]:
        run = self.config.run
        return self._put(self.dataset.batch(step, run.batch_size, run.seq_len, rows=self._rows))

    @staticmethod
    def _nonfinite_reason(record: Any) -> str:
        m = record.metrics
        return (
            f"not finite: loss={m['loss']:.4g}, grad_norm={m['grad_norm']:.4g} at step "
            f"{record.step}; lower optim.lr or keep optim.clip_norm > 0"
        )

    @staticmethod
    def _resolve_batch(cfg: Config, mesh: jax.sharding.Mesh) -> Config:
        run, dp = cfg.run, data_parallel_size(mesh)
        batch = mesh.size if run.batch_size == -1 else run.batch_size
        if batch % run.grad_accum:
            raise ConfigError(
                "run.grad_accum",
                f"batch size {batch} is not divisible by run.grad_accum={run.grad_accum}",
                "pick a divisor of the batch",
            )
        if (batch // run.grad_accum) % dp:
            raise ConfigError(
                "run.batch_size",
                f"micro-batch of {batch // run.grad_accum} "
                f"sequences cannot be split over data*fsdp={dp} devices",
                f"use a batch size that is a multiple of {dp * run.grad_accum}",
            )
        return dataclasses.replace(cfg, run=dataclasses.replace(run, batch_size=batch))

    @staticmethod
    def _make_run_dir(cfg: Config) -> str:
        path = cfg.run.dir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
        path = os.path.abspath(path)
        try:
            os.makedirs(path, exist_ok=True)
            if jax.process_index() != 0:
                return path
            with open(os.path.join(path, "config.yaml"), "w") as f:
                f.write(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        except OSError as e:
            raise UserError(
                f"run.dir: cannot write to {path!r} ({e.strerror}). "
                "Fix: set run.dir to a writable directory."
            ) from e
        return path

    def _write_run_info(self) -> None:
        if jax.process_index() != 0:
            return
        path = os.path.join(self.run_dir, "run_info.json")
        with open(path + ".tmp", "w") as f:
            json.dump(self.run_info, f, indent=2, default=str)
        os.replace(path + ".tmp", path)  # never leaves a half-written file behind

    def _print_header(self, floor: float | None) -> None:
        cfg, mesh, flops = self.config, self.mesh, self.flops
        assert mesh is not None and flops is not None
        dev = jax.devices()[0]
        self.console.print(
            f"nnxtrain: model {cfg.model.name} | mesh "
            + " ".join(f"{k}={v}" for k, v in mesh.shape.items())
            + f" ({mesh.size} {dev.platform} device{'s' if mesh.size > 1 else ''}) | batch "
            f"{cfg.run.batch_size} x {cfg.run.seq_len} tokens | {cfg.run.steps} steps"
        )
        self.console.print(dataclasses.replace(flops, num_params=self.num_params).summary())
        if floor is not None:
            self.console.print(f"loss floor (entropy rate of the data source): {floor:.4f}")

    # -- events --------------------------------------------------------------------------

    def _fire(self, hook: str, event: Any) -> None:
        for cb in self._hooks[hook]:
            try:
                getattr(cb, hook)(self, event)
            except UserError:
                raise
            except Exception as e:
                raise PluginError(
                    f"callback '{cb.name}' ({type(cb).__name__}) raised in "
                    f"{hook}: {type(e).__name__}: {e}"
                ) from e

    def _fire_exception(self, exc: BaseException, where: str) -> None:
        event = ExceptionEvent(self.step, exc, where)
        for cb in self._hooks["on_exception"]:
            try:
                cb.on_exception(self, event)
            except Exception as e:  # never mask the original error
                self.console.print(f"[red]callback '{cb.name}' raised in on_exception: {e}[/]")

    def _teardown(self) -> None:
        self.preemption.uninstall()
        if self._watcher is not None:
            self._watcher.close()
        for cb in self.callbacks:
            try:
                cb.teardown(self)
            except Exception as e:
                self.console.print(f"[red]callback '{cb.name}' raised in teardown: {e}[/]")
