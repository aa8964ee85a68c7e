"""The checkpointer through the real CLI: SIGTERM/SIGINT save and exit 143/130, SIGKILL in
the middle of a save leaves the last complete checkpoint, and a rerun resumes exactly.

Runs are paced (a plugin sleeps 50 ms per step) so that signals land mid-run; the pacing
does not change the numbers. Losses after a resume are compared bitwise against the same
40 steps trained in-process without interruption.
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
PACE = '''
import time
from nnxtrain import Callback

class Pace(Callback):
    """Sleeps `seconds` after every step, so that a test can signal the run mid-way."""

    def __init__(self, seconds: float = 0.05):
        self.seconds = seconds

    def on_step_end(self, trainer, event):
        time.sleep(self.seconds)
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
    return [
        *TRAIN,
        "run.log_every=1",
        "+callbacks.pace._target_=ckpt_pace.Pace",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def env_with_pace(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "ckpt_pace.py").write_text(PACE)
    env = cli_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    return env


def start(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """The CLI in the background, its output in files (a full pipe would stall it)."""
    out, err = (cwd / "stdout.txt").open("wb"), (cwd / "stderr.txt").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "nnxtrain.cli", *args], cwd=cwd, env=env, stdout=out, stderr=err
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
    run_dir, env = tmp_path / "run", env_with_pace(tmp_path)
    args = cli_args(run_dir)
    proc = start(args, tmp_path, env)
    wait_until(lambda: len(logged(run_dir)) >= 5, proc)
    proc.send_signal(sig)
    assert proc.wait(timeout=240) == code
    stdout, stderr = (tmp_path / "stdout.txt").read_text(), (tmp_path / "stderr.txt").read_text()
    stopped = max(logged(run_dir))
    assert 5 <= stopped < STEPS
    assert f"preempted: {sig.name}" in stderr and "Traceback" not in stderr
    assert f"checkpoint: saved step {stopped} |" in stdout  # written before the exit
    assert (run_dir / "checkpoints" / str(stopped) / "state").is_dir()

    again = run_cli(args, tmp_path, env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"checkpoint: resumed from step {stopped} " in again.stdout
    losses = logged(run_dir)
    assert [losses[s] for s in range(stopped + 1, STEPS + 1)] == [
        reference[s] for s in range(stopped + 1, STEPS + 1)
    ]


def test_sigkill_during_a_save_leaves_the_last_complete_checkpoint(tmp_path, reference):
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    args = cli_args(run_dir, "callbacks.checkpoint.every=5", "callbacks.checkpoint.if_busy=wait")
    # Every write takes >= 3 s, so the save of step 10 is still being written when killed.
    slow = ["+callbacks.slow._target_=callbacks_for_tests.SlowWrites", "+callbacks.slow.seconds=3"]
    proc = start([*args, *slow], tmp_path, env_with_pace(tmp_path))

    def saving_10_after_5() -> bool:
        names = os.listdir(ckpts) if ckpts.is_dir() else []
        return "5" in names and any(n.startswith("10.orbax-checkpoint-tmp") for n in names)

    wait_until(saving_10_after_5, proc)
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (ckpts / "10").exists()

    again = run_cli(args, tmp_path, env_with_pace(tmp_path))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "ignoring 1 unfinished save(s)" in again.stdout
    assert "10.orbax-checkpoint-tmp" in again.stdout
    assert "checkpoint: resumed from step 5 " in again.stdout
    assert not any(".orbax-checkpoint-tmp" in n for n in os.listdir(ckpts))
    assert (ckpts / str(STEPS)).is_dir()
    losses = logged(run_dir)
    assert [losses[s] for s in range(6, STEPS + 1)] == [reference[s] for s in range(6, STEPS + 1)]
