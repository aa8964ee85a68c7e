"""Signals in one process: the flag, the agreed stop (every step, free), handler restore.

The cross-process agreement and the lost-process roll call need several processes: see
tests/integration/test_preemption_multiprocess.py.
"""

import os
import signal

import pytest

from nnxtrain.parallel.preemption import Preemption, on_second_interrupt


def _raise(signum: signal.Signals) -> None:
    os.kill(os.getpid(), signum)  # Python runs the handler before the next bytecode


def test_a_signal_is_the_agreed_stop_at_the_next_step():
    p = Preemption(check_every=10)
    p.install()
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
