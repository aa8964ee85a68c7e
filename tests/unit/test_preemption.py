"""Signals in one process: the flag, the agreed stop (every step, free), handler restore;
before the loop, a signal that ends set-up at once, even inside a long C call.

The cross-process agreement and the lost-process roll call need several processes: see
tests/integration/test_preemption_multiprocess.py.
"""

import os
import signal
import threading
from pathlib import Path

import pytest
from conftest import TINY, run_cli_in_process

from nnxtrain.parallel.preemption import (
    Interrupted,
    Preemption,
    abandoned,
    interruptible,
    on_second_interrupt,
)


def _raise(signum: signal.Signals) -> None:
    os.kill(os.getpid(), signum)  # Python runs the handler before the next bytecode


def test_a_signal_is_the_agreed_stop_at_the_next_step():
    p = Preemption(check_every=10)
    p.install()
    p.loop_started()
    try:
        assert p.agreed_stop(1) is None
        _raise(signal.SIGTERM)
        assert p.signal == "SIGTERM"
        # One process needs no agreement: any step, not only multiples of check_every.
        assert p.agreed_stop(3) == "SIGTERM"
    finally:
        p.uninstall()


def test_uninstall_restores_the_previous_handlers():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    p = Preemption()
    p.install()
    assert signal.getsignal(signal.SIGTERM) == p._on_signal
    p.uninstall()
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_second_ctrl_c_quits_at_once():
    p = Preemption()
    p.install()
    p.loop_started()
    try:
        _raise(signal.SIGINT)
        assert p.signal == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            _raise(signal.SIGINT)
    finally:
        p.uninstall()


def test_a_second_ctrl_c_runs_the_registered_action_first():
    """The CLI's action ends the process there, before unwinding could wait for a write."""
    calls: list[str] = []
    on_second_interrupt(lambda: calls.append("second"))
    p = Preemption()
    p.install()
    p.loop_started()
    try:
        _raise(signal.SIGINT)
        assert calls == []  # the first one only marks the stop
        with pytest.raises(KeyboardInterrupt):
            _raise(signal.SIGINT)
        assert calls == ["second"]
    finally:
        p.uninstall()
        on_second_interrupt(None)


def test_one_process_has_no_lost_peer():
    assert Preemption().lost_processes(RuntimeError("UNKNOWN: Gloo all-reduce failed")) is None


def test_a_signal_during_set_up_interrupts_a_long_c_call_at_once():
    """Before the loop a signal raises Interrupted, even while set-up waits for a C call that
    never returns to Python meanwhile (an XLA compile; here `sleep` through os.system, whose
    C system() waits for its child whatever signal comes): `interruptible` runs the call
    on a worker, and the main thread waits where the handler can run."""
    finished = threading.Event()

    def long_c_call() -> None:
        os.system("sleep 1")
        finished.set()

    p = Preemption()
    p.install()
    timer = threading.Timer(0.1, _raise, (signal.SIGTERM,))
    try:
        timer.start()
        with pytest.raises(Interrupted) as err:
            interruptible(long_c_call)
    finally:
        timer.join()  # the signal was sent while the handler was installed
        p.uninstall()
    assert err.value.signal == "SIGTERM"
    assert not finished.is_set() and abandoned()  # it ended while the call still ran
    assert finished.wait(30) and not abandoned()  # (the CLI exits with os._exit meanwhile)
    assert interruptible(lambda: 6 * 7) == 42  # uninterrupted, the result comes back


def test_interruptible_hands_back_the_workers_exception():
    with pytest.raises(ZeroDivisionError):
        interruptible(lambda: 1 / 0)


SETUP_RUN = [
    "model=tiny",
    "run.steps=2",
    "run.batch_size=2",
    "run.seq_len=16",
    "run.dir=run",
    f"model.vocab_size={TINY.vocab_size}",
    "data.branching=4",
]


@pytest.mark.parametrize("signal_name, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_while_setting_up_ends_the_run_at_once(tmp_path: Path, signal_name, code):
    """The issue: a long build or compile ignored SIGTERM (the handler only set a flag that
    the loop read, after compiling). A plugin's slow on_setup signals this process, then
    sleeps: the run ends in that hook (the sleep never finishes, nothing is compiled), with
    one line and exit 143 or 130."""
    import callbacks_for_tests as cbt

    cbt.LOG.clear()
    target = "+callbacks.slow._target_=callbacks_for_tests.SignalAt"
    proc = run_cli_in_process(
        [*SETUP_RUN, target, f"+callbacks.slow.signal={signal_name}"], tmp_path
    )
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"nnxtrain: interrupted ({signal_name}) while setting up, before the first step: "
        "nothing was trained or saved. Rerun the same command to start again."
    ], proc.stderr
    assert not [e for e in cbt.LOG if e[1] == "slept"]
    assert "compiled train step" not in proc.stdout
