"""The plugin API: the `Callback` base class and the event objects handed to its hooks.

A plugin subclasses `Callback` and overrides only the hooks it needs; the trainer calls a
hook only on the callbacks that override it, so the others cost nothing. Every hook gets
the trainer first, then a frozen event object with the facts of that moment. docs/events.md
is the manual; in short:

    on_setup(trainer, SetupEvent)          config, mesh, abstract state, FLOPs exist
    on_compile(trainer, CompileEvent)      the train step was compiled ahead of time
    on_train_start(trainer, TrainStartEvent)  state initialised or restored
    on_step_end(trainer, StepEndEvent)     a step was dispatched; metrics are lazy
    on_eval_end(trainer, EvalEndEvent)     an evaluation pass completed
    on_train_end(trainer, TrainEndEvent)   the loop ended (done, stopped, not finite)
    on_exception(trainer, ExceptionEvent)  something raised in setup or the loop
    teardown(trainer)                      always, last: release files, threads, handles

Plugins steer the run through the trainer (`trainer.request_stop(reason)`,
`trainer.request_save()`), never by raising. `state_dict()`/`load_state_dict()` let a
plugin's own state ride along in checkpoints.
"""

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from nnxtrain.accounting import FlopsReport
    from nnxtrain.config import Config
    from nnxtrain.timing import StepRecord
    from nnxtrain.trainer import CompiledMemory, Trainer

HOOKS = (
    "on_setup",
    "on_compile",
    "on_train_start",
    "on_step_end",
    "on_eval_end",
    "on_train_end",
    "on_exception",
)


class Callback:
    """Base class of every plugin. Override the hooks you need; all default to no-ops."""

    #: Set by the loader to the config key (`callbacks.<name>`); the class name otherwise.
    name: str = ""

    def on_setup(self, trainer: "Trainer", event: "SetupEvent") -> None:
        """Config, mesh, abstract state and accounting exist; nothing is allocated yet."""

    def on_compile(self, trainer: "Trainer", event: "CompileEvent") -> None:
        """The train step has been compiled ahead of time."""

    def on_train_start(self, trainer: "Trainer", event: "TrainStartEvent") -> None:
        """The state is initialised (or restored); the first step is about to run."""

    def on_step_end(self, trainer: "Trainer", event: "StepEndEvent") -> None:
        """A step was dispatched; reading `event.metrics` waits for that step only."""

    def on_eval_end(self, trainer: "Trainer", event: "EvalEndEvent") -> None:
        """An evaluation pass completed."""

    def on_train_end(self, trainer: "Trainer", event: "TrainEndEvent") -> None:
        """The loop ended: all steps done, a stop was requested, or a loss was not finite."""

    def on_exception(self, trainer: "Trainer", event: "ExceptionEvent") -> None:
        """Something raised during setup or the loop; the run is about to end."""

    def teardown(self, trainer: "Trainer") -> None:
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
    """Fired once the train step has been lowered and compiled."""

    compiled: Any  # the jax Compiled object: .memory_analysis(), .cost_analysis(), .as_text()
    memory: "CompiledMemory"  # per-device argument/output/alias/temp/total bytes
    lower_seconds: float  # time to trace and lower the step
    compile_seconds: float  # time XLA took to compile it


@dataclass(frozen=True)
class TrainStartEvent:
    """Fired when the state exists; `step` is the number of steps already done."""

    step: int  # steps already taken (0 for a fresh run, N after a restore)
    num_steps: int  # run.steps: the loop ends when step reaches this


class LazyMetrics(Mapping[str, float]):
    """A step's scalar metrics, fetched from the device only when first read.

    Keys: loss, lm_loss, z_loss, perplexity, total_weights, grad_norm, lr.
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
    tokens: int  # tokens in this step's global batch (padding included)
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
    reason: str  # "completed", "stopped: <why>", "preempted: SIGTERM", "not finite: <what>"
    seconds: float  # wall time of the loop


@dataclass(frozen=True)
class ExceptionEvent:
    """Fired when setup or the loop raised; teardown still follows."""

    step: int  # steps done when it happened
    exception: BaseException  # what was raised
    where: str  # "setup", "loop", or "<callback>.<hook>"
