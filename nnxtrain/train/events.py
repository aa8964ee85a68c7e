"""The plugin API: the `Callback` base class and the event objects handed to its hooks.

A plugin subclasses `Callback` and overrides only the hooks it needs; the trainer calls a
hook only on the callbacks that override it, so the others cost nothing. Every hook gets
the trainer first, then a frozen event object with the facts of that moment. docs/events.md
is the manual; in short:

    on_setup(trainer, SetupEvent)          config, mesh, abstract state, FLOPs exist
    on_compile(trainer, CompileEvent)      the train and eval steps were compiled ahead of time
    on_train_start(trainer, TrainStartEvent)  state initialised or restored
    on_step_end(trainer, StepEndEvent)     a step was dispatched; metrics are lazy
    on_eval_end(trainer, EvalEndEvent)     an evaluation pass completed
    on_train_end(trainer, TrainEndEvent)   the loop ended (done, stopped, not finite)
    on_exception(trainer, ExceptionEvent)  something raised in setup or the loop
    teardown(trainer)                      always, last: release files, threads, handles

The `trainer` a hook receives is seen through `TrainerView`: the attributes and controls
a plugin may use. Plugins steer the run through it (`trainer.request_stop(reason)`,
`trainer.request_save()`), never by raising. `state_dict()`/`load_state_dict()` let a
plugin's own state ride along in checkpoints. This module imports no part of the trainer.
"""

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from jax.sharding import Mesh
    from rich.console import Console

    from nnxtrain.config import Config
    from nnxtrain.parallel.sharding import ActivationRecord
    from nnxtrain.train.accounting import FlopsReport
    from nnxtrain.train.compile import CompiledStep
    from nnxtrain.train.goodput import Goodput, GoodputReport
    from nnxtrain.train.step import TrainState
    from nnxtrain.train.timing import StepRecord

HOOKS = (
    "on_setup",
    "on_compile",
    "on_train_start",
    "on_step_end",
    "on_eval_end",
    "on_train_end",
    "on_goodput",
    "on_exception",
)


class TrainerView(Protocol):
    """What a plugin sees of the trainer: the run's facts, its state, and the controls.

    Treat every attribute as read-only except `state`. They are filled in as the run goes:
    `mesh`, `run_dir`, `flops`, `abstract_state` and `graphdef` before `on_setup`, `compiled` and
    `activations` before `on_compile`, `state` before `on_train_start` (a plugin may set
    it in `on_setup` or `on_train_start`, to restore).
    """

    config: "Config"  # the validated run config
    console: "Console"  # where plugins print (quiet on processes other than 0)
    callbacks: "Sequence[Callback]"  # every plugin of the run, in config order
    dataset: Any  # the dataset: batch(), and state_dict()/load_state_dict() when it has them
    mesh: "Mesh | None"  # the device mesh
    run_dir: str  # where this run writes its files
    flops: "FlopsReport | None"  # parameter count and FLOPs per step per device
    abstract_state: Any  # TrainState of ShapeDtypeStructs carrying their shardings
    state_shardings: Any  # TrainState of NamedShardings
    activations: "Mapping[str, ActivationRecord]"  # the train step's annotated activations
    compiled: Any  # the compiled train step (jax Compiled)
    state: "TrainState | None"  # the current train state (a plugin may replace it)
    step: int  # steps done
    run_info: dict[str, Any]  # what run_info.json holds
    preempted: str | None  # the signal all processes agreed to stop on, if any
    goodput: "Goodput"  # the wall-time account: report(); timed("checkpoint") for a saver

    @property
    def nonfinite_step(self) -> int | None:
        """The first step whose loss or gradient norm was not finite, among the steps whose
        metrics reached the host (after `event.record()` of step N: every step <= N)."""

    @property
    def diverged_since(self) -> int | None:
        """The first step of the divergence the run is in, if any: the earlier of a guard's
        `mark_divergence` and `nonfinite_step`. Step N's loss is computed on the state
        after step N - 1, so that state, and every later one, is suspect."""

    @property
    def graphdef(self) -> Any:
        """The model's structure: `nnx.merge(trainer.graphdef, trainer.state.params)`."""

    def request_stop(self, reason: str) -> None:
        """Ends the loop before the next step; `on_train_end` then reports the reason."""

    def request_failure_stop(self, reason: str) -> None:
        """Ends the loop as a failed run: `on_train_end` reports "diverged: <reason>" and
        the CLI exits 3."""

    def skip_bad_steps(self, loss_limit: float = ..., grad_norm_limit: float = ...) -> None:
        """From the next step on, a step whose loss or gradient norm is not finite or above
        its limit keeps the parameters and optimizer state (no recompiling)."""

    def request_save(self) -> None:
        """Asks the checkpointing plugin to save after the current step."""

    def consume_save_request(self) -> bool:
        """For the checkpointing plugin: whether a save was requested; clears the request."""

    def mark_divergence(self, since: int | None) -> None:
        """For a guard plugin: every step from `since` on had a bad loss or gradient norm
        (not finite, or a spike), so the run may be diverging from there; None: the last
        step was good again. Read back as `diverged_since`; a checkpointer keeps the last
        checkpoint from before it, and sets the later ones aside if the run fails."""

    def note_resume_step(self, step: int | None) -> None:
        """For the checkpointing plugin, in `on_train_end`: the step a rerun of this run
        dir resumes from (0: from the start); `fit()` returns it, the CLI names it."""


class Callback:
    """Base class of every plugin. Override the hooks you need; all default to no-ops."""

    #: Set by the loader to the config key (`callbacks.<name>`); the class name otherwise.
    name: str = ""

    def on_setup(self, trainer: "TrainerView", event: "SetupEvent") -> None:
        """Config, mesh, abstract state and accounting exist; nothing is allocated yet."""

    def on_compile(self, trainer: "TrainerView", event: "CompileEvent") -> None:
        """The train step (and the eval step, when the run evaluates) compiled ahead of time."""

    def on_train_start(self, trainer: "TrainerView", event: "TrainStartEvent") -> None:
        """The state is initialised (or restored); the first step is about to run."""

    def on_step_end(self, trainer: "TrainerView", event: "StepEndEvent") -> None:
        """A step was dispatched; reading `event.metrics` waits for that step only."""

    def on_eval_end(self, trainer: "TrainerView", event: "EvalEndEvent") -> None:
        """An evaluation pass completed."""

    def on_train_end(self, trainer: "TrainerView", event: "TrainEndEvent") -> None:
        """The loop ended: all steps done, a stop was requested, or a loss was not finite."""

    def on_goodput(self, trainer: "TrainerView", event: "GoodputEvent") -> None:
        """The goodput account so far: every `run.log_every` steps, and after `on_train_end`."""

    def on_exception(self, trainer: "TrainerView", event: "ExceptionEvent") -> None:
        """Something raised during setup or the loop; the run is about to end."""

    def teardown(self, trainer: "TrainerView") -> None:
        """Always called last, after success or failure: close files, join threads."""

    def state_dict(self) -> dict[str, Any]:
        """This plugin's state, saved in checkpoints (JSON-serialisable values)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what `state_dict()` returned."""


def overrides(callback: Callback, hook: str) -> bool:
    """Whether `callback` overrides `hook` (the trainer skips callbacks that don't)."""
    return getattr(type(callback), hook) is not getattr(Callback, hook)


@dataclass(frozen=True)
class SetupEvent:
    """Fired once, before any device memory is used for the model."""

    config: "Config"  # the validated run config (batch size resolved)
    mesh: "Mesh"  # the device mesh
    abstract_state: Any  # TrainState of ShapeDtypeStructs carrying their shardings
    flops: "FlopsReport"  # parameter count and FLOPs per step per device
    run_dir: str  # where this run writes its files
    loss_floor: float | None  # lowest reachable loss of the data, when known


@dataclass(frozen=True)
class CompileEvent:
    """Fired once the steps have been lowered and compiled, before any state exists.

    Each `CompiledStep` has `.compiled` (the jax Compiled object: .memory_analysis(),
    .cost_analysis(), .as_text()), `.memory` (per-device argument/output/alias/temp/total
    bytes), `.lower_seconds`, `.compile_seconds` and `.activations` (as traced).
    """

    train: "CompiledStep"  # the train step: (state, batch) -> (state, metrics)
    eval: "CompiledStep | None"  # the eval step: (params, batch) -> loss sums; None if
    # the run does not evaluate (run.eval_every=0)


@dataclass(frozen=True)
class TrainStartEvent:
    """Fired when the state exists; `step` is the number of steps already done."""

    step: int  # steps already taken (0 for a fresh run, N after a restore)
    num_steps: int  # run.steps: the loop ends when step reaches this


class LazyMetrics(Mapping[str, float]):
    """A step's scalar metrics, fetched from the device only when first read.

    Keys: loss, lm_loss, z_loss, perplexity, total_weights, grad_norm, lr, skipped; with
    data=preference also DPO's (nnxtrain.prefs.DPO_METRICS).
    """

    def __init__(self, record: Callable[[], "StepRecord"]):
        self._record = record

    def __getitem__(self, key: str) -> float:
        return self._record().metrics[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._record().metrics)

    def __len__(self) -> int:
        return len(self._record().metrics)


@dataclass(frozen=True)
class StepEndEvent:
    """Fired after step `step` has been dispatched (the device may still be running it).

    `metrics` and `record()` wait for this step only; a hook that reads neither lets the
    host run ahead. `trainer.state` is the state after this step.
    """

    step: int  # steps done, counting this one (1-based)
    num_steps: int  # run.steps
    tokens: int  # non-padding tokens in this step's global batch (tokens/s counts these)
    metrics: LazyMetrics  # loss, lm_loss, z_loss, perplexity, total_weights, grad_norm, lr
    record: Callable[[], "StepRecord"]  # completion time, seconds, host gap (waits)


@dataclass(frozen=True)
class EvalEndEvent:
    """Fired after an evaluation pass over `num_batches` held-out batches."""

    step: int  # training steps done when the evaluation ran
    metrics: Mapping[str, float]  # eval/loss, eval/lm_loss, eval/perplexity, eval/total_weights
    num_batches: int  # batches evaluated
    seconds: float  # wall time of the pass


@dataclass(frozen=True)
class TrainEndEvent:
    """Fired when the loop ends normally; `reason` says why."""

    step: int  # steps done
    reason: str  # "completed", "stopped: <why>", "preempted: SIGTERM", "not finite: <what>",
    # "diverged: <why>"
    seconds: float  # wall time of the loop
    # A failed run ("not finite" or "diverged"): the first step of the divergence, when
    # known (`trainer.diverged_since`: the state after step N - 1 gave its bad loss).
    diverged_since: int | None = None


@dataclass(frozen=True)
class GoodputEvent:
    """Where the run's wall time went so far (see nnxtrain.train.goodput and docs/goodput.md)."""

    step: int  # steps done
    report: "GoodputReport"  # seconds per bucket, wall time, goodput share, attempts


@dataclass(frozen=True)
class ExceptionEvent:
    """Fired when setup or the loop raised; teardown still follows."""

    step: int  # steps done when it happened
    exception: BaseException  # what was raised
    where: str  # "setup", "loop", or "<callback>.<hook>"
