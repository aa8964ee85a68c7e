"""Preemption: SIGTERM/SIGINT stop the run at the same step on every process.

    preemption = Preemption(check_every=10, heartbeat_timeout=100)
    preemption.install()                    # main thread; uninstall() restores the handlers
    ...
    if (name := preemption.agreed_stop(step)) is not None: ...   # at each step boundary

Until the loop starts (its first `agreed_stop`, or `loop_started()`), a signal ends the
run at once: the handler raises `Interrupted`, since nothing is trained yet and there is
nothing to save. Python runs a handler in the main thread only, between bytecodes or in a
wait it can interrupt, never inside a long C call such as XLA's compile; so set-up runs
such calls through `interruptible(fn)`, on a worker thread while the main thread waits
where a handler can run (a build or compile of minutes still honours SIGTERM and Ctrl-C).

In the loop, a signal only records its name (`signal`). The loop asks `agreed_stop(step)`
between steps. With one process the answer is the flag itself, at every step and at no cost. With
several, processes get a signal at different steps (or only one gets it), and one that
stopped alone would leave the others in a collective that never completes. So every
`check_every` steps each process posts its flag to JAX's coordination service (its
key-value store: host-only RPCs, no device work, so the host stays a step ahead of the
device), waits at a barrier for the others, and reads every flag back: all processes see
the same flags at the same step and stop together.
`jax.experimental.multihost_utils.reached_preemption_sync_point` does not fit: its
notifier hears SIGTERM only, through a C++ handler that our Python handler replaces, and
it must be called at every step.

A second Ctrl-C raises KeyboardInterrupt at once. Unwinding still runs the plugins'
teardown, which waits for a checkpoint being written: a notebook wants that, a terminal
does not, so the CLI registers `on_second_interrupt(action)`, an action that ends the
process there and then (an unfinished Orbax write stays a temporary folder, which the
next start reports and removes).

A process that dies (SIGKILL, a crash) breaks the next collective of the others, or
keeps them waiting at the barrier. `lost_processes(error)` then takes a roll call through
the same store and returns a `LostProcessError` naming the processes that did not answer.
Both waits are bounded by fractions of `heartbeat_timeout` (the barrier half, the roll
call a quarter): JAX's coordination service declares a silent process dead after that
time and aborts every survivor, so a survivor names the lost process before that happens.
The loss of process 0 (it hosts the service) and a frozen process still end in JAX's own
abort; docs/sharding.md says when.
"""

import itertools
import re
import signal as signals
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import jax

from nnxtrain.errors import LostProcessError, UserError, first_line

# One namespace in the coordination service's store per Preemption: every process builds
# its trainers in the same order, so the numbers match across processes.
_INSTANCES = itertools.count()

# An XLA runtime status ("UNKNOWN: Gloo all-reduce failed: ... Connection closed by
# peer"): a step's dispatch reports it as ValueError, a device-to-host copy as
# JaxRuntimeError.
_STATUS = re.compile(r"^[A-Z_]+: ")


# Called by a second Ctrl-C before it raises KeyboardInterrupt (signals are per process).
_second_interrupt: Callable[[], object] | None = None


def on_second_interrupt(action: Callable[[], object] | None) -> None:
    """Makes a second Ctrl-C call `action` (which may end the process) before it raises
    KeyboardInterrupt; None: just raise."""
    global _second_interrupt
    _second_interrupt = action


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT (`signal`, its name) before the loop's first step: the run ends at
    once, with nothing trained to save. A KeyboardInterrupt, so no `except Exception` stops it."""

    def __init__(self, signal: str):
        super().__init__(signal)
        self.signal = signal


_WORKER = "nnxtrain-interruptible"
_working: set[threading.Thread] = set()  # the workers of `interruptible` still running
T = TypeVar("T")


def interruptible(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)`, run on a worker thread while the main thread waits in `join`, where a
    signal handler runs (and may raise: `Interrupted`, or KeyboardInterrupt). The worker of
    an interrupted call runs on, a daemon whose result is dropped (`abandoned()`). Off the
    main thread, `fn(*args)` runs there."""
    if threading.current_thread() is not threading.main_thread():
        return fn(*args)
    outcome: list[tuple[bool, Any]] = []

    def work() -> None:
        try:
            outcome.append((True, fn(*args)))
        except BaseException as e:  # handed to the main thread
            outcome.append((False, e))
        finally:
            _working.remove(worker)

    worker = threading.Thread(target=work, name=_WORKER, daemon=True)
    _working.add(worker)
    worker.start()
    worker.join()  # a lock wait: POSIX signals interrupt it, and the handler runs here
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def abandoned() -> bool:
    """Whether an `interruptible` call that a signal interrupted still runs: the process
    should then end with os._exit, since the interpreter's exit would wait for it or tear
    XLA down under it."""
    # Not Thread.is_alive(): Python 3.11 marks a thread stopped when a signal interrupts
    # a join of it (bpo-45274's fix), though it runs on.
    return bool(_working)


class _LateProcessError(UserError):
    """Every process answered the roll call, but one reached a stop check too late."""


def _client() -> Any:
    """JAX's coordination-service client, None in a single-process run (no public handle:
    Orbax and multihost_utils read the same private attribute)."""
    if jax.process_count() == 1:
        return None
    return jax._src.distributed.global_state.client


class Preemption:
    """Turns SIGTERM/SIGINT into a stop that every process agrees on, at a step boundary."""

    def __init__(self, check_every: int = 1, heartbeat_timeout: float = 100.0):
        self.check_every = check_every
        self.heartbeat_timeout = heartbeat_timeout
        self.signal: str | None = None  # the signal this process received
        self.setting_up = True  # before the loop: a signal raises Interrupted at once
        self._saved: dict[int, Any] = {}
        self._client = _client()
        self._prefix = f"nnxtrain/preemption/{next(_INSTANCES)}"
        self._first_step: int | None = None
        self._posted: str | None = None  # this process's key of the previous check
        self._roll_calls = itertools.count()

    # -- signals -------------------------------------------------------------------------

    def install(self) -> None:
        """Handles SIGTERM and SIGINT from now on; does nothing off the main thread."""
        if threading.current_thread() is not threading.main_thread():
            return  # Python runs signal handlers on the main thread only
        for sig in (signals.SIGTERM, signals.SIGINT):
            self._saved[sig] = signals.signal(sig, self._on_signal)

    def uninstall(self) -> None:
        """Restores the handlers that `install` replaced."""
        for sig, handler in self._saved.items():
            signals.signal(sig, handler)
        self._saved.clear()

    def loop_started(self) -> None:
        """From now on a signal is a stop at a step boundary, agreed by every process."""
        self.setting_up = False

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signals.SIGINT:
            if _second_interrupt is not None:
                _second_interrupt()
            raise KeyboardInterrupt  # a second Ctrl-C quits at once
        self.signal = self.signal or signals.Signals(signum).name
        if self.setting_up:
            raise Interrupted(self.signal)

    # -- agreement -----------------------------------------------------------------------

    def agreed_stop(self, step: int) -> str | None:
        """The signal to stop on after `step` steps, the same on every process; else None.

        Processes agree at multiples of `check_every` (not at the loop's first step, where
        processes still arrive from their own compilation); elsewhere this is None. Raises
        `LostProcessError` when a process does not reach the check in time.
        """
        self.setting_up = False  # the loop has started
        if self._client is None:
            return self.signal
        if self._first_step is None:
            self._first_step = step
        if step == self._first_step or step % self.check_every:
            return None
        flags = self._exchange(step)
        # The lowest process's signal, so that every process reports the same one.
        return next((flags[p] for p in sorted(flags) if flags[p]), None)

    def _exchange(self, step: int) -> dict[int, str]:
        client, me = self._client, jax.process_index()
        key = f"{self._prefix}/step{step}/"
        client.key_value_set(key + str(me), self.signal or "")
        wait = self.heartbeat_timeout / 2
        try:
            client.wait_at_barrier(key, self._ms(wait))
        except Exception as e:
            lost = self._roll_call()
            if lost:
                context = f"did not reach step {step} within {wait:.0f} s"
                raise LostProcessError(lost, jax.process_count(), context) from e
            raise _LateProcessError(
                f"mesh.heartbeat_timeout: a process reached the stop check of step {step} "
                f"more than {wait:.0f} s (half the timeout) after another. Fix: raise "
                "mesh.heartbeat_timeout above twice the longest step, save or evaluation."
            ) from e
        flags = {int(k.rsplit("/", 1)[1]): v for k, v in client.key_value_dir_get(key)}
        # Every process read this check's keys before reaching the barrier of the next one,
        # so the previous key can go: the store keeps at most two keys per process.
        if self._posted is not None:
            client.key_value_delete(self._posted)
        self._posted = key + str(me)
        return flags

    # -- lost processes ------------------------------------------------------------------

    def lost_processes(self, error: BaseException) -> LostProcessError | None:
        """After `error` ended the loop: which processes are gone, if a runtime failure
        (a collective that lost its peer) caused it. None in a single-process run."""
        if self._client is None:
            return None
        if isinstance(error, LostProcessError):
            return error
        if isinstance(error, _LateProcessError):
            return None
        failure = next((e for e in _chain(error) if _runtime_failure(e)), None)
        if failure is None:
            return None  # this process's own error (a config, a plugin): not a lost peer
        lost = self._roll_call()
        if not lost:
            return None
        context = f"no answer within {self.heartbeat_timeout / 4:.0f} s after {first_line(failure)}"
        return LostProcessError(lost, jax.process_count(), context)

    def _roll_call(self) -> list[int]:
        """Processes that do not post to the store within a quarter of the heartbeat."""
        client, me, count = self._client, jax.process_index(), jax.process_count()
        key = f"{self._prefix}/alive{next(self._roll_calls)}/"
        try:
            client.key_value_set(key + str(me), "")
        except Exception:
            return [0]  # the store itself is gone: it runs in process 0
        deadline = time.monotonic() + self.heartbeat_timeout / 4
        lost = []
        for p in range(count):
            if p == me:
                continue
            try:
                client.blocking_key_value_get(key + str(p), self._ms(deadline - time.monotonic()))
            except Exception:
                lost.append(p)
        return lost

    @staticmethod
    def _ms(seconds: float) -> int:
        return max(1, int(seconds * 1000))


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _runtime_failure(e: BaseException) -> bool:
    if isinstance(e, jax.errors.JaxRuntimeError):
        return True
    return isinstance(e, ValueError | RuntimeError) and bool(_STATUS.match(str(e)))
