"""The checkpointer through the real CLI: SIGTERM/SIGINT save and exit 143/130, SIGKILL in
the middle of a save leaves the last complete checkpoint, and a rerun resumes exactly.

Signals land mid-run whatever the machine's speed: a plugin holds the run at a step until
the test has sent its signal, or holds a checkpoint write until the test has killed the
process. Neither changes the numbers. Losses after a resume are compared bitwise against the
same 40 steps trained in-process without interruption.
"""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import cli_env, run_cli

from nnxtrain import Callback, Trainer, compose

pytestmark = pytest.mark.slow

STEPS = 40
TRAIN = [
    "model=tiny",
    "mesh=single",  # one device in the CLI too: bitwise equal to the in-process reference
    f"run.steps={STEPS}",
    "run.batch_size=4",
    "run.seq_len=16",
    "run.eval_every=0",
]
PLUGINS = '''
import os
import threading
import time

import orbax.checkpoint as ocp
from nnxtrain import Callback

class HoldAt(Callback):
    """At step `at`, writes the file `held` and waits until the file `release` exists."""

    def __init__(self, at: int, held: str, release: str):
        self.at, self.held, self.release = at, held, release

    def on_step_end(self, trainer, event):
        if event.step == self.at:
            open(self.held, "w").close()
            while not os.path.exists(self.release):
                time.sleep(0.01)

class HoldWrites(Callback):
    """Checkpoint writes after the first `free` never finish (the test kills the process)."""

    def __init__(self, free: int = 1):
        save, count = ocp.JsonCheckpointHandler.async_save, [0]

        async def held_save(handler, *args, **kwargs):
            futures = await save(handler, *args, **kwargs) or []
            count[0] += 1
            if count[0] <= free:
                return futures

            async def never():
                threading.Event().wait()

            return [*futures, ocp.future.CommitFutureAwaitingContractedSignals(never())]

        ocp.JsonCheckpointHandler.async_save = held_save
'''


class _Losses(Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_step_end(self, trainer: Any, event: Any) -> None:
        self.losses[event.step] = event.metrics["loss"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """Loss of every step of the uninterrupted run, trained in-process."""
    losses = _Losses()
    run_dir = tmp_path_factory.mktemp("reference")
    Trainer(compose([*TRAIN, "callbacks=none", f"run.dir={run_dir}"]), [losses]).fit()
    return losses.losses


def cli_args(run_dir: Path, *extra: str) -> list[str]:
    return [*TRAIN, "run.log_every=1", f"hydra.run.dir={run_dir}", *extra]


def env_with_plugins(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "ckpt_plugins.py").write_text(PLUGINS)
    env = cli_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    return env


def start(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """The CLI in the background, its output in files (a full pipe would stall it)."""
    out, err = (cwd / "stdout.txt").open("wb"), (cwd / "stderr.txt").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "nnxtrain.cli.train", *args],
        cwd=cwd,
        env=env,
        stdout=out,
        stderr=err,
    )


def wait_until(condition: Callable[[], bool], proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 240
    while not condition():
        assert proc.poll() is None, "the run ended before the signal was sent"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.02)


def logged(run_dir: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl (later lines win)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    records = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.parametrize(
    "sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"]
)
def test_signal_saves_exits_with_its_code_and_rerun_resumes_exactly(tmp_path, reference, sig, code):
    run_dir, env = tmp_path / "run", env_with_plugins(tmp_path)
    args = cli_args(run_dir)
    held, release = tmp_path / "held", tmp_path / "release"
    hold = ["+callbacks.hold._target_=ckpt_plugins.HoldAt", "+callbacks.hold.at=5"]
    hold += [f"+callbacks.hold.held={held}", f"+callbacks.hold.release={release}"]
    proc = start([*args, *hold], tmp_path, env)
    try:
        wait_until(held.exists, proc)  # the run is inside step 5's hooks
        proc.send_signal(sig)
        release.touch()
        assert proc.wait(timeout=240) == code
    finally:
        proc.kill()
    stdout, stderr = (tmp_path / "stdout.txt").read_text(), (tmp_path / "stderr.txt").read_text()
    stopped = max(logged(run_dir))
    assert 5 <= stopped < STEPS
    assert f"preempted: {sig.name}" in stderr and "Traceback" not in stderr
    assert f"checkpoint: saved step {stopped} |" in stdout  # written before the exit
    assert (run_dir / "checkpoints" / str(stopped) / "state").is_dir()
    if sig == signal.SIGINT:
        # The save is the same whichever signal asked for it (the signal only names the
        # reason and the exit code): one rerun, after SIGTERM, shows that it resumes exactly.
        return

    again = run_cli(args, tmp_path, env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"checkpoint: resumed from step {stopped} " in again.stdout
    losses = logged(run_dir)
    assert [losses[s] for s in range(stopped + 1, STEPS + 1)] == [
        reference[s] for s in range(stopped + 1, STEPS + 1)
    ]


def test_sigkill_during_a_save_leaves_the_last_complete_checkpoint(tmp_path, reference):
    run_dir, env = tmp_path / "run", env_with_plugins(tmp_path)
    ckpts = run_dir / "checkpoints"
    args = cli_args(run_dir, "callbacks.checkpoint.every=5", "callbacks.checkpoint.if_busy=wait")
    # The write of step 5 finishes; the write of step 10 never does (the loop then waits
    # for it at step 15), so it is still being written when the process is killed.
    proc = start([*args, "+callbacks.hold._target_=ckpt_plugins.HoldWrites"], tmp_path, env)

    def saving_10_after_5() -> bool:
        names = os.listdir(ckpts) if ckpts.is_dir() else []
        return "5" in names and any(n.startswith("10.orbax-checkpoint-tmp") for n in names)

    try:
        wait_until(saving_10_after_5, proc)
    finally:
        proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (ckpts / "10").exists()

    again = run_cli(args, tmp_path, env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "ignoring 1 unfinished save(s)" in again.stdout
    assert "10.orbax-checkpoint-tmp" in again.stdout
    assert "checkpoint: resumed from step 5 " in again.stdout
    assert not any(".orbax-checkpoint-tmp" in n for n in os.listdir(ckpts))
    assert (ckpts / str(STEPS)).is_dir()
    losses = logged(run_dir)
    assert [losses[s] for s in range(6, STEPS + 1)] == [reference[s] for s in range(6, STEPS + 1)]


def test_sigkill_mid_run_then_resume_logs_each_step_once(tmp_path, reference):
    """metrics.jsonl after a kill and a resume: steps 1-10 as the killed run logged them
    (its checkpoint is step 10), 11-40 as the resumed run did, each step once. The goodput
    account counts both attempts: the killed one up to the last time it kept its account."""
    run_dir, env = tmp_path / "run", env_with_plugins(tmp_path)
    metrics = run_dir / "metrics.jsonl"
    ckpt = ["callbacks.checkpoint.every=5", "callbacks.checkpoint.if_busy=wait"]
    args = [a for a in cli_args(run_dir, *ckpt) if "eval_every" not in a]
    args += ["run.eval_every=4", "run.eval_batches=1"]  # eval records at 4, 8, 12, ...
    args += ["run.goodput_every=0"]  # the account kept after every step
    held = tmp_path / "held"
    hold = ["+callbacks.hold._target_=ckpt_plugins.HoldAt", "+callbacks.hold.at=13"]
    hold += [f"+callbacks.hold.held={held}", f"+callbacks.hold.release={tmp_path / 'never'}"]
    proc = start([*args, *hold], tmp_path, env)
    try:  # held inside step 13's hooks, once checkpoint 10 is complete
        wait_until(lambda: held.exists() and (run_dir / "checkpoints" / "10").is_dir(), proc)
    finally:
        proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL
    killed = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["step"] for r in killed if "loss" in r] == list(range(1, 14))
    with metrics.open("a") as f:
        f.write('{"step": 14, "loss": 2.')  # as if the kill had torn the next line
    # Held in step 13's hooks: the account was last kept after step 12.
    killed_account = json.loads((run_dir / "run_info.json").read_text())["goodput"]
    assert killed_account["last_step"] == 12 and killed_account["attempts"] == 1

    again = run_cli(args, tmp_path, env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "checkpoint: resumed from step 10 " in again.stdout
    records = [json.loads(x) for x in metrics.read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert [r["step"] for r in evals] == list(range(4, STEPS + 1, 4))
    assert [r["loss"] for r in train] == [reference[s] for s in range(1, STEPS + 1)]
    # Up to the checkpoint the killed run's records, after it the resumed run's.
    assert records[: len(records) - 30 - 8] == [r for r in killed if r["step"] <= 10]
    redone = {r["step"]: r["time"] for r in killed if r["step"] > 10 and "loss" in r}
    assert all(r["time"] != redone[r["step"]] for r in train if r["step"] in redone)
    assert "metrics: dropped 5 record(s) after step 10" in again.stdout  # 11-13, eval 12, torn
    account = json.loads((run_dir / "run_info.json").read_text())["goodput"]
    assert account["attempts"] == 2 and account["lost_steps"] == 2  # 11 and 12, as kept
    lost = sum(killed_account["step_seconds"][str(s)] for s in (11, 12))
    assert account["seconds"]["lost"] == pytest.approx(lost)
    # Every bucket holds at least the killed attempt's seconds (lost work moved out of its
    # steps), start-up and compilation twice over: each attempt had its own.
    for bucket, seconds in killed_account["seconds"].items():
        moved = lost if bucket == "step" else -lost if bucket == "lost" else 0.0
        assert account["seconds"][bucket] >= seconds - moved - 1e-9, bucket
    for bucket in ("startup", "compile"):
        assert account["seconds"][bucket] > killed_account["seconds"][bucket] > 0, bucket
    assert account["wall_seconds"] > killed_account["wall_seconds"]
