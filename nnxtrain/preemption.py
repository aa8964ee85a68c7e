"""Preemption: SIGTERM and SIGINT end the run at a step boundary, after a final save.

    preemption = Preemption()
    preemption.install()                  # main thread only; uninstall() restores
    preemption.agreed_stop(step)          # the signal's name once the run should stop

A signal only sets a flag; the loop asks `agreed_stop` before each step, so the state is
never torn. A second Ctrl-C quits at once.
"""

import signal
import threading
from typing import Any


class Preemption:
    """Turns SIGTERM/SIGINT into a stop the loop takes at its next step boundary."""

    def __init__(self) -> None:
        self.signal: str | None = None  # the signal this process received
        self._saved: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals can only be handled on the main thread
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._saved[sig] = signal.signal(sig, self._on_signal)

    def uninstall(self) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved.clear()

    def agreed_stop(self, step: int) -> str | None:
        """The signal to stop on before dispatching the step after `step`, or None."""
        return self.signal

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C quits at once
        self.signal = signal.Signals(signum).name
