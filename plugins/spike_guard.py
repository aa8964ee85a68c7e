"""Spike guard: a step whose loss or gradient norm is not finite, or a spike far above the
recent ones, does not touch the model; too many in a row end the run.

    nnxtrain                                               # on by default
    nnxtrain callbacks.spike_guard.k=8 callbacks.spike_guard.window=200
    nnxtrain '~callbacks.spike_guard'                      # off: a NaN loss stops the run

Before every step it hands the trainer limits for the loss and the gradient norm
(`trainer.skip_bad_steps`): the median of the last `window` good steps plus `k` times
their median absolute deviation (scaled by 1.4826, so k is in standard deviations for
normal noise). Until `warmup` steps are known there is no spread to judge by, and a loss
above `warmup_factor` (10) times the median of the good losses so far is the spike: a
run that blows up in its first steps (loss 4.2, then 2,448) is caught within them.
The compiled step compares and, for a bad step, keeps the parameters and the optimizer
state bitwise as they were; the batch is consumed all the same. Each skipped step is
printed and appended to `<run dir>/skipped_batches.jsonl` (its step, batch index, loss,
gradient norm and why); after `max_consecutive` skipped steps in a row the run ends as
failed (`trainer.request_failure_stop`: the CLI exits 3).

Once a step's metrics reach the host it is judged again against the limits of all the
steps before it (the compiled step could only use those up to t - 3, and the first steps
had no limits at all): a *bad* step is a skipped one or one above those limits, and a
good step is any other. The first step of the current run of bad steps is told to the
trainer (`trainer.mark_divergence`): while it lasts the checkpointer keeps the last
checkpoint from before it, and if the run ends as diverged, it sets the checkpoints
saved from then on aside, so that a rerun resumes from a state that was still good.

The limits for step t come from the steps up to t - 3 only, which have always finished
when t is dispatched, so the guard never makes the host wait, and the limits are a pure
function of the run's metrics: a resumed run (the recent values ride in checkpoints as
this plugin's state) skips exactly the steps the uninterrupted run skips. Uses only the
public plugin API.
"""

import math
import os
import statistics
from collections.abc import Callable
from typing import IO, Any

from nnxtrain import (
    Callback,
    ConfigError,
    SetupEvent,
    StepEndEvent,
    StepRecord,
    TrainEndEvent,
    TrainerView,
    TrainStartEvent,
    check_int,
    drop_records_after,
    json_line,
)

SKIPPED_FILE = "skipped_batches.jsonl"
LAG = 3  # the limits of step t use steps <= t - LAG: finished when t is dispatched
MAD_TO_SIGMA = 1.4826  # MAD * this estimates a normal distribution's standard deviation


class SpikeGuard(Callback):
    """Skips the update of a step whose loss or gradient norm is not finite or a spike."""

    def __init__(
        self,
        window: int = 100,
        k: float = 6.0,
        warmup: int = 20,
        max_consecutive: int = 5,
        loss: bool = True,
        grad_norm: bool = True,
        warmup_factor: float = 10.0,
    ):
        self.window, self.k, self.warmup = window, k, warmup
        self.max_consecutive, self.warmup_factor = max_consecutive, warmup_factor
        self.watch = {"loss": loss, "grad_norm": grad_norm}
        # step -> (loss, grad_norm, skipped, bad) of the recent steps (see _prune)
        self.values: dict[int, tuple[float, float, bool, bool]] = {}
        self.bad_since: int | None = None  # the first step of the current run of bad steps
        self._gave_up = False  # a failure stop was requested: bad_since stays put
        self._pending: list[tuple[int, Callable[[], StepRecord]]] = []
        self._file: IO[str] | None = None
        self._run_dir = ""
        self._trainer: TrainerView | None = None

    # -- hooks ---------------------------------------------------------------------------

    def on_setup(self, trainer: TrainerView, event: SetupEvent) -> None:
        key = f"callbacks.{self.name}"
        for opt, low in (("window", 1), ("warmup", 1), ("max_consecutive", 1)):
            check_int(f"{key}.{opt}", getattr(self, opt), low, f"set {key}.{opt}")
        if isinstance(self.k, bool) or not (isinstance(self.k, int | float) and self.k > 0):
            raise ConfigError(f"{key}.k", f"must be a number > 0, got {self.k!r}", f"set {key}.k=6")
        f = self.warmup_factor
        if isinstance(f, bool) or not (isinstance(f, int | float) and (f == 0 or f > 1)):
            raise ConfigError(
                f"{key}.warmup_factor",
                f"must be a number > 1, or 0 for off, got {f!r}",
                f"set {key}.warmup_factor=10",
            )
        self._run_dir = event.run_dir

    def on_train_start(self, trainer: TrainerView, event: TrainStartEvent) -> None:
        self._trainer = trainer
        if not trainer.console.quiet:
            path = os.path.join(self._run_dir, SKIPPED_FILE)
            drop_records_after(path, event.step)  # a resumed run skips those steps again
            self._file = open(path, "a")  # noqa: SIM115 (closed in teardown)
        trainer.skip_bad_steps(*self.limits(event.step + 1))
        trainer.mark_divergence(self.bad_since)  # as restored

    def on_step_end(self, trainer: TrainerView, event: StepEndEvent) -> None:
        self._pending.append((event.step, event.record))
        self._resolve(trainer, upto=event.step + 1 - LAG)  # finished: no wait
        trainer.skip_bad_steps(*self.limits(event.step + 1))

    def on_train_end(self, trainer: TrainerView, event: TrainEndEvent) -> None:
        self._resolve(trainer, upto=event.step)

    def teardown(self, trainer: TrainerView) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def state_dict(self) -> dict[str, Any]:
        # Called at a save: the steps still in flight are waited for, so the checkpoint
        # holds every value the limits after it need.
        if self._trainer is not None:
            self._resolve(self._trainer, upto=self._trainer.step)
        values = {str(s): list(v) for s, v in self.values.items()}
        return {"values": values, "bad_since": self.bad_since}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # (a checkpoint of an older nnxtrain has no `bad` flag: its skipped steps were bad)
        self.values = {
            int(s): (float(v[0]), float(v[1]), bool(v[2]), bool(v[3] if len(v) > 3 else v[2]))
            for s, v in state["values"].items()
        }
        self.bad_since = state.get("bad_since")

    # -- the limits ----------------------------------------------------------------------

    def limits(self, step: int, lag: int = LAG) -> tuple[float, float]:
        """(loss limit, grad-norm limit) for `step`, from the good steps <= step - lag."""
        recent = [v for s, v in sorted(self.values.items()) if s <= step - lag and not v[3]][
            -self.window :
        ]
        if len(recent) < self.warmup:
            return self._warmup_limit([v[0] for v in recent]), math.inf
        out = []
        for i, name in enumerate(("loss", "grad_norm")):
            xs = [v[i] for v in recent]
            median = statistics.median(xs)
            mad = statistics.median(abs(x - median) for x in xs) * MAD_TO_SIGMA
            # A flat history (MAD 0) would skip any change: allow 1% of the median at least.
            spread = max(mad, 0.01 * abs(median), 1e-12)
            out.append(median + self.k * spread if self.watch[name] else math.inf)
        return out[0], out[1]

    def _warmup_limit(self, losses: list[float]) -> float:
        """The loss limit before `warmup` steps are known: `warmup_factor` times the
        median of the good losses so far (their median, not the first alone, as one batch
        may be unusually easy; good ones only, as the steps before the first limit went
        unjudged)."""
        if not (self.warmup_factor and self.watch["loss"] and losses):
            return math.inf
        reference = statistics.median(losses)
        return self.warmup_factor * reference if reference > 0 else math.inf

    def _bad(self, step: int, loss: float, norm: float) -> bool:
        """Whether a step that was not skipped is bad all the same, judged by the limits
        of all the steps before it (the compiled step had only those up to step - LAG)."""
        if not (math.isfinite(loss) and math.isfinite(norm)):
            return True
        loss_limit, norm_limit = self.limits(step, lag=1)
        return loss > loss_limit or norm > norm_limit

    def _resolve(self, trainer: TrainerView, upto: int) -> None:
        """Reads the metrics of the pending steps <= upto; logs the skipped ones; tells the
        trainer where the current run of bad steps began."""
        while self._pending and self._pending[0][0] <= upto:
            step, record = self._pending.pop(0)
            m = record().metrics
            if m.get("total_weights", 1) == 0:  # no loss token: nothing to judge or learn
                continue
            loss, norm = m["loss"], m["grad_norm"]
            skipped = m.get("skipped", 0.0) > 0
            bad = skipped or self._bad(step, loss, norm)
            self.values[step] = (loss, norm, skipped, bad)
            if not self._gave_up:
                self.bad_since = (
                    (step if self.bad_since is None else self.bad_since) if bad else None
                )
            if skipped:
                self._skipped(trainer, step, m)
        trainer.mark_divergence(self.bad_since)
        self._prune(upto)

    def _prune(self, upto: int) -> None:
        # Enough for `window` unskipped steps unless more than `window` were skipped among
        # them, which max_consecutive stops long before; a function of the step alone.
        for s in [s for s in self.values if s <= upto - 2 * self.window - LAG]:
            del self.values[s]

    def _skipped(self, trainer: TrainerView, step: int, m: Any) -> None:
        loss, norm = m["loss"], m["grad_norm"]
        why = "not finite" if not (math.isfinite(loss) and math.isfinite(norm)) else "spike"
        run = 0
        while self.values.get(step - run, (0, 0, False))[2]:
            run += 1
        record = {"step": step, "batch": step - 1, "loss": loss, "grad_norm": norm, "why": why}
        if self._file is not None:
            self._file.write(json_line(record))
            self._file.flush()
        trainer.console.print(
            f"spike_guard: skipped step {step} (batch {step - 1}): {why}, loss {loss:.4g}, "
            f"grad_norm {norm:.4g}; parameters and optimizer state kept"
            + (f" ({run} in a row)" if run > 1 else ""),
            markup=False,
            highlight=False,
        )
        if run >= self.max_consecutive and not self._gave_up:
            self._gave_up = True  # the divergence began at bad_since; later steps don't move it
            trainer.request_failure_stop(
                f"spike_guard skipped {run} steps in a row (the last: step {step}, {why}); "
                f"lower optim.lr, check the data around batch {step - 1}, or raise "
                f"callbacks.{self.name}.max_consecutive"
            )
