"""Profiler: traces a few training steps with the JAX profiler into `<run_dir>/profile`.

    nnxtrain +callbacks.prof._target_=profiler                      # steps 5..7
    nnxtrain +callbacks.prof._target_=profiler +callbacks.prof.start_step=20

Traces steps `start_step` .. `start_step + num_steps - 1` (1-based, as `event.step`
counts them) with `jax.profiler.start_trace` / `stop_trace`. Skip the first steps: they
include compilation warm-up. Before the trace starts it waits for the previous step to
finish, and before it stops it waits for the last traced step to finish (`event.record()`),
so the trace holds exactly those steps' device work; these two waits are the only ones it
adds. If the run ends early (a stop request, an exception), the trace is stopped in
`teardown`. A resumed run that is already past `start_step` traces nothing.

Open the result with TensorBoard's profile plugin or XProf (`tensorboard --logdir
<run_dir>/profile`), or load the `*.trace.json.gz` file into https://ui.perfetto.dev.
Uses only the public plugin API.
"""

import os

import jax

from nnxtrain import (
    Callback,
    ConfigError,
    SetupEvent,
    StepEndEvent,
    TrainEndEvent,
    TrainerView,
    TrainStartEvent,
    check_int,
)


class Profiler(Callback):
    """Traces steps start_step..start_step+num_steps-1 into <run_dir>/profile."""

    def __init__(self, start_step: int = 5, num_steps: int = 3, directory: str = "profile"):
        self.start_step, self.num_steps, self.directory = start_step, num_steps, directory
        self.path = ""
        self._active = False
        self._traced: list[int] = []  # steps ended while the trace ran

    @property
    def last_step(self) -> int:
        return self.start_step + self.num_steps - 1

    def on_setup(self, trainer: TrainerView, event: SetupEvent) -> None:
        for opt in ("start_step", "num_steps"):
            key = f"callbacks.{self.name}.{opt}"
            check_int(key, getattr(self, opt), 1, f"set {key}=1", " (steps count from 1)")
        if not self.directory:
            raise ConfigError(
                f"callbacks.{self.name}.directory",
                "must not be empty",
                "name a folder under run.dir (default: profile)",
            )
        self.path = os.path.join(event.run_dir, self.directory)
        if os.path.exists(self.path) and not os.path.isdir(self.path):  # not at start_step
            raise ConfigError(
                f"callbacks.{self.name}.directory",
                f"{self.path} is a file, not a directory",
                "name a folder under run.dir (default: profile)",
            )

    def on_train_start(self, trainer: TrainerView, event: TrainStartEvent) -> None:
        if event.step + 1 == self.start_step:
            self._start(trainer)

    def on_step_end(self, trainer: TrainerView, event: StepEndEvent) -> None:
        if self._active:
            self._traced.append(event.step)
            if event.step >= self.last_step:
                event.record()  # the last traced step has completed on the device
                self._stop(trainer)
        elif event.step + 1 == self.start_step:
            event.record()  # the trace starts on an idle device: only the traced steps
            self._start(trainer)

    def on_train_end(self, trainer: TrainerView, event: TrainEndEvent) -> None:
        self._stop(trainer)

    def teardown(self, trainer: TrainerView) -> None:
        self._stop(trainer)

    def _start(self, trainer: TrainerView) -> None:
        os.makedirs(self.path, exist_ok=True)
        jax.profiler.start_trace(self.path)
        self._active = True

    def _stop(self, trainer: TrainerView) -> None:
        if not self._active:
            return
        self._active = False
        jax.profiler.stop_trace()
        steps = (
            f"steps {self._traced[0]}-{self._traced[-1]}" if self._traced else "no complete step"
        )
        trainer.console.print(
            f"profiler: traced {steps} into {self.path}", markup=False, highlight=False
        )
