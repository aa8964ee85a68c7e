"""Preemption across processes, through the real CLI: 2 processes x 2 CPU devices.

SIGTERM to one process only: both stop at the same agreed step, save it together and
exit 143, and a rerun resumes with losses bitwise equal to an uninterrupted 2-process
run. SIGKILL of one process: the survivor exits 4 with one line naming the lost process,
not hanging in a collective. Runs are paced (50 ms per step) so the signals land mid-run.
"""

import signal
import subprocess
from pathlib import Path

import pytest
from conftest import compile_cache_override
from test_checkpoint_signals import env_with_pace, logged, start, wait_until
from test_multidevice import _free_port

pytestmark = pytest.mark.slow

STEPS = 40
CHECK_EVERY = 3  # processes agree on a stop at multiples of 3 steps


def args(run_dir: Path, process: int, port: int, *extra: str) -> list[str]:
    return [
        "model=tiny",
        "mesh=fsdp",
        f"run.steps={STEPS}",
        "run.batch_size=8",
        "run.seq_len=16",
        "run.eval_every=0",
        "run.log_every=1",
        "run.host_devices=2",
        f"run.preempt_check_every={CHECK_EVERY}",
        f"run.dir={run_dir}",
        "+callbacks.pace._target_=ckpt_pace.Pace",
        f"mesh.coordinator=127.0.0.1:{port}",
        "mesh.num_processes=2",
        f"mesh.process_id={process}",
        "mesh.init_timeout=120",
        f"hydra.run.dir={run_dir}/hydra{process}",
        compile_cache_override(),
        *extra,
    ]


def start_both(tmp_path: Path, name: str, *extra: str) -> list[subprocess.Popen[bytes]]:
    """Both processes of one run, each with its output in tmp_path/name/p<i>/."""
    env, port = env_with_pace(tmp_path), _free_port()
    procs = []
    for i in range(2):
        cwd = tmp_path / name / f"p{i}"
        cwd.mkdir(parents=True)
        procs.append(start(args(tmp_path / "run" / name, i, port, *extra), cwd, env))
    return procs


def output(tmp_path: Path, name: str, i: int, stream: str) -> str:
    return (tmp_path / name / f"p{i}" / f"{stream}.txt").read_text()


def finish(procs: list[subprocess.Popen[bytes]]) -> list[int]:
    return [p.wait(timeout=300) for p in procs]


def test_sigterm_to_one_process_stops_all_at_one_step_and_resumes_exactly(tmp_path):
    reference = start_both(tmp_path, "reference")
    assert finish(reference) == [0, 0], output(tmp_path, "reference", 0, "stderr")[-3000:]
    expected = logged(tmp_path / "run" / "reference")
    assert sorted(expected) == list(range(1, STEPS + 1))

    run_dir = tmp_path / "run" / "stopped"
    procs = start_both(tmp_path, "stopped")
    wait_until(lambda: len(logged(run_dir)) >= 5, procs[0])
    procs[1].send_signal(signal.SIGTERM)  # process 1 only
    assert finish(procs) == [143, 143]
    stopped = max(logged(run_dir))
    assert 5 <= stopped < STEPS and stopped % CHECK_EVERY == 0
    for i in range(2):
        err = output(tmp_path, "stopped", i, "stderr")
        assert "preempted: SIGTERM" in err and "Traceback" not in err, err[-3000:]
    out0 = output(tmp_path, "stopped", 0, "stdout")
    assert f"done: step {stopped}/{STEPS}" in out0
    assert f"checkpoint: saved step {stopped} |" in out0
    # One checkpoint, of the agreed step, holding the shards of both processes.
    state = run_dir / "checkpoints" / str(stopped) / "state"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [str(stopped)]
    assert {p.name for p in state.iterdir()} >= {"ocdbt.process_0", "ocdbt.process_1"}

    # The rerun's console is process 0's; it writes its lines to a new run's files.
    (tmp_path / "stopped").rename(tmp_path / "stopped-first")
    again = start_both(tmp_path, "stopped")
    assert finish(again) == [0, 0], output(tmp_path, "stopped", 0, "stderr")[-3000:]
    assert f"checkpoint: resumed from step {stopped} " in output(tmp_path, "stopped", 0, "stdout")
    losses = logged(run_dir)
    after = range(stopped + 1, STEPS + 1)
    assert [losses[s] for s in after] == [expected[s] for s in after]


def test_a_killed_process_ends_the_survivor_with_one_line(tmp_path):
    run_dir = tmp_path / "run" / "killed"
    # JAX aborts a survivor once a process misses heartbeats this long; ours names the
    # lost one before that.
    procs = start_both(tmp_path, "killed", "mesh.heartbeat_timeout=20")
    wait_until(lambda: len(logged(run_dir)) >= 5, procs[0])
    procs[1].kill()
    assert finish(procs) == [4, -signal.SIGKILL]
    err = output(tmp_path, "killed", 0, "stderr")
    errors = [line for line in err.splitlines() if line.startswith("nnxtrain: error:")]
    assert len(errors) == 1 and "lost process 1 of 2" in errors[0], err[-3000:]
    assert "Traceback" not in err and "Check failure" not in err
