"""What plugins may ask of a run: stop it (as done or as failed), save now, skip the
update of bad steps, and say where a divergence began and where a rerun resumes. The
`Trainer` holds these controls; the loop reads them.

    trainer.request_stop("enough")              # reason "stopped: enough", exit 0
    trainer.request_failure_stop("diverged")    # reason "diverged: ...", the CLI exits 3
    trainer.request_save()                      # the checkpointer saves at its next step
    trainer.skip_bad_steps(loss_limit=9.0)      # the step's guard input (step.GUARD_OFF)
    trainer.mark_divergence(since=3)            # a guard: steps 3, 4, ... were bad
    trainer.diverged_since                      # that, or the first non-finite step
    trainer.note_resume_step(1)                 # a checkpointer: a rerun resumes at step 1

The skip guard is an input of the compiled train step (a float32 vector replicated over
the mesh), so changing the limits never recompiles.
"""

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nnxtrain.train.step import GUARD_OFF
from nnxtrain.train.timing import StepWatcher


class RunControls:
    """The controls' state, and the calls plugins make (see the module docstring)."""

    mesh: Mesh | None

    def __init__(self) -> None:
        self.stop_reason: str | None = None
        self.save_requested = False
        self._stop_failed = False  # request_failure_stop: the run ends as failed
        self._guard: Any = None  # the train step's skip guard; None: GUARD_OFF
        self._guard_values: tuple[float, ...] = ()  # what _guard holds
        self._watcher: StepWatcher | None = None  # the loop's; set by the Trainer's fit()
        self._divergence: int | None = None  # mark_divergence
        self.resume_step: int | None = None  # note_resume_step

    @property
    def nonfinite_step(self) -> int | None:  # see events.TrainerView
        return self._watcher.nonfinite_step if self._watcher is not None else None

    @property
    def diverged_since(self) -> int | None:  # see events.TrainerView
        marks = [s for s in (self._divergence, self.nonfinite_step) if s is not None]
        return min(marks) if marks else None

    def mark_divergence(self, since: int | None) -> None:
        """For a guard plugin: every step from `since` on was bad (see events.TrainerView)."""
        self._divergence = since

    def note_resume_step(self, step: int | None) -> None:
        """For the checkpointing plugin: the step a rerun resumes from (`FitResult`)."""
        self.resume_step = step

    def request_stop(self, reason: str) -> None:
        """Ends the loop before the next step; `on_train_end` then reports the reason."""
        if self.stop_reason is None:
            self.stop_reason = reason

    def request_failure_stop(self, reason: str) -> None:
        """Ends the loop before the next step as a failed run: `on_train_end` reports
        "diverged: <reason>" and the CLI exits 3 (as for a non-finite loss)."""
        if self.stop_reason is None:
            self.stop_reason, self._stop_failed = reason, True

    def stopped(self) -> str | None:
        """The loop's end reason once a stop was requested ("stopped: ..." or
        "diverged: ..."), else None."""
        if self.stop_reason is None:
            return None
        return f"{'diverged' if self._stop_failed else 'stopped'}: {self.stop_reason}"

    def request_save(self) -> None:
        """Asks the checkpointing plugin to save after the current step."""
        self.save_requested = True

    def consume_save_request(self) -> bool:
        """For the checkpointing plugin: whether a save was requested; clears the request."""
        requested, self.save_requested = self.save_requested, False
        return requested

    def skip_bad_steps(
        self, loss_limit: float = math.inf, grad_norm_limit: float = math.inf
    ) -> None:
        """From the next step on, a step whose loss or gradient norm is not finite or above
        its limit leaves the parameters and optimizer state as they were (`skipped` = 1
        in its metrics). The limits must be the same on every process (they come from
        the global metrics)."""
        values = (1.0, float(loss_limit), float(grad_norm_limit))
        if values != self._guard_values:  # a plugin may call this every step: place on change
            self._guard, self._guard_values = self._place(list(values)), values

    def guard(self) -> jax.Array:
        """The skip guard the next step gets."""
        if self._guard is None:
            self._guard = self._place(list(GUARD_OFF))
        return self._guard

    def _place(self, values: list[float]) -> jax.Array:
        assert self.mesh is not None, "the mesh is built in fit()"
        sharding = NamedSharding(self.mesh, PartitionSpec())
        return jax.device_put(np.asarray(values, np.float32), sharding)
