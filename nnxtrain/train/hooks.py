"""Calling the plugins: each hook goes to the callbacks that override it, in config order.

    hooks = Hooks(callbacks, goodput)         # time in a plugin: goodput's callbacks/NAME
    hooks.fire("on_step_end", trainer, event)   # an error names the plugin and the hook
    hooks.fire_exception(trainer, exc, "loop")  # never masks the original error
    hooks.teardown(trainer)                     # always, after success or failure

A callback that does not override a hook is never called for it, so unused hooks cost
nothing in the loop. A plugin's exception ends the run as a one-line `PluginError` naming
the plugin and the hook (exit 2 from the CLI: the fix is in the plugin or its options);
its full traceback, which the plugin's author needs, is appended to
`<run dir>/errors.log` and the line says so. Errors in `on_exception` and `teardown` are
printed and logged the same way, never masking the error that ended the run.
"""

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from nnxtrain.errors import PluginError, UserError, first_line, log_traceback
from nnxtrain.train.events import HOOKS, Callback, ExceptionEvent, TrainerView, overrides
from nnxtrain.train.goodput import Goodput


class Hooks:
    """The run's callbacks, and the calls of their hooks."""

    def __init__(self, callbacks: Sequence[Callback], goodput: Goodput | None = None):
        self.callbacks = list(callbacks)
        self.goodput = goodput
        for cb in self.callbacks:
            cb.name = cb.name or type(cb).__name__
        names = [cb.name for cb in self.callbacks]
        if len(set(names)) != len(names):
            raise PluginError(
                f"callbacks: two plugins share a name in {names}. "
                "Fix: give each callback its own name."
            )
        self._by_hook = {h: [cb for cb in self.callbacks if overrides(cb, h)] for h in HOOKS}

    def fire(self, hook: str, trainer: TrainerView, event: Any) -> None:
        """Calls `hook` on every callback that overrides it; a plugin's error names it."""
        for cb in self._by_hook[hook]:
            try:
                with self._timed(cb):
                    getattr(cb, hook)(trainer, event)
            except UserError:
                raise
            except Exception as e:
                what = f"callback '{cb.name}' ({type(cb).__name__}) raised in {hook}"
                log = log_traceback(getattr(trainer, "run_dir", ""), e, what)
                fix = f"correct the plugin (its traceback is in {log})" if log else "correct it"
                error = PluginError(f"{what}: {first_line(e)}. Fix: {fix}.")
                error.log = log
                raise error from e

    def fire_exception(self, trainer: TrainerView, exc: BaseException, where: str) -> None:
        """`on_exception` on every callback that listens; their own errors are printed."""
        event = ExceptionEvent(trainer.step, exc, where)
        for cb in self._by_hook["on_exception"]:
            try:
                with self._timed(cb):
                    cb.on_exception(trainer, event)
            except Exception as e:  # never mask the original error
                self._report(trainer, cb, "on_exception", e)

    def teardown(self, trainer: TrainerView) -> None:
        """Every callback's `teardown`, each one whatever the others raised."""
        for cb in self.callbacks:
            try:
                with self._timed(cb):
                    cb.teardown(trainer)
            except Exception as e:
                self._report(trainer, cb, "teardown", e)

    def _timed(self, cb: Callback) -> AbstractContextManager[None]:
        return nullcontext() if self.goodput is None else self.goodput.timed(f"callbacks/{cb.name}")

    @staticmethod
    def _report(trainer: TrainerView, cb: Callback, hook: str, e: Exception) -> None:
        what = f"callback '{cb.name}' ({type(cb).__name__}) raised in {hook}"
        log = log_traceback(getattr(trainer, "run_dir", ""), e, what)
        trainer.console.print(
            f"{what}: {first_line(e)}" + (f" (traceback in {log})" if log else ""),
            markup=False,
            highlight=False,
            style="red",
        )
