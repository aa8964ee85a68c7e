"""The `Trainer`: the training loop, and the events plugins hear along the way.

    from nnxtrain import Trainer, compose
    result = Trainer(compose(["run.steps=50"])).fit()
    result.metrics["loss"], result.state

`fit()` reads as the run goes: build the mesh; create and lock the run dir
(`nnxtrain.run.lock`); plan the state abstractly and fire `on_setup` (a plugin may restore
`trainer.state`; restored at run.steps, there is nothing to do and nothing is written).
Write config.yaml, compile the steps ahead of time (`compile`), write
run_info.json, fire `on_compile` (a dry run stops here). Initialise the state sharded
(unless restored), fire `on_train_start`, and loop: dispatch a step with at most two in
flight (`timing` times completions), place the next batch (`feed`), fire
`on_step_end`, evaluate every `run.eval_every` steps. The loop ends when the steps are
done, a plugin asked to stop (`controls`), every process agreed on a signal
(`nnxtrain.parallel.preemption`; before the loop, a signal ends the run at once, and
long compiles and waits run through `interruptible` so that it can), or a loss is not
finite; then `on_train_end`, and `teardown` (also after an exception, which fires
`on_exception` first). Every second from the
Trainer's creation (or `started`) is charged to a bucket of the goodput account
(`nnxtrain.train.goodput`), kept in run_info.json as the loop goes. `fit()` returns a
`FitResult` (`nnxtrain.train.result`).
"""

import functools
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import optax
from rich.console import Console

from nnxtrain.config import Config
from nnxtrain.data import build_dataset, resolve_vocab
from nnxtrain.interop.init_from import resolve as resolve_init_from
from nnxtrain.model import Transformer, trainable
from nnxtrain.parallel.distributed import start_jax
from nnxtrain.parallel.mesh import build_mesh, resolve_batch
from nnxtrain.parallel.preemption import Preemption, interruptible
from nnxtrain.parallel.sharding import ActivationRecord, merge_rules
from nnxtrain.run.directory import make_run_dir, read_run_info, write_config, write_run_info
from nnxtrain.run.lock import RunLock
from nnxtrain.train.accounting import FlopsReport, step_flops
from nnxtrain.train.base import starting_state
from nnxtrain.train.compile import (
    CompiledMemory,
    CompiledStep,
    ModelFactory,
    StatePlan,
    compile_steps,
    plan_state,
)
from nnxtrain.train.controls import RunControls
from nnxtrain.train.events import (
    Callback,
    CompileEvent,
    EvalEndEvent,
    GoodputEvent,
    LazyMetrics,
    SetupEvent,
    StepEndEvent,
    TrainEndEvent,
    TrainStartEvent,
)
from nnxtrain.train.feed import Feed
from nnxtrain.train.fit import compiled_for, fit_lines
from nnxtrain.train.goodput import Goodput, cache_hits
from nnxtrain.train.goodput import table as goodput_table
from nnxtrain.train.hooks import Hooks
from nnxtrain.train.preference import Preference
from nnxtrain.train.registry import build_callbacks
from nnxtrain.train.report import batch_rows, header, results, run_info
from nnxtrain.train.result import FitResult, nothing_to_do
from nnxtrain.train.step import TrainState, make_optimizer, metric_names, zero_sums
from nnxtrain.train.timing import StepRecord, StepWatcher, nonfinite_reason

__all__ = ["CompiledMemory", "FitResult", "Trainer"]


class Trainer(RunControls):
    """Trains a decoder LM from a `Config`, firing events to callbacks in order.

    Parts can be swapped from Python: `callbacks` (default: built from `config.callbacks`),
    `model_factory` (rngs -> nnx.Module returning logits), `dataset` (an object with
    `batch(step, batch_size, seq_len, split, rows)` and `loss_floor`), `optimizer` (an optax
    transformation and its learning-rate schedule), `devices`. `started`: the
    `time.perf_counter()` at which the run began before the Trainer (the CLI passes its
    process's start): the goodput account charges the time since to `startup`.
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
        started: float | None = None,
    ):
        self.goodput = Goodput(started=started)  # the run's wall time (nnxtrain.train.goodput)
        RunControls.__init__(self)  # stop, save, skip bad steps (nnxtrain.train.controls)
        with self.goodput.timed("init"):
            self.config = config = resolve_init_from(config)  # run.init_from's shape, tokenizer
            start_jax(config)  # before anything asks JAX for its devices
            config, devices = compiled_for(config, devices)  # mesh.target; dtype auto
            self.hooks = Hooks(
                callbacks if callbacks is not None else build_callbacks(config.callbacks),
                self.goodput,
            )
            self.callbacks: Sequence[Callback] = self.hooks.callbacks
            self.dataset = dataset if dataset is not None else build_dataset(config)
            # model.vocab_size from the tokenizer, before the model is built
            config = self.config = resolve_vocab(config, self.dataset)
            self.model_factory: ModelFactory = model_factory or (
                lambda rngs: Transformer(config.model, rngs=rngs)
            )
            self._optimizer, self._devices = optimizer, devices
            self.console = console or Console(quiet=jax.process_index() != 0, soft_wrap=True)
        self.preemption = Preemption(config.run.preempt_check_every, config.mesh.heartbeat_timeout)
        # Filled in by fit(); public so that plugins can read them (see events.TrainerView).
        self.mesh: jax.sharding.Mesh | None = None
        self.run_dir = ""
        self.flops: FlopsReport | None = None
        self.plan: StatePlan | None = None
        self.abstract_state: Any = None  # TrainState of ShapeDtypeStructs with shardings
        self.state_shardings: Any = None
        self.activations: Mapping[str, ActivationRecord] = {}  # the train step's
        self.compiled: Any = None  # the compiled train step
        self.eval_step: CompiledStep | None = None
        self.feed: Feed | None = None
        self.state: TrainState | None = None  # a plugin may set it in on_setup (restore)
        self.step = 0
        self.preempted: str | None = None  # the signal every process agreed to stop on
        self.run_info: dict[str, Any] = {}
        self.best_eval_loss: float | None = None
        self.run_lock = RunLock()  # held on run_dir from setup to the end of fit()
        self._fit_started = 0.0
        self.tokens_trained = 0  # non-padding tokens of this fit()'s steps
        self._earlier_goodput: Any = None  # run_info.json's account, from an earlier attempt
        self._looped = False  # whether the loop started (then the account is written)

    # -- for plugins (the controls are nnxtrain.train.controls.RunControls) ---------------------

    @property
    def graphdef(self) -> Any:
        """The model's structure: `nnx.merge(trainer.graphdef, trainer.state.params)`."""
        return self.plan.graphdef if self.plan is not None else None

    # -- the run -------------------------------------------------------------------------

    def fit(self) -> FitResult:
        """Runs setup, compilation and the loop; returns the final state and metrics."""
        where, watcher = "setup", None
        self._fit_started = time.perf_counter()
        self.preemption.install()
        try:
            with self.goodput.timed("init"):
                self._setup()
            if self.step >= self.config.run.steps:  # a plugin restored a finished run
                steps, console = self.config.run.steps, self.console
                return nothing_to_do(self.run_dir, self.step, steps, self.state, console)
            with self.goodput.timed("compile"):
                hits = cache_hits()
                self._compile()
                self.goodput.cache_hits = cache_hits() - hits
            if self.config.run.dry_run:
                self.console.print("dry run: steps compiled, no parameters allocated; exiting")
                return FitResult(None, 0, "dry run", {}, {}, self.run_dir)
            where, watcher = "loop", StepWatcher(metric_names(self.config))
            self._watcher = watcher
            return self._train(watcher)
        except BaseException as e:
            self.hooks.fire_exception(self, e, where)
            lost = self.preemption.lost_processes(e) if where == "loop" else None
            if lost is not None and lost is not e:
                raise lost from e  # a peer died: name it rather than its collective's error
            raise
        finally:
            self.preemption.uninstall()
            if watcher is not None:
                watcher.close()
            try:
                self.hooks.teardown(self)  # the checkpointer's last write ends here
                if self._looped:  # the account, also after an error
                    self.console.print(goodput_table(self.goodput.report()))
                    keep_account(self)  # after the table: run_info's wall is all but this
                    self.console.print(results(self.run_dir), markup=False, highlight=False)
            finally:
                self.run_lock.release()

    def _setup(self) -> None:
        self.mesh = build_mesh(self.config.mesh, self._devices)
        cfg = self.config = resolve_batch(self.config, self.mesh)
        self.run_dir = make_run_dir(cfg)
        self.run_lock.take(self.run_dir, cfg.mesh.init_timeout)  # before any file is written
        rules = merge_rules(cfg.mesh.rules)
        self._earlier_goodput = read_run_info(self.run_dir).get("goodput")  # before it's rewritten
        self.flops = step_flops(cfg.model, batch_rows(cfg), cfg.run.seq_len, self.mesh.size)
        tx, _ = self._optimizer or make_optimizer(cfg.optim, cfg.run.steps)
        plan = self.plan = plan_state(
            self.model_factory, tx, cfg.run.seed, self.mesh, rules, trainable(cfg.model)
        )
        self.abstract_state, self.state_shardings = plan.abstract, plan.shardings
        floor = getattr(self.dataset, "loss_floor", None)
        trained = plan.num_trainable
        self.console.print(header(cfg, self.mesh, self.flops, plan.num_params, floor, trained))
        self.hooks.fire(
            "on_setup",
            self,
            SetupEvent(cfg, self.mesh, self.abstract_state, self.flops, self.run_dir, floor),
        )
        self.step = int(jax.device_get(self.state.step)) if self.state is not None else 0

    def _compile(self) -> None:
        cfg, plan, rules = self.config, self.plan, merge_rules(self.config.mesh.rules)
        assert plan is not None and self.mesh is not None and self.flops is not None
        if not (records := write_config(self.run_dir, cfg)):
            self.console.print(f"dry run: keeping the records of the run in {self.run_dir}")
        # Built again (make_optimizer is pure): the transformation the state was planned with.
        tx, schedule = self._optimizer or make_optimizer(cfg.optim, cfg.run.steps)
        floor = getattr(self.dataset, "loss_floor", None)
        self.feed = Feed(self.dataset, self.mesh, cfg.run.batch_size, cfg.run.seq_len)
        train, self.eval_step = compile_steps(
            plan,
            self.mesh,
            rules,
            self.feed.spec(),
            tx=tx,
            schedule=schedule,
            z_loss=cfg.optim.z_loss,
            grad_accum=cfg.run.grad_accum,
            loss_chunk=cfg.run.loss_chunk,
            with_eval=cfg.run.eval_every > 0,
            preference=Preference.of(self),
            names=metric_names(cfg),
        )
        self.compiled, self.activations = train.compiled, train.activations
        steps = [step for step in (train, self.eval_step) if step is not None]
        self.goodput.compiles = len(steps)
        # each step's memory; for a mesh.target, whether it fits its HBM and what it moves
        self.console.print("\n".join([s.summary() for s in steps] + fit_lines(cfg, train, plan)))
        self.run_info = run_info(cfg, self.mesh, self.flops, plan, floor, steps)
        if records:
            write_run_info(self.run_dir, self.run_info)
        self.hooks.fire("on_compile", self, CompileEvent(train, self.eval_step))

    def _train(self, watcher: StepWatcher) -> FitResult:
        cfg = self.config
        assert self.plan is not None
        with self.goodput.timed("init"):  # init_from only when nothing (or LoRA) was restored
            self.state = starting_state(cfg, self.plan, self.state, self.mesh, self.console)
        self.step = start_step = int(interruptible(jax.device_get, self.state.step))
        if start_step > 0:  # resumed: the earlier attempts' seconds count too
            self.goodput.resume(self._earlier_goodput, start_step)
        self._looped = True
        self.hooks.fire("on_train_start", self, TrainStartEvent(self.step, cfg.run.steps))
        t_start = time.perf_counter()
        with self.goodput.timed("step"):
            reason, eval_metrics = self._loop(watcher)
            # A run stopped before its first step (a signal, a plugin) has nothing to wait for.
            final = watcher.wait(self.step).metrics if self.step > start_step else {}
        if reason == "completed" and watcher.nonfinite is not None:
            reason = nonfinite_reason(watcher.nonfinite)
        return end_of_run(self, reason, final, eval_metrics, time.perf_counter() - t_start)

    def _loop(self, watcher: StepWatcher) -> tuple[str, dict[str, float]]:
        """Steps until done or stopped; returns (reason, the last eval metrics)."""
        num_steps, eval_every, feed = self.config.run.steps, self.config.run.eval_every, self.feed
        assert feed is not None
        eval_metrics: dict[str, float] = {}
        log_every, account = self.config.run.log_every, self.goodput
        with account.timed("data"):
            batch = feed.train(self.step) if self.step < num_steps else None
        while self.step < num_steps:
            if (signal_name := self.preemption.agreed_stop(self.step)) is not None:
                self.preempted = signal_name
                return f"preempted: {signal_name}", eval_metrics
            if (stopped := self.stopped()) is not None:
                return stopped, eval_metrics
            if watcher.nonfinite is not None:
                return nonfinite_reason(watcher.nonfinite), eval_metrics
            watcher.throttle(self.step + 1)
            t = time.perf_counter()
            self.state, metrics = self.compiled(self.state, batch, self.guard())
            self.step = step = self.step + 1
            watcher.submit(step, t, metrics)
            if step < num_steps:
                with account.timed("data"):
                    batch = feed.train(step)  # overlaps with the device's work
            record = functools.partial(self._wait_for, watcher, step)
            self.tokens_trained += (tokens := feed.count_tokens(step - 1))  # non-padding
            event = StepEndEvent(step, num_steps, tokens, LazyMetrics(record), record)
            self.hooks.fire("on_step_end", self, event)
            if eval_every and (step % eval_every == 0 or step == num_steps):
                eval_metrics = self.evaluate()
            account.step_done(step)
            if account.keep_due(self.config.run.goodput_every):  # for an attempt killed later
                keep_account(self)
            if log_every and step % log_every == 0:
                self.hooks.fire("on_goodput", self, GoodputEvent(step, account.report()))
        return "completed", eval_metrics

    def _wait_for(self, watcher: StepWatcher, step: int) -> StepRecord:
        """A step's record; waiting for it is the step's time, whoever asks (a plugin)."""
        with self.goodput.timed("step"):
            return watcher.wait(step)

    def evaluate(self) -> dict[str, float]:
        """Mean loss over `run.eval_batches` held-out batches; fires `on_eval_end`."""
        assert self.state is not None and self.feed is not None and self.eval_step is not None
        num_batches, t0 = self.config.run.eval_batches, time.perf_counter()
        totals, means = zero_sums(), {}
        with self.goodput.timed("eval"):
            for i in range(num_batches):
                batch = self.feed.eval(i)
                totals, means = self.eval_step.compiled(self.state.params, batch, totals)
            metrics = {f"eval/{k}": float(v) for k, v in jax.device_get(means).items()}
        if self.best_eval_loss is None or metrics["eval/loss"] < self.best_eval_loss:
            self.best_eval_loss = metrics["eval/loss"]
        event = EvalEndEvent(self.step, metrics, num_batches, time.perf_counter() - t0)
        self.hooks.fire("on_eval_end", self, event)
        return metrics


def end_of_run(
    trainer: Trainer,
    reason: str,
    final: Mapping[str, float],
    eval_metrics: dict[str, float],
    seconds: float,
) -> FitResult:
    """After the loop: the done line, run_info.json's "final" record (and the goodput
    account so far, for plugins that read run_info in on_train_end; fit() completes it
    after teardown), `on_train_end`, `on_goodput`; the FitResult."""
    t, step, watcher = trainer, trainer.step, trainer._watcher
    loss = ""
    if final:  # a last step with no loss token has no loss (its 0 is no measurement)
        measured = final.get("total_weights", 1) != 0
        loss = f"; final loss {final['loss']:.4f}" if measured else "; final loss n/a"
    t.console.print(f"done: step {step}/{t.config.run.steps} in {seconds:.1f} s ({reason}){loss}")
    t.run_info["final"] = {
        "step": step,
        "reason": reason,
        "seconds": seconds,
        "metrics": dict(final),
        "eval_metrics": eval_metrics,
        "best_eval_loss": t.best_eval_loss,
    }
    if watcher is not None and watcher.first is not None:  # start-up: setup, compile, step 1
        t.run_info["seconds_to_first_step"] = watcher.first.completed_at - t._fit_started
    keep_account(t)  # with the final record
    failed = reason.startswith(("diverged", "not finite"))
    since = t.diverged_since if failed else None
    t.hooks.fire("on_train_end", t, TrainEndEvent(step, reason, seconds, since))
    t.hooks.fire("on_goodput", t, GoodputEvent(step, t.goodput.report()))
    tokens, busy = 0, 0.0  # the steps tokens/s is timed over: all but the first
    first = watcher.first if watcher is not None else None
    if watcher is not None and first is not None and t.feed is not None and step > first.step:
        tokens = t.tokens_trained - t.feed.count_tokens(first.step - 1)
        busy = watcher.busy_seconds - first.seconds
    return FitResult(
        t.state,
        step,
        reason,
        dict(final),
        eval_metrics,
        t.run_dir,
        seconds,
        t.best_eval_loss,
        timed_tokens=tokens,
        timed_seconds=busy,
        resume_step=t.resume_step,  # a checkpointer's note, in on_train_end
    )


def keep_account(trainer: Trainer) -> None:
    """Writes the goodput account so far into run_info.json (process 0), charged to
    `other`: at the end of fit(), and as the loop goes, so that an attempt killed without
    an end (SIGKILL) leaves its time to the account of the attempt that resumes it."""
    with trainer.goodput.timed("other"):
        trainer.run_info["goodput"] = trainer.goodput.state(trainer.step)
        write_run_info(trainer.run_dir, trainer.run_info)
