"""One run per run dir: the lock refuses a second run naming the holder, and is released
when fit() ends, however it ends. (A second *process*, and a holder killed with SIGKILL:
tests/integration/test_run_lock.py.)"""

import os
import re
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from callbacks_for_tests import RaiseAt
from conftest import run_cli_in_process
from nnxtrain.plugins.checkpointer import Checkpointer

from nnxtrain import Callback, PluginError, Trainer, UserError, compose
from nnxtrain.checkpoint import locate
from nnxtrain.run.directory import make_run_dir

BASE = ["model=tiny", "run.steps=3", "run.batch_size=4", "run.seq_len=16", "run.eval_every=0"]
IN_USE = (
    rf"is in use by another run \(pid {os.getpid()} on host {re.escape(socket.gethostname())}\)"
)


def config(run_dir: Path, *extra: str) -> Any:
    return compose([*BASE, "callbacks=none", f"run.dir={run_dir}", *extra])


class StartsAnother(Callback):
    """At step 1, runs a second Trainer (in `run_dir`, with `callbacks()`) and keeps its
    error."""

    def __init__(self, run_dir: Path, callbacks: Any = list):
        self.run_dir, self.callbacks, self.error = run_dir, callbacks, ""

    def on_step_end(self, trainer: Any, event: Any) -> None:
        if event.step == 1:
            try:
                Trainer(config(self.run_dir, "run.seed=7"), self.callbacks()).fit()
            except UserError as e:
                self.error = str(e)


def test_a_second_run_on_a_run_dir_in_use_is_refused_naming_the_holder(tmp_path):
    other = StartsAnother(tmp_path)
    result = Trainer(config(tmp_path), [other]).fit()
    assert result.step == 3
    assert re.fullmatch(
        rf"run\.dir: {re.escape(str(tmp_path))} {IN_USE}\. Fix: wait for that run to end, "
        r"or set run\.dir to another directory\.",
        other.error,
    ), other.error
    assert "seed: 0" in (tmp_path / "config.yaml").read_text()  # the refused run wrote nothing
    # The lock went with the first run: the dir takes a new run (which resumes nothing here).
    assert Trainer(config(tmp_path, "run.steps=4"), []).fit().step == 4


def test_two_runs_cannot_share_a_checkpoint_directory_outside_their_run_dirs(tmp_path):
    shared = tmp_path / "shared"
    other = StartsAnother(tmp_path / "b", lambda: [Checkpointer(directory=str(shared))])
    Trainer(config(tmp_path / "a"), [Checkpointer(directory=str(shared)), other]).fit()
    assert re.fullmatch(
        rf"callbacks\.Checkpointer\.directory: {re.escape(str(shared))} {IN_USE}\. Fix: wait "
        r"for that run to end, or set callbacks\.Checkpointer\.directory to another directory\.",
        other.error,
    ), other.error
    # Released at the end of the run: another run dir can now use (resume from) it.
    again = Trainer(config(tmp_path / "b", "run.steps=4"), [Checkpointer(directory=str(shared))])
    assert again.fit().step == 4


class RunsTheCli(Callback):
    """At step 1, runs the CLI with `args` from `cwd` (in this process, beside the running
    Trainer: another run all the same) and keeps what it returned."""

    def __init__(self, args: list[str], cwd: Path):
        self.args, self.cwd, self.proc = args, cwd, None

    def on_step_end(self, trainer: Any, event: Any) -> None:
        if event.step == 1:
            self.proc = run_cli_in_process(self.args, self.cwd)


def test_a_run_pointed_at_the_checkpoints_under_another_run_dir_is_refused(tmp_path):
    # Run b has its own run dir, but saves into run a's checkpoints/ (under a's run dir):
    # that directory has a lock of its own, held by a's checkpointer.
    a, ckpts = tmp_path / "a", tmp_path / "a" / "checkpoints"
    b = [*BASE, f"run.dir={tmp_path / 'b'}", f"callbacks.checkpoint.directory={ckpts}"]
    second = RunsTheCli([*b, "run.seed=7", f"hydra.run.dir={tmp_path / 'hb'}"], tmp_path)
    assert Trainer(config(a), [Checkpointer(every=1), second]).fit().step == 3
    assert second.proc is not None and second.proc.returncode == 2, second.proc
    (line,) = second.proc.stderr.strip().splitlines()
    assert re.fullmatch(
        rf"nnxtrain: error: callbacks\.checkpoint\.directory: {re.escape(str(ckpts))} "
        rf"{IN_USE}\. Fix: wait for that run to end, or set callbacks\.checkpoint\.directory "
        r"to another directory\.",
        line,
    ), line
    # a's checkpoints are all there, and all a's (b resumed, saved and deleted nothing).
    assert locate(str(ckpts)).steps == (1, 2, 3)
    assert all(locate(str(ckpts), step).config["run"]["seed"] == 0 for step in (1, 2, 3))


def test_the_lock_is_released_when_fit_raises(tmp_path):
    with pytest.raises(PluginError, match="boom at step 1"):
        Trainer(config(tmp_path), [RaiseAt(at=1)]).fit()
    assert Trainer(config(tmp_path), []).fit().step == 3


def test_the_lock_file_names_its_holder_and_keeps_no_holder_after(tmp_path):
    from nnxtrain import RunLock

    first, second = RunLock(), RunLock()
    first.take(str(tmp_path))
    assert f'"pid": {os.getpid()}' in (tmp_path / ".lock").read_text()
    with pytest.raises(UserError, match=IN_USE):
        second.take(str(tmp_path))
    assert not second.held
    first.release()
    assert (tmp_path / ".lock").read_text() == ""
    second.take(str(tmp_path))
    second.release()


def test_default_run_dirs_started_in_one_second_differ(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt: "20260101-000000")
    cfg = compose([*BASE, "callbacks=none"])
    first, second = make_run_dir(cfg), make_run_dir(cfg)
    assert (first, second) == (
        str(tmp_path / "runs" / "20260101-000000"),
        str(tmp_path / "runs" / "20260101-000000-2"),
    )
