"""The goodput account: every second in one bucket, injected delays where they belong, and
totals that accumulate across a crash and a resume (lost steps costed from the records)."""

import io
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from nnxtrain.plugins.checkpointer import Checkpointer
from nnxtrain.plugins.metrics_logger import MetricsLogger
from rich.console import Console

from nnxtrain import Callback, Goodput, GoodputEvent, Trainer, compose
from nnxtrain import checkpoint as checkpoint_io
from nnxtrain.data import SyntheticData
from nnxtrain.train import goodput as goodput_module
from nnxtrain.train import trainer as trainer_module

BASE = [
    "model=tiny",
    "run.batch_size=4",
    "run.seq_len=16",
    "run.log_every=4",
    "callbacks=none",
]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_time_goes_to_the_innermost_open_bucket():
    clock = FakeClock()
    account = Goodput(clock)
    clock.now += 1  # outside every bucket: other
    with account.timed("step"):
        clock.now += 2
        with account.timed("callbacks/slow"):
            clock.now += 3
            with account.timed("step"):  # a plugin waiting for a step's metrics
                clock.now += 4
            clock.now += 5
        clock.now += 6
    report = account.report()
    assert report.seconds["other"] == 1
    assert report.seconds["step"] == 2 + 4 + 6
    assert report.seconds["callbacks/slow"] == 3 + 5
    assert report.wall == 21 == sum(report.seconds.values())
    assert report.goodput == pytest.approx(12 / 21)
    names = [name for name, _, _ in report.rows()]
    assert names.index("callbacks/slow") == names.index("eval") + 1  # plugins under callbacks
    assert report.callbacks == 8


def test_a_resume_adds_the_earlier_attempt_and_moves_its_lost_steps():
    clock = FakeClock()
    first = Goodput(clock)
    with first.timed("step"):
        for step, seconds in enumerate((1.0, 4.5, 1.0, 1.5, 2.0), start=3):
            clock.now += seconds
            first.step_done(step)
    earlier = first.state(last_step=7)
    second = Goodput(clock)
    second.resume(earlier, restored_step=4)  # steps 5, 6, 7 are trained again
    with second.timed("step"):
        clock.now += 3
    report = second.report()
    assert report.attempts == 2 and report.lost_steps == 3
    assert report.seconds["lost"] == pytest.approx(4.5)
    assert report.seconds["step"] == pytest.approx(10 - 4.5 + 3)
    assert report.wall == pytest.approx(13)


def test_lost_steps_older_than_the_ledger_are_costed_at_the_mean_step_time(
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.setattr(goodput_module, "LEDGER", 2)  # keeps steps 7 and 8 only
    clock = FakeClock()
    first = Goodput(clock)
    with first.timed("step"):
        for step, seconds in ((5, 1.0), (6, 5.0), (7, 1.0), (8, 3.0)):
            clock.now += seconds
            first.step_done(step)
    earlier = first.state(last_step=8)
    assert set(earlier["step_seconds"]) == {"7", "8"}
    second = Goodput(clock)
    second.resume(earlier, restored_step=5)  # step 6 is no longer in the ledger: the mean
    assert second.report().seconds["lost"] == pytest.approx(2.0 + 1.0 + 3.0)
    assert second.report().seconds["step"] == pytest.approx(10 - 6)


def test_the_time_before_the_account_is_startup_and_keeping_it_is_due_every_n_seconds():
    clock = FakeClock()
    account = Goodput(clock, started=clock.now - 2.5)  # the process started 2.5 s ago
    clock.now += 1
    report = account.report()
    assert report.seconds["startup"] == 2.5 and report.seconds["other"] == 1
    assert report.wall == 3.5 and report.rows()[0][0] == "startup"
    assert Goodput(clock).report().seconds["startup"] == 0  # from Python: the run starts now
    # Kept (state()) once `every` seconds passed since it began, or was last kept.
    assert not account.keep_due(5.0) and account.keep_due(1.0) and account.keep_due(0.0)
    clock.now += 4
    assert account.keep_due(5.0)
    account.state(last_step=0)
    assert not account.keep_due(5.0) and account.keep_due(0.0)


def test_the_process_start_is_read_from_proc_with_a_fallback(monkeypatch: pytest.MonkeyPatch):
    from nnxtrain.cli import train as cli

    started = cli.process_started()
    assert started <= cli._IMPORTED  # the process started before it imported the CLI
    if Path("/proc/self/stat").exists() and shutil.which("ps"):
        # Linux: the process's age as ps counts it, in whole seconds (rounded down), read
        # between two readings of ours; the start time itself has a resolution of a tick.
        before = time.perf_counter() - started
        etimes = subprocess.run(
            ["ps", "-o", "etimes=", "-p", str(os.getpid())], capture_output=True, text=True
        )
        after = time.perf_counter() - cli.process_started()
        tick = 1 / os.sysconf("SC_CLK_TCK")
        assert int(etimes.stdout) - tick <= after and before <= int(etimes.stdout) + 1 + tick
    # /proc unreadable (not Linux), or a start time after the import (a wrong clock): the
    # import's own time.
    monkeypatch.setattr(time, "clock_gettime", lambda clock: 0.0)  # "booted just now"
    assert cli.process_started() == cli._IMPORTED

    def no_proc(*args: Any, **kwargs: Any) -> Any:
        raise FileNotFoundError("/proc/self/stat")

    monkeypatch.setattr(cli, "open", no_proc, raising=False)
    assert cli.process_started() == cli._IMPORTED


# -- a real run with injected delays -----------------------------------------------------

DATA_SLEEP, PLUGIN_SLEEP, SAVE_SLEEP = 0.05, 0.2, 0.3


class SlowData(SyntheticData):
    """The synthetic data, with a delay before every train batch."""

    def batch(self, step: int, *args: Any, **kwargs: Any) -> Any:
        if len(args) < 3 or args[2] == "train":
            time.sleep(DATA_SLEEP)
        return super().batch(step, *args, **kwargs)


class SlowPlugin(Callback):
    def __init__(self) -> None:
        self.name = "slow"
        self.events: list[GoodputEvent] = []

    def on_step_end(self, trainer: Any, event: Any) -> None:
        time.sleep(PLUGIN_SLEEP)

    def on_goodput(self, trainer: Any, event: GoodputEvent) -> None:
        self.events.append(event)


class RaiseAt(Callback):
    def __init__(self, at: int) -> None:
        self.name, self.at = "crash", at

    def on_step_end(self, trainer: Any, event: Any) -> None:
        if event.step == self.at:
            event.record()  # the step completed before the crash
            raise RuntimeError("injected crash")


@pytest.fixture
def slow_saves(monkeypatch: pytest.MonkeyPatch) -> None:
    save = checkpoint_io.save

    def slow_save(*args: Any, **kwargs: Any) -> Any:
        time.sleep(SAVE_SLEEP)
        return save(*args, **kwargs)

    monkeypatch.setattr(checkpoint_io, "save", slow_save)


def train(run_dir: Path, steps: int, *extra: Callback, every: int = 4) -> tuple[dict, float]:
    """Trains with the delays; returns (run_info.json's goodput, the perf_counter() at
    which the Trainer was created)."""
    cfg = compose([*BASE, f"run.steps={steps}", "run.eval_every=4", f"run.dir={run_dir}"])
    data = SlowData(cfg.model.vocab_size, cfg.data.branching, cfg.data.source_seed, cfg.run.seed)
    callbacks = [
        Checkpointer(every=every),
        MetricsLogger(log_every=4, tensorboard=False),
        *extra,
    ]
    out = io.StringIO()
    t0 = time.perf_counter()
    Trainer(cfg, callbacks, dataset=data, console=Console(file=out, width=200)).fit()
    info = json.loads((run_dir / "run_info.json").read_text())
    return info["goodput"], t0


def test_every_second_lands_in_its_bucket(
    tmp_path: Path, slow_saves: None, monkeypatch: pytest.MonkeyPatch
):
    plugin = SlowPlugin()
    steps = 8
    # When the Trainer wrote run_info.json last: the account it wrote was taken just before.
    writes: list[float] = []
    write = trainer_module.write_run_info

    def timed_write(*args: Any) -> None:
        writes.append(time.perf_counter())
        write(*args)

    monkeypatch.setattr(trainer_module, "write_run_info", timed_write)
    goodput, t0 = train(tmp_path, steps, plugin)
    elapsed = time.perf_counter() - t0
    seconds = goodput["seconds"]
    # The buckets are the wall time, and the wall time is the Trainer's, from its creation
    # to its last account: to 1% plus 0.1 s of scheduling noise. What follows that account
    # (writing it, the run lock's release) is outside it by design, and once took 1.9 s of
    # a run on a 2-core machine at load 12: the reference ends where the last write began.
    assert sum(seconds.values()) == pytest.approx(goodput["wall_seconds"], rel=1e-9)
    accounted = writes[-1] - t0
    assert goodput["wall_seconds"] < elapsed
    assert abs(accounted - goodput["wall_seconds"]) <= 0.01 * accounted + 0.1
    # Each injected delay is in its own bucket (the loop fetches steps + 1 train batches:
    # the first, then one after each step but the last).
    assert seconds["data"] >= steps * DATA_SLEEP
    assert seconds["callbacks/slow"] >= steps * PLUGIN_SLEEP
    assert seconds["checkpoint"] >= 2 * SAVE_SLEEP  # saves at steps 4 and 8
    for bucket in ("init", "compile", "step", "eval"):
        assert seconds[bucket] > 0, bucket
    assert seconds["lost"] == 0 and goodput["attempts"] == 1
    assert 0 < goodput["goodput"] < 1
    assert sum(goodput["shares"].values()) == pytest.approx(1.0)
    # The live event, and the metric line's running share.
    assert [e.step for e in plugin.events] == [4, 8, 8]  # every log_every, and at the end
    assert plugin.events[-1].report.wall <= goodput["wall_seconds"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "grad_norm" in r]
    assert len(train_records) == 2 and all(0 < r["goodput"] < 1 for r in train_records)


def test_a_crash_and_a_resume_account_for_both_attempts(tmp_path: Path, slow_saves: None):
    with pytest.raises(Exception, match="injected crash"):
        train(tmp_path, 10, RaiseAt(7))  # saved at 4; steps 5..7 are lost
    first = json.loads((tmp_path / "run_info.json").read_text())["goodput"]
    assert first["last_step"] == 7 and first["attempts"] == 1
    second, _ = train(tmp_path, 10)
    assert second["attempts"] == 2 and second["lost_steps"] == 3
    lost = sum(first["step_seconds"][str(s)] for s in (5, 6, 7))
    assert lost > 0
    assert second["seconds"]["lost"] == pytest.approx(lost)
    # The earlier attempt's seconds are all still there, lost work moved out of its steps.
    for bucket, s in first["seconds"].items():
        moved = lost if bucket == "step" else -lost if bucket == "lost" else 0.0
        assert second["seconds"][bucket] >= s - moved - 1e-9, bucket
    assert second["wall_seconds"] > first["wall_seconds"]
