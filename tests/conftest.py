"""Shared test set-up: tiny configs, a JAX compilation cache, and a CLI runner.

- `tests/` is put on `sys.path` so that `callbacks_for_tests` (plugins the tests load by
  dotted path, in-process and in CLI subprocesses) imports as a top-level module.
- A session-wide persistent compilation cache in a fresh temporary directory: the many
  small `Trainer` runs compile the same step, and XLA on CPU takes seconds per compile.
  The trainer points JAX at `run.compile_cache` (default `auto`: under $XDG_CACHE_HOME,
  which is set to a fresh temporary directory below). The session's cache is that same
  `auto` directory, so runs with the default (in-process, and CLI subprocesses, which
  inherit the environment) and runs given `compile_cache_override()` share one cache.
- `run_cli(args, cwd)` runs `python -m nnxtrain.cli.train` in a subprocess, from a directory
  that is not the repository, so nothing depends on the working directory.
- `run_cli_in_process(args, cwd)`: the same `main()` in this process, for bad input that
  the CLI refuses before any training: no interpreter or JAX start per case (seconds
  each). A few cases stay real subprocesses to prove the exit code and the output end to
  end; `run_cli_cases` runs a table of cases both ways at once. `assert_one_line_error(proc,
  key)`: exit 2 and one line naming the key and the fix.
- `short_run`: one short CLI run of the tiny model for the session (its process and run
  dir), shared by the tests that read a finished run (test_cli.py) or damage a copy of its
  checkpoint (test_checkpoint_integrity_cli.py).
- `two_process_run`: test_multidevice's run on 2 processes x 4 CPU devices, once for the
  session: test_multidevice compares it with one process, test_preemption_multiprocess
  compares its interrupted and resumed run with it.
- `assert_equal_to_rounding`: float32 results of the same sums in another order (another
  mesh, kernel or accumulation) agree to a tolerance derived from the number of terms.
- `free_port()`: a port for a multi-process test's coordinator on 127.0.0.1.
- `flip_one_bit_in_the_largest_data_file(step_dir)`: damages one saved value of a
  checkpoint, its index untouched.
"""

import contextlib
import importlib.util
import io
import logging
import os
import random
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

from nnxtrain.config import ModelConfig

# XLA's CPU compiler spends most of a tiny model's compile time in LLVM's optimisation
# passes, which make the machine code faster, not its results different (the HLO, its
# fusions and its order of operations are XLA's, above LLVM). The tests compile hundreds of
# tiny steps and run each a few times, so every process the tests start, in-process JAX and
# CLI subprocesses alike, skips those passes: a third less CPU time for the suite.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def xla_flags(devices: int = 0) -> str:
    """XLA_FLAGS for a test's process: fast compiles, and `devices` simulated CPU devices."""
    return FAST_COMPILE + (f" --xla_force_host_platform_device_count={devices}" if devices else "")


os.environ["XLA_FLAGS"] = xla_flags()  # before JAX starts its backend (below, or in a child)

# Every run the tests start (in-process or as a CLI subprocess) keeps its default compilation
# cache ($XDG_CACHE_HOME/nnxtrain/jax) out of the user's home directory.
# Under pytest-xdist the workers of one run share it (PYTEST_XDIST_TESTRUNUID is the run's
# id): a step one worker compiled, the other loads. JAX writes cache entries atomically.
_RUN_ID = os.environ.get("PYTEST_XDIST_TESTRUNUID")
if _RUN_ID:
    _shared = Path(tempfile.gettempdir()) / f"nnxtrain-test-cache-{_RUN_ID}"
    _shared.mkdir(exist_ok=True)
    os.environ["XDG_CACHE_HOME"] = str(_shared)
else:
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="nnxtrain-test-cache-")

# In-process runs share one JAX: pin its CPU device count, so that no test depends on which
# test started JAX first (`run.host_devices=-1` keeps the devices of a JAX that runs).
jax.config.update("jax_num_cpu_devices", 1)

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

# A model small enough that every forward/backward in the unit tests is instant, with
# grouped-query attention (4 query heads share 2 kv heads) and two stacked layers.
TINY = ModelConfig(
    name="unit",
    vocab_size=32,
    emb_dim=16,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=24,
    max_len=32,
    dtype="float32",
)


# Scheduling under pytest-xdist (`make test`: `-n 2 --dist loadfile --no-loadscope-reorder`).
# Each file goes to one worker, so its module fixtures are built once. (`--dist loadgroup`
# with xdist_group marks set here did not hold under xdist 3.8: the test ids carried no
# group, a file's tests ran in both workers and its module fixtures were built twice.) Files
# holding `slow` tests (real CLI runs, subprocesses, TPU compiles) start first, those that
# read the same costly session fixture (a CLI run, the two-process run) next to each
# other: the many quick unit files then fill both workers to the end, instead of one
# worker finishing alone on a long file.
SHARED_SESSION_FIXTURES = ("short_run", "two_process_run")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    groups: dict[Path, str] = {}
    for item in items:
        shared = [f for f in SHARED_SESSION_FIXTURES if f in getattr(item, "fixturenames", ())]
        if shared or item.path not in groups:
            groups[item.path] = shared[0] if shared else str(item.path.relative_to(TESTS_DIR))
    slow = {groups[item.path] for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: groups[item.path] not in slow)  # stable: files stay in order


_CACHE: list[Path] = []  # the session's compilation cache directory, once created


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache() -> None:
    """Caches compiled programs for this session only (identical steps compile once)."""
    _CACHE.append(Path(os.environ["XDG_CACHE_HOME"]) / "nnxtrain" / "jax")
    _CACHE[0].mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(_CACHE[0]))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def compile_cache_override() -> str:
    """`run.compile_cache=<the session's cache>`: no test writes outside its tmp dirs."""
    assert _CACHE, "the session fixture has not run yet"
    return f"run.compile_cache={_CACHE[0]}"


def cli_env() -> dict[str, str]:
    """The environment for CLI subprocesses: test plugins importable, quiet JAX."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS_DIR), env.get("PYTHONPATH", "")) if p)
    env["XLA_FLAGS"] = xla_flags()
    env["JAX_PLATFORMS"] = "cpu"
    return env


def run_cli(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Runs the real `nnxtrain` CLI (`python -m nnxtrain.cli.train ARGS`) in `cwd`."""
    if not any(a.startswith("run.compile_cache=") for a in args):
        args = [*args, compile_cache_override()]
    return subprocess.run(
        [sys.executable, "-m", "nnxtrain.cli.train", *args],
        cwd=cwd,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_cli_cases(
    cases: Iterable[str],
    args_of: Callable[[str], tuple[list[str], Path]],
    in_subprocess: Collection[str],
) -> dict[str, subprocess.CompletedProcess[str]]:
    """Each case's CLI run, `args_of(case)` giving (command line, cwd): the cases in
    `in_subprocess` as the real command (two at a time, in the background), the others
    in this process meanwhile, one after another (`run_cli_in_process`)."""
    # The environment is copied before the in-process cases run: main() sets variables
    # (HYDRA_FULL_ERROR) while it runs, which the subprocesses must not inherit.
    env = cli_env()
    with ThreadPoolExecutor(max_workers=2) as pool:
        started: dict[str, Future[subprocess.CompletedProcess[str]]] = {
            case: pool.submit(run_cli, *args_of(case), env)
            for case in cases
            if case in in_subprocess
        }
        done = {case: run_cli_in_process(*args_of(case)) for case in cases if case not in started}
        done |= {case: future.result() for case, future in started.items()}
    return done


def run_cli_in_process(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """`nnxtrain.cli.train.main()` with `args` as its command line, run in this process from `cwd`:
    its exit status (SystemExit's code) and what it printed. An exception that escapes
    `main()` (a crash the real CLI would print as a traceback) propagates to the test.

    What `main()` changes in the process is put back: the working directory, os.environ
    (it sets HYDRA_FULL_ERROR), logging (Hydra's job logging replaces the root logger's
    handlers by a console handler and a file handler for <job dir>/cli.log), the
    second-Ctrl-C action, and Hydra's global state (so that `compose` and the next case
    start afresh). Hydra configures logging with `logging.config.dictConfig`, which closes
    every handler that exists (`logging.shutdown`), pytest's capture handlers too: that
    call is made a no-op while `main()` runs, and the handlers it would close are kept."""
    from hydra.core.global_hydra import GlobalHydra

    from nnxtrain.cli import train as cli
    from nnxtrain.parallel import preemption

    if not any(a.startswith("run.compile_cache=") for a in args):
        args = [*args, compile_cache_override()]
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    named = dict(logging._handlers)  # type: ignore[attr-defined]
    handler_list = list(logging._handlerList)  # type: ignore[attr-defined]
    environ, argv, here = dict(os.environ), sys.argv, os.getcwd()
    second_interrupt = preemption._second_interrupt
    out, err = io.StringIO(), io.StringIO()
    code: int | str | None = 0
    try:
        os.chdir(cwd)
        sys.argv = ["nnxtrain", *args]
        with (
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
            pytest.MonkeyPatch.context() as mp,
        ):
            mp.setattr(logging, "shutdown", lambda *_, **__: None)
            try:
                cli.main()
            except SystemExit as e:
                code = e.code
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:], root.level = handlers, level
        logging._handlers.clear()  # type: ignore[attr-defined]
        logging._handlers.update(named)  # type: ignore[attr-defined]
        logging._handlerList[:] = handler_list  # type: ignore[attr-defined]
        os.environ.clear()
        os.environ.update(environ)
        sys.argv = argv
        os.chdir(here)
        preemption.on_second_interrupt(second_interrupt)
        GlobalHydra.instance().clear()
    returncode = code if isinstance(code, int) else (0 if code is None else 1)
    return subprocess.CompletedProcess(
        ["nnxtrain", *args], returncode, out.getvalue(), err.getvalue()
    )


def assert_one_line_error(
    proc: subprocess.CompletedProcess[str],
    key: str,
    prefixes: tuple[str, ...] = ("nnxtrain: error: ",),
) -> None:
    """Bad input: exit 2, no traceback, and one line on stderr that starts with one of
    `prefixes`, names `key` and says the fix."""
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(prefixes), lines[0]
    assert key in lines[0], lines[0]
    assert "Fix:" in lines[0], lines[0]


SHORT_RUN = ["model=tiny", "run.steps=20", "run.log_every=5", "run.batch_size=4", "run.seq_len=16"]


@pytest.fixture(scope="session")
def short_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """SHORT_RUN (20 steps, a line every 5, the final checkpoint at step 20) through the
    CLI, run from an unrelated directory: its process and its run dir. Read-only: a test
    that changes files works on a copy."""
    root = tmp_path_factory.mktemp("short")
    run_dir = root / "run"
    proc = run_cli([*SHORT_RUN, f"hydra.run.dir={run_dir}"], cwd=root)
    return proc, run_dir


@pytest.fixture(scope="session")
def two_process_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[list[int], list[str], Path]:
    """test_multidevice's uninterrupted run on 2 processes x 4 CPU devices through the CLI
    (`run_two_processes`): exit codes, output, run dir. Read-only. Once a session: it is
    test_multidevice's subject and test_preemption_multiprocess's reference."""
    from test_multidevice import run_two_processes

    return run_two_processes(tmp_path_factory.mktemp("two_processes"))


def shardings_table(text: str) -> dict[str, list[str]]:
    """First cell -> cells of every table row of a shardings.txt (the sharding printer's)."""
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) >= 4 and cells[0] not in ("path", "name"):
            out[cells[0]] = cells
    return out


# TPU-target tests need libtpu (the `nnxtrain[tpu]` extra, part of `[dev]`); elsewhere they
# skip and say why.
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install 'nnxtrain[tpu]')",
)


FLOAT32_EPS = float(np.finfo(np.float32).eps)


def rounding_tolerance(terms: int) -> float:
    """How far two float32 evaluations of the same sum of `terms` terms, added in different
    orders, can be apart, relative to the sum of the terms' magnitudes: recursive summation
    is within (terms - 1)·u of the exact sum (u = eps / 2, the unit roundoff; Higham,
    "Accuracy and Stability of Numerical Algorithms", 4.2), so two orders are within
    terms·eps of each other."""
    return terms * FLOAT32_EPS


def assert_equal_to_rounding(actual: Any, desired: Any, terms: int, what: str = "") -> None:
    """Pytrees of float32 arrays equal up to `rounding_tolerance(terms)`, leaf by leaf.

    The bound is relative to the sum of the terms' magnitudes, which is not known per entry
    (an entry where terms cancel is much smaller than it); the leaf's largest entry stands
    for it, as an absolute tolerance beside the relative one."""
    tol = rounding_tolerance(terms)
    leaves = zip(jax.tree.leaves(actual), jax.tree.leaves(desired), strict=True)
    for i, (a, d) in enumerate(leaves):
        scale = float(np.max(np.abs(d), initial=0.0))
        np.testing.assert_allclose(a, d, rtol=tol, atol=tol * scale, err_msg=f"{what} leaf {i}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a coordinator.

    Not one from the kernel's ephemeral range (what binding port 0 returns): the kernel
    hands those to outgoing connections, which could take it before the coordinator binds
    it. Below that range only a process that asks for the number gets it; the draw is from
    the system's entropy, so concurrent sessions (each seeded alike by pytest-randomly) do
    not draw the same ports."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default
    draw = random.SystemRandom()
    for _ in range(100):
        port = draw.randrange(max(low // 2, 1024), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def flip_one_bit_in_the_largest_data_file(step_dir: Path) -> None:
    """Changes one value of a saved checkpoint step: one bit (a mantissa's lowest, so the
    value stays finite) in the middle of its largest array data file. Orbax's index
    (the OCDBT manifest and tree nodes) is left as it was."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    path = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
