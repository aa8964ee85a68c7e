"""Callback plugins the tests load by dotted path (`callbacks_for_tests.Recorder`).

They are written as a user would write a plugin, with only the public API. Every call
the recording ones see is appended to `LOG` as `(callback name, hook, event)`; tests
clear it first.
"""

import time
from typing import Any

from nnxtrain import Callback
from nnxtrain.train.events import HOOKS

LOG: list[tuple[str, str, Any]] = []


class Recorder(Callback):
    """Overrides every hook (and teardown) and records each call."""

    def on_setup(self, trainer: Any, event: Any) -> None:
        LOG.append((self.name, "on_setup", event))

    def on_compile(self, trainer: Any, event: Any) -> None:
        LOG.append((self.name, "on_compile", event))

    def on_train_start(self, trainer: Any, event: Any) -> None:
        LOG.append((self.name, "on_train_start", event))

    def on_step_end(self, trainer: Any, event: Any) -> None:
        LOG.append((self.name, "on_step_end", event))

    def on_eval_end(self, trainer: Any, event: Any) -> None:
        LOG.append((self.name, "on_eval_end", event))

    def on_train_end(self, trainer: Any, event: Any) -> None:
        LOG.append((self.name, "on_train_end", event))

    def on_exception(self, trainer: Any, event: Any) -> None:
        LOG.append((self.name, "on_exception", event))

    def teardown(self, trainer: Any) -> None:
        LOG.append((self.name, "teardown", None))


class StepOnly(Callback):
    """Overrides only on_step_end; records any lookup of another hook on the instance."""

    def __getattribute__(self, attr: str) -> Any:
        if attr in HOOKS and attr != "on_step_end":
            LOG.append((object.__getattribute__(self, "name"), f"looked up {attr}", None))
        return super().__getattribute__(attr)

    def on_step_end(self, trainer: Any, event: Any) -> None:
        LOG.append((self.name, "on_step_end", event))


class StopAt(Callback):
    """Asks the trainer to stop after step `at`."""

    def __init__(self, at: int = 3):
        self.at = at

    def on_step_end(self, trainer: Any, event: Any) -> None:
        if event.step == self.at:
            trainer.request_stop(f"asked by {self.name} at step {event.step}")


class RaiseAt(Callback):
    """Raises RuntimeError in on_step_end at step `at`; records its teardown."""

    def __init__(self, at: int = 2):
        self.at = at

    def on_step_end(self, trainer: Any, event: Any) -> None:
        if event.step == self.at:
            raise RuntimeError(f"boom at step {event.step}")

    def teardown(self, trainer: Any) -> None:
        LOG.append((self.name, "teardown", None))


class SleepAt(Callback):
    """Keeps the host busy for `seconds` in on_step_end at step `at` (the device idles);
    logs when the sleep ended (`time.perf_counter()`, the clock of the step records)."""

    def __init__(self, at: int = 2, seconds: float = 0.3):
        self.at, self.seconds = at, seconds

    def on_step_end(self, trainer: Any, event: Any) -> None:
        if event.step == self.at:
            time.sleep(self.seconds)
            LOG.append((self.name, "slept until", time.perf_counter()))


class EvalAtStart(Callback):
    """Evaluates once before the first step: the eval loss of the starting weights (the
    metrics logger records it as step 0)."""

    def on_train_start(self, trainer: Any, event: Any) -> None:
        trainer.evaluate()


class Unchecked(Callback):
    """Options whose annotations the registry's type check leaves to the plugin: a class of
    its own, `Any`, none at all, and one that does not resolve at run time."""

    def __init__(
        self,
        where: "Path | None" = None,  # noqa: F821  # not imported: the hints do not resolve
        **extra: Any,
    ):
        self.where, self.extra = where, extra


class Tagged(Callback):
    """A user's plugin with annotated options of every kind the registry checks."""

    def __init__(
        self,
        every: int = 1,
        label: str | None = None,
        loud: bool = False,
        scale: float = 1.0,
        tags: list[str] | None = None,
        anything: Any = None,
        unannotated=None,  # no annotation: not checked
    ):
        self.every, self.label, self.loud, self.scale = every, label, loud, scale
        self.tags, self.anything, self.unannotated = tags, anything, unannotated


class SignalAt(Callback):
    """A slow set-up: sends `signal` to this process in on_setup, then keeps the host busy
    for `seconds`; logs "slept" only if the sleep ran to its end."""

    def __init__(self, signal: str = "SIGTERM", seconds: float = 30.0):
        self.signal, self.seconds = signal, seconds

    def on_setup(self, trainer: Any, event: Any) -> None:
        import os
        import signal

        os.kill(os.getpid(), getattr(signal, self.signal))
        time.sleep(self.seconds)
        LOG.append((self.name, "slept", self.seconds))


class SignalAtStep(Callback):
    """Sends `signal` to this process at the end of step `at` (a preemption mid-run)."""

    def __init__(self, at: int = 2, signal: str = "SIGTERM"):
        self.at, self.signal = at, signal

    def on_step_end(self, trainer: Any, event: Any) -> None:
        import os
        import signal

        if event.step == self.at:
            os.kill(os.getpid(), getattr(signal, self.signal))
