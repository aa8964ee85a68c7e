"""One run per run dir, through the real CLI: a second process on a run dir in use exits 2
with one line naming the holder's pid; once the holder is killed with SIGKILL, a new run
takes the dir (the OS dropped the lock: none is left stale). Both processes of a
multi-process run are refused alike.

The holder is a CLI subprocess; the runs after it are the CLI's `main()` in this test's
process (`run_cli_in_process`), which is another process than the holder all the same,
without an interpreter and JAX start each."""

import os
import socket
from pathlib import Path

import pytest
from conftest import free_port, run_cli_in_process
from test_checkpoint_signals import env_with_plugins, start, wait_until

pytestmark = pytest.mark.slow

TRAIN = [
    "model=tiny",
    "mesh=single",
    "run.steps=4",
    "run.batch_size=4",
    "run.seq_len=16",
    "run.eval_every=0",
    "run.log_every=1",
]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def test_a_second_process_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path: Path) -> None:
    run_dir, env = tmp_path / "run", env_with_plugins(tmp_path)
    (tmp_path / "a").mkdir()
    hold = [
        "+callbacks.hold._target_=ckpt_plugins.HoldAt",
        "+callbacks.hold.at=2",
        f"+callbacks.hold.held={tmp_path / 'held'}",
        f"+callbacks.hold.release={tmp_path / 'never'}",
    ]
    holder = start(
        [*TRAIN, f"run.dir={run_dir}", f"hydra.run.dir={tmp_path}/ha", *hold], tmp_path / "a", env
    )
    try:
        wait_until(lambda: (tmp_path / "held").exists(), holder)  # A is training at step 2
        config = (run_dir / "config.yaml").read_text()
        second = run_cli_in_process(
            [*TRAIN, "run.seed=7", f"run.dir={run_dir}", f"hydra.run.dir={tmp_path}/hb"], tmp_path
        )
        assert second.returncode == 2, second.stderr[-3000:]
        assert error_lines(second.stderr) == [
            f"nnxtrain: error: run.dir: {run_dir} is in use by another run (pid {holder.pid} "
            f"on host {socket.gethostname()}). Fix: wait for that run to end, or set run.dir "
            "to another directory."
        ]
        assert (run_dir / "config.yaml").read_text() == config  # B wrote nothing there
    finally:
        holder.kill()  # SIGKILL: no clean-up runs
        holder.wait(timeout=60)
    third = run_cli_in_process(
        [*TRAIN, f"run.dir={run_dir}", f"hydra.run.dir={tmp_path}/hc"], tmp_path
    )
    assert third.returncode == 0, third.stderr[-3000:]
    assert "done: step 4/4" in third.stdout


def test_every_process_of_a_refused_multi_process_run_exits_2(tmp_path: Path) -> None:
    from nnxtrain.run.lock import RunLock

    run_dir, port = tmp_path / "run", free_port()
    run_dir.mkdir()
    lock = RunLock()  # this test process holds the run dir
    lock.take(str(run_dir))
    try:
        procs = []
        for i in range(2):
            (tmp_path / f"p{i}").mkdir()
            args = [
                *TRAIN[:1],
                *TRAIN[2:],
                "mesh=fsdp",
                "run.host_devices=1",
                f"run.dir={run_dir}",
                f"mesh.coordinator=127.0.0.1:{port}",
                "mesh.num_processes=2",
                f"mesh.process_id={i}",
                "mesh.init_timeout=120",
                f"hydra.run.dir={tmp_path}/h{i}",
            ]
            procs.append(start(args, tmp_path / f"p{i}", env_with_plugins(tmp_path)))
        codes = [p.wait(timeout=300) for p in procs]
        errors = [(tmp_path / f"p{i}" / "stderr.txt").read_text() for i in range(2)]
        assert codes == [2, 2], errors
        for err in errors:
            assert f"is in use by another run (pid {os.getpid()} on host" in err, err[-3000:]
            assert "Traceback" not in err
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # nothing written
    finally:
        lock.release()
