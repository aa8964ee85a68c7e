"""Bad input to the real CLI: exit code 2 and one line on stderr that names the key, never a
traceback. Most cases call the CLI's `main()` in this process (conftest's
`run_cli_in_process`: no interpreter and JAX start per case); the multi-host ones, and two
plain ones that prove the exit code and the output end to end, run the real command in
subprocesses, concurrently with the in-process cases.

Also: a plugin's exception (exit 2, its traceback in errors.log; `main()` in this process
too), and Ctrl-C, pressed twice or before the run's handler is installed (exit 130 and one
line, at once).
"""

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    assert_one_line_error,
    cli_env,
    compile_cache_override,
    free_port,
    run_cli,
    run_cli_cases,
    run_cli_in_process,
)
from test_checkpoint_signals import PLUGINS as CHECKPOINT_PLUGINS

pytestmark = pytest.mark.slow

BASE = ["model=tiny", "run.steps=2", "run.batch_size=2", "run.seq_len=8", "run.eval_every=0"]

# id -> (overrides, the key the error must name[, flags before them]). "{tmp}" is the
# case's own directory, "{port}" a free port, "{busy}" a port a program listens on.
CASES: dict[str, tuple[list[str], str] | tuple[list[str], str, list[str]]] = {
    "unknown-key": (["run.stepz=1"], "run.stepz"),
    "unknown-appended-key": (["+run.stepz=1"], "run.stepz"),
    "unknown-model": (["model=nope"], "model"),
    "unknown-experiment": (["+experiment=nope"], "experiment"),
    "steps-0": (["run.steps=0"], "run.steps"),
    "batch-0": (["run.batch_size=0"], "run.batch_size"),
    "seq-len-0": (["run.seq_len=0"], "run.seq_len"),
    "seq-len-above-max-len": (["run.seq_len=129"], "run.seq_len"),  # tiny: max_len 128
    "kv-heads-3-of-4": (["model.num_kv_heads=3"], "model.num_kv_heads"),
    "bad-dtype": (["model.dtype=float8"], "model.dtype"),
    "bad-plugin-target": (["+callbacks.x._target_=no.such.Module"], "callbacks.x._target_"),
    # A plugin's option of the wrong type reached its code: a TypeError with a traceback.
    "plugin-option-not-an-int": (
        ["callbacks.metrics.log_every=abc"],
        "callbacks.metrics.log_every",
    ),
    "run-dir-in-proc": (["run.dir=/proc/nope"], "run.dir"),
    "run-dir-under-a-file": (["run.dir={tmp}/a_file/run"], "run.dir"),
    "run-dir-is-a-file": (["run.dir={tmp}/a_file"], "run.dir"),
    # Values of the wrong type used to stop Hydra with a 6-line report and exit 1.
    "steps-not-a-number": (["run.steps=abc"], "run.steps"),
    "log-every-a-float": (["run.log_every=2.5"], "run.log_every"),
    "lr-a-word-in-a-list": (["optim.lr=0.1,abc"], "optim.lr"),
    "lr-nan": (["optim.lr=nan"], "optim.lr"),
    "mesh-data-0": (["mesh.data=0"], "mesh.data"),
    # Seeds numpy or JAX cannot take used to fail after compiling, with a traceback.
    "seed-negative": (["run.seed=-1"], "run.seed"),
    # What Hydra refuses while composing or preparing its output directory used to be 6
    # lines and exit 1 (tests/unit/test_overrides.py has more keys of each kind).
    "callback-key-typo": (["callbacks.checkpoint.evry=5"], "callbacks.checkpoint.every"),
    "unparsable-override": (["run.steps=[1"], "run.steps"),
    "interpolation-to-nothing": (["run.steps=${nope}"], "run.steps"),
    "hydra-run-dir-in-proc": (["hydra.run.dir=/proc/nope"], "hydra.run.dir"),
    "config-path-missing": ([], "/nonexistent", ["--config-path", "/nonexistent"]),
    "flag-after-overrides": (["-m", "optim.lr=1e-3,2e-3"], "-m"),
    # Multi-host: peers that never join, or a port another program holds, ended in JAX's
    # C++ abort (exit 134).
    "peers-never-join": (
        ["mesh.coordinator=127.0.0.1:{port}", "mesh.num_processes=2", "mesh.init_timeout=2"],
        "mesh.num_processes",
    ),
    "coordinator-port-busy": (
        ["mesh.coordinator=127.0.0.1:{busy}", "mesh.num_processes=2", "mesh.init_timeout=2"],
        "mesh.coordinator",
    ),
    # Detection found nothing: it blamed mesh.coordinator "<auto-detected>".
    "num-processes-auto-without-a-cluster": (["mesh.num_processes=-1"], "mesh.num_processes"),
}


# Real subprocesses: the multi-host cases start JAX's distributed runtime (or look for a
# cluster), which must not happen inside the test process; the other two show the exit
# code and the one line of the installed command, from the check of the command line
# (unknown-key) and from Hydra's own refusal (steps-not-a-number).
IN_SUBPROCESS = {
    "unknown-key",
    "steps-not-a-number",
    "peers-never-join",
    "coordinator-port-busy",
    "num-processes-auto-without-a-cluster",
}


@pytest.fixture(scope="module")
def busy_port() -> Iterator[int]:
    """A port on 127.0.0.1 that a program listens on while the cases run."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port()))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory, busy_port) -> dict[str, subprocess.CompletedProcess[str]]:
    def args(case: str) -> tuple[list[str], Path]:
        tmp = tmp_path_factory.mktemp(case)
        (tmp / "a_file").write_text("a regular file, so nothing can be created under it\n")
        overrides, flags = CASES[case][0], CASES[case][2] if len(CASES[case]) > 2 else []
        overrides = [
            o.replace("{tmp}", str(tmp))
            .replace("{port}", str(free_port()))
            .replace("{busy}", str(busy_port))
            for o in overrides
        ]
        hydra_dir = (
            []
            if any(o.startswith("hydra.run.dir") for o in overrides)
            else [f"hydra.run.dir={tmp / 'hydra'}"]
        )
        return [*flags, *BASE, *overrides, *hydra_dir], tmp

    return run_cli_cases(CASES, args, IN_SUBPROCESS)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_naming_the_key(case, results):
    assert_one_line_error(results[case], CASES[case][1])


# `python -m nnxtrain.cli.train`, with Ctrl-C's default action as in a terminal: a suite started
# in the background (`make test &` in a script) ignores SIGINT, and children inherit that.
AS_IN_A_TERMINAL = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'nnxtrain'; runpy.run_module('nnxtrain.cli.train', run_name='__main__')"
)


def start(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """The CLI in the background, its output in files (a full pipe would stall it)."""
    out, err = (cwd / "stdout.txt").open("wb"), (cwd / "stderr.txt").open("wb")
    return subprocess.Popen(
        [sys.executable, "-c", AS_IN_A_TERMINAL, *args, compile_cache_override()],
        cwd=cwd,
        env=env,
        stdout=out,
        stderr=err,
    )


def wait_for(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 240
    while not path.exists():
        assert proc.poll() is None, "the run ended before the test could act"
        assert time.monotonic() < deadline, f"timed out waiting for {path}"
        time.sleep(0.02)


# HoldAt and HoldWrites (a checkpoint write that never finishes), and one more.
PLUGINS = (
    CHECKPOINT_PLUGINS
    + """
class HoldInInit(Callback):
    \"\"\"Writes the file `held` while the trainer is built, then sleeps.\"\"\"

    def __init__(self, held: str):
        open(held, "w").close()
        for _ in range(6000):  # short sleeps: the handler runs at the next wake-up at worst
            time.sleep(0.1)
"""
)


def plugin_env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "err_plugins.py").write_text(PLUGINS)
    env = cli_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    return env


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr and len(lines) == 1, stderr[-3000:]
    return lines[0]


def test_a_second_ctrl_c_exits_at_once_and_keeps_what_was_saved(tmp_path):
    """The second Ctrl-C lands while the final checkpoint is being written (a write that
    never finishes): the process ends at once with one line; the rerun ignores the
    unfinished write and resumes from the last complete checkpoint."""
    run_dir, env = tmp_path / "run", plugin_env(tmp_path)
    ckpts = run_dir / "checkpoints"
    args = [*BASE[:-1], "run.steps=12", "run.eval_every=0", f"hydra.run.dir={run_dir}"]
    args += ["callbacks.checkpoint.every=5"]
    held, release = tmp_path / "held", tmp_path / "release"
    hold = ["+callbacks.hold._target_=err_plugins.HoldAt", "+callbacks.hold.at=7"]
    hold += [f"+callbacks.hold.held={held}", f"+callbacks.hold.release={release}"]
    hold += ["+callbacks.writes._target_=err_plugins.HoldWrites"]  # step 5's write only
    proc = start([*args, *hold], tmp_path, env)
    try:
        wait_for(held, proc)  # inside step 7's hooks; step 5 is saved
        proc.send_signal(signal.SIGINT)  # the first: stop after this step, save it
        release.touch()
        deadline = time.monotonic() + 120
        while not any(n.startswith("7.orbax-checkpoint-tmp") for n in os.listdir(ckpts)):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)  # the second, while step 7 is being written
        assert proc.wait(timeout=60) == 130
    finally:
        proc.kill()
    line = one_line((tmp_path / "stderr.txt").read_text())
    assert line.startswith("nnxtrain: interrupted (second Ctrl-C)"), line
    assert (ckpts / "5").is_dir() and not (ckpts / "7").exists()

    again = run_cli(args, tmp_path, env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "7.orbax-checkpoint-tmp" in again.stdout  # reported as unfinished, then removed
    assert "checkpoint: resumed from step 5 " in again.stdout
    assert (ckpts / "12").is_dir()


def test_ctrl_c_before_the_run_handles_signals_is_one_line(tmp_path):
    """While the trainer is being built (a plugin's constructor runs) Ctrl-C is Python's
    KeyboardInterrupt: one line and exit 130, no traceback."""
    env, held = plugin_env(tmp_path), tmp_path / "held"
    args = [*BASE, f"hydra.run.dir={tmp_path / 'run'}"]
    args += ["+callbacks.wait._target_=err_plugins.HoldInInit", f"+callbacks.wait.held={held}"]
    proc = start(args, tmp_path, env)
    try:
        wait_for(held, proc)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        proc.kill()
    line = one_line((tmp_path / "stderr.txt").read_text())
    assert line.startswith("nnxtrain: interrupted (Ctrl-C)"), line


def test_a_plugin_that_raises_exits_2_with_its_traceback_in_errors_log(tmp_path):
    run_dir = tmp_path / "run"
    plugin = ["+callbacks.boom._target_=callbacks_for_tests.RaiseAt", "+callbacks.boom.at=1"]
    proc = run_cli_in_process([*BASE, f"hydra.run.dir={run_dir}", *plugin], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_line(proc.stderr)
    log = run_dir / "errors.log"
    assert "callback 'boom' (RaiseAt) raised in on_step_end: RuntimeError: boom at step 1" in line
    assert str(log) in line
    text = log.read_text()
    assert text.startswith("=== ") and "raised in on_step_end" in text.splitlines()[0]
    assert "Traceback (most recent call last)" in text
    assert 'raise RuntimeError(f"boom at step {event.step}")' in text


def test_a_plugin_that_fails_before_the_run_dir_exists_logs_in_the_job_dir(tmp_path):
    job_dir, run_dir = tmp_path / "job", tmp_path / "run"
    plugin = ["+callbacks.boom._target_=callbacks_for_tests.RaiseAt", "+callbacks.boom.nope=1"]
    args = [*BASE, f"hydra.run.dir={job_dir}", f"run.dir={run_dir}", *plugin]
    proc = run_cli_in_process(args, tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_line(proc.stderr)
    assert "callbacks.boom: RaiseAt refused its options (TypeError" in line
    assert f"The traceback is in {job_dir / 'errors.log'}." in line
    assert "unexpected keyword argument 'nope'" in (job_dir / "errors.log").read_text()
    assert not run_dir.exists()
