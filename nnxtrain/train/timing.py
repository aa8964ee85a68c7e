"""True step timing: a background thread that watches dispatched steps complete.

JAX dispatches asynchronously, so the time a Python call takes says nothing about the
device. `StepWatcher` gets each step's scalar metrics (packed in one small vector) right
after dispatch; a
daemon thread waits for them to be ready, stamps the completion time and copies them to
the host. Step seconds are then the time between consecutive completions, which is what
the device really spent, and the loop itself never waits on the device except to keep at
most `max_in_flight` steps queued. `busy_seconds` adds up each step's seconds less its
host gap: the device's time on the train steps alone (a sweep's tokens/s is timed by it).
"""

import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from queue import SimpleQueue
from typing import Any

import jax
import numpy as np


@dataclass(frozen=True)
class StepRecord:
    """When step `step` was dispatched and completed, and its metrics on the host."""

    step: int
    dispatched_at: float  # perf_counter() when the loop dispatched the step
    completed_at: float  # perf_counter() when its outputs were ready
    seconds: float  # completed_at minus the previous step's completion (or dispatch)
    host_gap: float  # time the device waited for the host before this step (>= 0)
    metrics: Mapping[str, float]


class StepWatcher:
    """Records completions in order; `wait(step)` blocks until that step is recorded."""

    def __init__(self, names: Sequence[str], max_in_flight: int = 2, keep: int = 4096):
        self.names = tuple(names)  # what each entry of a step's metrics vector is
        self.max_in_flight, self.keep = max_in_flight, keep
        self._queue: SimpleQueue[tuple[int, float, Any] | None] = SimpleQueue()
        self._records: dict[int, StepRecord] = {}
        self._done = threading.Condition()
        self._last_completed: float | None = None
        self._last_step = -1
        self._submitted = self._completed = 0  # throttle counts steps: a resumed run starts at N
        self._error: BaseException | None = None
        # The device's time on the recorded steps: each step's seconds less its host gap,
        # so evaluation, saves and slow hooks between steps are not in it.
        self.busy_seconds = 0.0
        self.first: StepRecord | None = None  # the first step's record, kept for good
        self.nonfinite: StepRecord | None = None  # first step whose loss or grad norm is not finite
        self._thread = threading.Thread(target=self._run, name="nnxtrain-step-watcher", daemon=True)
        self._thread.start()

    @property
    def nonfinite_step(self) -> int | None:
        """The first recorded step whose loss or gradient norm is not finite, or None."""
        return self.nonfinite.step if self.nonfinite is not None else None

    def submit(self, step: int, dispatched_at: float, metrics: jax.Array) -> None:
        """Queues a dispatched step; `metrics` is one vector, ordered as `names`."""
        self._submitted += 1
        self._queue.put((step, dispatched_at, metrics))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            step, dispatched_at, arrays = item
            try:
                # One device-to-host copy per step, and it waits for the step to finish.
                host = np.asarray(jax.device_get(arrays), dtype=np.float64)
            except BaseException as e:  # surfaced to the loop by wait()
                with self._done:
                    self._error = e
                    self._done.notify_all()
                return
            now = time.perf_counter()
            start = dispatched_at if self._last_completed is None else self._last_completed
            gap = 0.0 if self._last_completed is None else max(0.0, dispatched_at - start)
            record = StepRecord(
                step,
                dispatched_at,
                now,
                now - start,
                gap,
                dict(zip(self.names, host.tolist(), strict=True)),
            )
            self._last_completed = now
            skipped = record.metrics.get("skipped", 0.0) > 0  # the guard kept the state
            if (
                self.nonfinite is None
                and not skipped
                and not all(
                    math.isfinite(record.metrics.get(k, 0.0)) for k in ("loss", "grad_norm")
                )
            ):
                self.nonfinite = record
            with self._done:
                self.first = self.first or record
                self._records[step] = record
                self._last_step = step
                self.busy_seconds += record.seconds - record.host_gap
                self._completed += 1
                self._records.pop(step - self.keep, None)
                self._done.notify_all()

    def wait(self, step: int) -> StepRecord:
        """The record of `step`, waiting for it to complete if needed."""
        with self._done:
            self._done.wait_for(
                lambda: step in self._records or self._error is not None or self._last_step >= step
            )
            if step in self._records:
                return self._records[step]
            if self._error is not None:
                raise self._error
            raise KeyError(f"step {step} is older than the last {self.keep} records")

    def throttle(self, next_step: int) -> None:
        """Before dispatching `next_step`, waits until few enough steps are still queued."""
        with self._done:
            self._done.wait_for(
                lambda: (
                    self._submitted - self._completed < self.max_in_flight
                    or self._error is not None
                )
            )
            if self._error is not None:
                raise self._error

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=60)


def nonfinite_reason(record: StepRecord) -> str:
    """The reason a run stops on a non-finite loss or gradient norm, with the fix."""
    m = record.metrics
    return (
        f"not finite: loss={m['loss']:.4g}, grad_norm={m['grad_norm']:.4g} at step "
        f"{record.step}; lower optim.lr or keep optim.clip_norm > 0"
    )
