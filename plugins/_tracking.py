"""What the experiment-tracker plugins share: `Tracker`, a base class that decides what
to log and when, and leaves each tool (`wandb_logger`, `mlflow_logger`) only its calls.

A tracker logs, from process 0 only:

- the resolved config, flattened to dotted keys (`optim.lr`, `callbacks.metrics.log_every`);
- in a Hydra multirun, the sweep's identity: its directory (one sweep = one group), the
  job number, and the job's overrides as `sweep.<key>`;
- every `every` steps (default `run.log_every`, and the last step) the train metrics as
  `train/<name>` with seconds per step and tokens/s, and every evaluation's `eval/<name>`,
  each at its step;
- at the end, `trainer.run_info` (what run_info.json holds: model, FLOPs, compile
  times, the final record, and whatever else the run adds there) and the file itself.

A tool that fails (not installed, bad URI, server down, full disk) never stops the run
unless asked: one warning line, and the tracker goes quiet for the rest of the run. With
`required=true` the same failure is fatal: a one-line `UserError` naming the key and
the fix, exit 2 from the CLI; a failure while connecting (in `on_setup`) stops the run
before anything is compiled or saved. Every call to the tool (connecting, starting its
run, each log, the end) runs on a daemon thread and is waited for at most `timeout`
seconds: a server that refuses connections or never answers is given up on in one line,
rather than retried for minutes, and SIGTERM or Ctrl-C during the wait end it at once
(and still reach the run's own handler, which stops the run). The tracker's run id
rides along in checkpoints, so that a resumed run continues the same tracker run. No
tool is imported until a tracker is switched on. Uses only the public API of `nnxtrain`.
"""

import dataclasses
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax

from nnxtrain import (
    Callback,
    ConfigError,
    EvalEndEvent,
    ExceptionEvent,
    SetupEvent,
    StepEndEvent,
    TrainEndEvent,
    TrainerView,
    TrainStartEvent,
    check_int,
    first_line,
    without_loss,
)

RUN_INFO = "run_info.json"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted keys; other values (lists, and empty mappings,
    so that their key is there) as they are."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = value
    return flat


def numeric(flat: Mapping[str, Any]) -> dict[str, float]:
    """The entries that are numbers (not bools), as floats: what a metric store accepts."""
    return {
        k: float(v)
        for k, v in flat.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def sweep_identity() -> dict[str, Any] | None:
    """This job's place in a Hydra multirun (sweep dir, job number, overrides), or None
    outside one (a single CLI run, or a `Trainer` from Python)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:  # hydra is a dependency; a stripped environment just has no sweeps
        return None
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    overrides: dict[str, str] = {}
    for item in hc.overrides.task:
        key, eq, value = str(item).partition("=")
        if eq and not key.startswith("~"):  # a deletion sets no value
            overrides[key.lstrip("+")] = value
    return {
        "dir": os.path.abspath(str(hc.sweep.dir)),
        "job": int(hc.job.num),
        "overrides": overrides,
    }


class Tracker(Callback):
    """Base of the tracker plugins: what to log and when; subclasses make the tool's calls."""

    tool: ClassVar[str] = ""  # the tool's name in messages
    extra: ClassVar[str] = ""  # the nnxtrain extra that installs it

    def __init__(self, every: int = 0, required: bool = False, timeout: float = 10.0):
        self.every, self.required, self.timeout = every, required, timeout
        self.run_id: str | None = None  # the tool's run, restored from a checkpoint
        self.run_dir = ""
        self.config: dict[str, Any] = {}
        self.sweep: dict[str, Any] | None = None
        self._active = False
        self._started = False
        self._every = 1
        self._last: tuple[int, float] | None = None  # (step, completion time) last logged
        self._status = "failed"
        self.where = ""  # where the tool's run lives, set by start() for the start-up line

    # -- what each tool provides ---------------------------------------------------------

    def load(self) -> None:
        """Imports the tool and reads its settings (local work: not bounded by `timeout`)."""
        raise NotImplementedError

    def remote(self) -> bool:
        """Whether the tool's calls reach a server (each bounded by `timeout`), rather than
        local files only (a local store's first set-up may take seconds on a busy host)."""
        return True

    def connect(self) -> None:
        """Checks that the tool can log (raising if not); starts no run."""
        raise NotImplementedError

    def start(self, params: dict[str, Any], resume: bool) -> str:
        """Starts (or, with `resume`, continues `self.run_id`) a run; returns its id."""
        raise NotImplementedError

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Logs scalar metrics at `step`."""
        raise NotImplementedError

    def finish(self, info: dict[str, Any], info_path: str | None, status: str) -> None:
        """Logs run_info (flattened) and its file, ends the run with `status`: 'completed',
        'preempted' (a rerun resumes it) or 'failed'."""
        raise NotImplementedError

    def fix(self) -> str:
        """How to make the tool work, for the one-line error."""
        return "check the tool's settings"

    # -- the hooks -----------------------------------------------------------------------

    def on_setup(self, trainer: TrainerView, event: SetupEvent) -> None:
        key = f"callbacks.{self.name}"
        check_int(f"{key}.every", self.every, 0, f"set {key}.every=10")
        timeout = self.timeout
        if isinstance(timeout, bool) or not (isinstance(timeout, int | float) and timeout > 0):
            raise ConfigError(
                f"{key}.timeout",
                f"must be a number of seconds > 0, got {timeout!r}",
                f"set {key}.timeout=10",
            )
        if jax.process_index() != 0:  # the other processes train along and log nothing
            return
        self._every = self.every or event.config.run.log_every
        self.run_dir = event.run_dir
        self.config = flatten(dataclasses.asdict(event.config))
        self.sweep = sweep_identity()
        self._active = True
        self._call(trainer, "set up", self.load, bounded=False)
        self._call(trainer, "set up", self.connect)

    def on_train_start(self, trainer: TrainerView, event: TrainStartEvent) -> None:
        params = dict(self.config)
        if self.sweep is not None:
            params |= {f"sweep.{k}": v for k, v in self.sweep["overrides"].items()}
            params |= {"sweep.dir": self.sweep["dir"], "sweep.job": self.sweep["job"]}
        resume = self.run_id is not None and event.step > 0

        def start() -> None:
            self.run_id = self.start(params, resume)
            self._started = True
            trainer.console.print(
                f"{self.name}: {self.tool} run {self.run_id}"
                + (" (resumed)" if resume else "")
                + (f": {self.where}" if self.where else ""),
                markup=False,
                highlight=False,
            )

        self._call(trainer, "start a run", start)

    def on_step_end(self, trainer: TrainerView, event: StepEndEvent) -> None:
        if not self._started or (event.step % self._every and event.step != event.num_steps):
            return
        record = event.record()  # waits for this step only
        # (no loss token: the loss metrics are left out, not logged as a perfect 0)
        taken = without_loss(record.metrics)  # every scalar of the step (DPO's too)
        metrics = {f"train/{k}": float(v) for k, v in taken.items() if v is not None}
        if self._last is not None and record.completed_at > self._last[1]:
            seconds = (record.completed_at - self._last[1]) / (event.step - self._last[0])
            metrics["train/seconds_per_step"] = seconds
            metrics["train/tokens_per_sec"] = event.tokens / seconds
        self._last = (event.step, record.completed_at)
        self._call(trainer, "log metrics", lambda: self.log(metrics, event.step))

    def on_eval_end(self, trainer: TrainerView, event: EvalEndEvent) -> None:
        if self._started:
            taken = without_loss(event.metrics, "eval/")
            metrics = {k: float(v) for k, v in taken.items() if v is not None}
            self._call(trainer, "log metrics", lambda: self.log(metrics, event.step))

    def on_train_end(self, trainer: TrainerView, event: TrainEndEvent) -> None:
        # Here rather than in teardown: run_info.json is complete, and a required
        # tracker's failure can still end the run with an error (teardown only reports).
        self._status = (
            "failed"
            if event.reason.startswith("not finite")
            else "preempted"
            if event.reason.startswith("preempted")
            else "completed"
        )
        self._end(trainer)

    def on_exception(self, trainer: TrainerView, event: ExceptionEvent) -> None:
        self._status = "failed"

    def teardown(self, trainer: TrainerView) -> None:
        if self._started:  # the run raised: end the tool's run as failed, best effort
            self._status = "failed"
            self._end(trainer)

    def _end(self, trainer: TrainerView) -> None:
        if not self._started:
            return
        self._started = False
        path = os.path.join(self.run_dir, RUN_INFO)
        info = json.loads(json.dumps(trainer.run_info, default=str))  # plain values only
        # The goodput ledger (seconds of each of the last 4096 steps, to cost lost work on a
        # resume) stays in the file: as values it would be thousands of metrics.
        info.get("goodput", {}).pop("step_seconds", None)
        exists = os.path.isfile(path)
        self._call(
            trainer,
            "log run_info",
            lambda: self.finish(info, path if exists else None, self._status),
        )
        self._active = False

    # -- failures ------------------------------------------------------------------------

    def _call(
        self, trainer: TrainerView, what: str, fn: Callable[[], None], bounded: bool = True
    ) -> None:
        """Runs one call to the tool, `bounded`: for at most `timeout` seconds when it
        reaches a server, and until a signal in any case. A failure warns once and
        silences the tracker, or, with `required`, ends the run in one line."""
        if not self._active:
            return
        try:
            if bounded:
                bounded_call(fn, self.timeout if self.remote() else None)
            else:
                fn()
        except Exception as e:
            self._active = self._started = False
            key = f"callbacks.{self.name}"
            if isinstance(e, ImportError):
                problem = f"{self.tool} is not installed ({first_line(e)})"
                fix = f"pip install 'nnxtrain[{self.extra}]'"
            elif isinstance(e, GaveUp):
                problem = f"{self.tool} could not {what} ({e})"
                fix = self.fix() + (f", or wait longer: {key}.timeout=60" if e.late else "")
            else:
                problem = f"{self.tool} could not {what} ({first_line(e, 300)})"
                fix = self.fix()
            if self.required:
                raise ConfigError(
                    f"{key}.required",
                    f"is true and {problem}",
                    f"{fix}, or set {key}.required=false to train without it",
                ) from e
            trainer.console.print(
                f"warning: {key}: {problem}; training goes on without it "
                f"(fix: {fix}; {key}.required=true makes this fatal)",
                markup=False,
                highlight=False,
                style="yellow",
            )

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id} if self.run_id else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state.get("run_id")


class GaveUp(Exception):
    """A call to a tool was given up on: no answer in time (`late`), or a signal came
    during the wait."""

    def __init__(self, message: str, late: bool):
        super().__init__(message)
        self.late = late


# How often the wait looks whether a signal came (the call itself ends it at once).
_POLL_S = 0.05


def bounded_call(fn: Callable[[], None], seconds: float | None) -> None:
    """Runs `fn` on a daemon thread and waits for it at most `seconds` (None: no limit):
    its exception is raised here; GaveUp when it has not returned by then, or when SIGTERM
    or SIGINT came during the wait. A call given up on is left to run on its thread (a
    daemon: it keeps no process alive). On the main thread, a signal during the wait also
    reaches the handler that was there before (the trainer's, which stops the run at the
    next step; a second Ctrl-C's KeyboardInterrupt comes through as it is)."""
    done, failure, heard = threading.Event(), list[BaseException](), list[str]()

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # handed to the waiting thread
            failure.append(e)
        finally:
            done.set()

    def on_signal(signum: int, frame: Any) -> None:
        before = saved.get(signum)
        if before != signal.SIG_IGN:
            heard.append(signal.Signals(signum).name)  # no lock taken: the wait polls this
        if callable(before):
            before(signum, frame)
        elif before == signal.SIG_DFL:  # the default action (SIGTERM: the process ends)
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    saved: dict[int, Any] = {}
    main = threading.current_thread() is threading.main_thread()
    try:
        if main:  # Python runs signal handlers on the main thread only
            for sig in (signal.SIGTERM, signal.SIGINT):
                saved[sig] = signal.signal(sig, on_signal)
        threading.Thread(target=run, name="nnxtrain-tracker", daemon=True).start()
        deadline = time.monotonic() + (seconds if seconds is not None else math.inf)
        while not done.wait(min(_POLL_S, max(deadline - time.monotonic(), 0.0))):
            if heard:
                raise GaveUp(f"stopped waiting for it: {heard[0]}", late=False)
            if time.monotonic() >= deadline:
                raise GaveUp(f"no answer within {seconds:g} s", late=True)
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
    if failure:
        raise failure[0]
