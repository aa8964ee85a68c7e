"""The `nnxtrain` command: Hydra composes conf/, this turns the result into a Trainer run.

    nnxtrain                                   # small default run on synthetic data
    nnxtrain +experiment=llama1b run.dry_run=true
    nnxtrain model=tiny run.steps=50 optim.lr=1e-3
    nnxtrain -m optim.lr=1e-3,3e-4             # Hydra multirun
    nnxtrain --cfg job                         # print the composed config

Bad input ends with one line on stderr that names the key and the fix, and exit code 2;
a run stopped by a non-finite loss exits 3; a multi-process run that lost a process exits
4, naming it in one line; SIGTERM/SIGINT save and exit 143/130, and a second Ctrl-C ends
the process at once (130, one line); before the first step (set-up, compilation) either
ends it at once, with one line and 143/130. The command line is checked before Hydra composes
(`nnxtrain.cli.overrides`), and what Hydra itself refuses is put into one line too: Hydra
raises its errors here (HYDRA_FULL_ERROR=1) instead of printing them in several lines.
A plugin that raises exits 2 like bad input, its traceback in `<run dir>/errors.log`
(in the Hydra job's directory if it raised before the run dir existed, which happens only
when `hydra.run.dir` is given apart from `run.dir`). A crash of nnxtrain itself prints
its traceback and exits 1. JAX is imported only after composition, so that settings
which must precede JAX's start can be applied first.

A run that fails (exit 3: a non-finite loss, or `diverged: ...` from a plugin such as the
spike guard after too many bad steps in a row) ends with that reason and `; a rerun resumes
from step N`, the step its checkpointer left as the latest: the checkpoints saved after the
divergence began are set aside (docs/checkpointing.md).

A run given `run.dir` writes only there (`RunDirIsJobDir`); without it the run dir is
Hydra's job dir, `outputs/<date>/<time>/`. Each job of a multirun also writes
`job_status.json` for the sweep's summary. A plugin module in the working directory is
found, as with `python -m`.

The goodput account of a run covers its whole process: the Trainer is given the process's
start (`process_started`), so Python's start, the imports and Hydra's composition are its
`startup` bucket; each later job of a multirun starts its own where the job before ended.
"""

import contextlib
import dataclasses
import math
import os
import sys
import time
import traceback
from typing import Any, NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback as HydraCallback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from nnxtrain.cli.bad_input import bad_input
from nnxtrain.cli.overrides import check_command_line, explain
from nnxtrain.cli.sweep import write_status
from nnxtrain.config import from_omegaconf, register_schemas
from nnxtrain.errors import (
    EXIT_BAD_INPUT,
    ConfigError,
    LostProcessError,
    PluginError,
    UserError,
    first_line,
    log_traceback,
)
from nnxtrain.interop.init_from import resolve as resolve_init_from
from nnxtrain.parallel.preemption import Interrupted, abandoned, on_second_interrupt
from nnxtrain.run.directory import CREATED_DIRS

EXIT_NOT_FINITE = 3
EXIT_LOST_PROCESS = 4
EXIT_PREEMPTED = {"SIGTERM": 143, "SIGINT": 130}  # as a shell reports death by that signal
EXIT_CRASH = 1

# The earliest time nnxtrain's code sees: the console script's module, once the nnxtrain
# package it sits in (and JAX with it) is imported.
_IMPORTED = time.perf_counter()


def process_started() -> float:
    """The `time.perf_counter()` at which this process started. From /proc/self/stat's
    start time (clock ticks since boot) against CLOCK_BOOTTIME, the clock it counts on;
    where that cannot be read (not Linux), or gives a start after this module's import,
    the import itself, which misses the interpreter's start and the imports before it."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            stat = f.read()
        # Field 22; the command name (field 2) may hold spaces and parentheses, so the
        # fields are counted after its closing one, from field 3.
        ticks = int(stat.rsplit(")", 1)[1].split()[22 - 3])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return _IMPORTED
    started = time.perf_counter() - age
    tick = 1 / os.sysconf("SC_CLK_TCK")  # the start time's resolution
    return started if started <= _IMPORTED + tick else _IMPORTED


_job_started = [process_started()]  # when the next job's time began (a multirun's jobs follow)


@hydra.main(version_base="1.3", config_path="pkg://nnxtrain.conf", config_name="config")
def _run(cfg: DictConfig) -> float:
    """One job: returns the objective a sweeper minimises (final eval loss, else train loss)."""
    try:
        return _job(cfg, _job_started[0])
    finally:
        # A multirun's next job counts its start-up (Hydra composing it) from here.
        _job_started[0] = time.perf_counter()


def _job(cfg: DictConfig, started: float) -> float:
    """`_run`'s job, whose time began at `started` (perf_counter)."""
    hc = HydraConfig.get()
    sweeping = hc.mode == RunMode.MULTIRUN
    fail_fast = bool(OmegaConf.select(cfg, "run.fail_fast", default=False))
    job_dir = hc.runtime.output_dir
    status: dict[str, Any] = {
        "job": hc.job.num if sweeping else 0,
        "overrides": OmegaConf.to_container(hc.overrides.task),  # unresolved: as typed
        "pid": os.getpid(),
        "run_dir": job_dir,
    }
    t0 = time.perf_counter()
    try:
        # the overrides as typed (not resolved) tell which model keys init_from must keep
        config = resolve_init_from(from_omegaconf(cfg), status["overrides"])
        if not config.run.dir:
            config = dataclasses.replace(config, run=dataclasses.replace(config.run, dir=job_dir))
        status["run_dir"] = config.run.dir
        if config.run.fit:  # compiles only: no trainer, no run
            from nnxtrain.train.max_batch import run_max_batch  # imports JAX

            run_max_batch(config)
            return 0.0
        from nnxtrain.train.trainer import Trainer  # imports JAX

        trainer = Trainer(config, started=started)
        result = trainer.fit()
    except UserError as e:
        code = EXIT_LOST_PROCESS if isinstance(e, LostProcessError) else EXIT_BAD_INPUT
        line = f"error: {e}{_traceback_note(e, job_dir)}"
        return _failed(status, job_dir, line, t0, sweeping, fail_fast, code)
    except Exception as e:
        if not sweeping or fail_fast:
            traceback.print_exc()
            _exit(EXIT_CRASH)
        return _failed(status, job_dir, f"job failed: {first_line(e, 300)}", t0, True, False)
    final_eval = result.eval_metrics.get("eval/loss")
    status.update(
        status=result.reason,
        final_loss=result.metrics.get("loss"),
        final_eval_loss=final_eval,
        best_eval_loss=result.best_eval_loss,
        # non-padding tokens of this run's steps (not those of a restored checkpoint, nor
        # its first) over the device's time on them: no compilation, evaluation or saves
        tokens_per_sec=result.tokens_per_sec,
        timed_tokens=result.timed_tokens,
        timed_seconds=result.timed_seconds,
        wall_seconds=time.perf_counter() - t0,
    )
    if sweeping:
        write_status(job_dir, status)
    if result.reason.startswith("preempted"):  # stops a whole sweep too
        print(f"nnxtrain: {result.reason}; rerun the same command to resume", file=sys.stderr)
        sys.exit(EXIT_PREEMPTED.get(trainer.preempted or "", 143))
    if result.reason.startswith(("not finite", "diverged")):
        resume = result.resume_step  # the checkpointer's word (None without one)
        where = "" if resume is None else f"; a rerun resumes from step {resume}"
        print(f"nnxtrain: {result.reason}{where}", file=sys.stderr)
        if not sweeping or fail_fast:
            _exit(EXIT_NOT_FINITE)
        return math.inf
    objective = final_eval if final_eval is not None else result.metrics.get("loss", math.inf)
    return float(objective) if objective is not None else math.inf


def _failed(
    status: dict[str, Any],
    job_dir: str,
    line: str,
    t0: float,
    sweeping: bool,
    fail_fast: bool,
    code: int = EXIT_BAD_INPUT,
) -> float:
    """Says why a job failed; a sweep records it and runs the next job (unless
    run.fail_fast), a single run exits."""
    print(f"nnxtrain: {line}", file=sys.stderr)
    if os.path.abspath(job_dir) in CREATED_DIRS:  # made for this run, which wrote nothing there
        with contextlib.suppress(OSError):  # (rmdir removes an empty directory only)
            os.rmdir(job_dir)
    if sweeping:
        # The status keeps the bare message: "error: run.steps: ..." -> "run.steps: ..."
        status.update(
            status="failed", error=line.split(": ", 1)[1], wall_seconds=time.perf_counter() - t0
        )
        with contextlib.suppress(OSError):
            write_status(job_dir, status)
    if not sweeping or fail_fast:
        _exit(code)
    return math.inf


class RunDirIsJobDir(HydraCallback):
    """A single run given `run.dir` writes there and nowhere else: the run dir becomes
    Hydra's job dir (unless `hydra.run.dir` is given too), and Hydra writes neither its
    `.hydra/` copy of the config (the run dir's config.yaml holds it) nor its log file.
    Otherwise Hydra would make `outputs/<date>/<time>/` for every run, even one that
    fails on a typo. Switched on in conf/config.yaml; a multirun's jobs are left alone."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        # A run.dir that does not resolve is left for the run's own one-line error.
        run_dir = OmegaConf.select(config, "run.dir", throw_on_resolution_failure=False)
        given = any(o.startswith("hydra.run.dir=") for o in config.hydra.overrides.hydra)
        if not run_dir or given:
            return
        try:  # before Hydra does, so that the error names run.dir, not hydra.run.dir
            if not os.path.exists(run_dir):
                CREATED_DIRS.add(os.path.abspath(run_dir))
            os.makedirs(run_dir, exist_ok=True)
        except OSError as e:
            raise ConfigError(
                "run.dir",
                f"cannot create {run_dir} ({e.strerror})",
                "set run.dir to a writable directory",
            ) from e
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.run.dir = run_dir
            config.hydra.output_subdir = None
            logging = config.hydra.job_logging
            if "file" in logging.get("handlers", {}):
                del logging.handlers["file"]
                logging.root.handlers = [h for h in logging.root.handlers if h != "file"]


def _distributed() -> bool:
    jax = sys.modules.get("jax")
    return jax is not None and jax.distributed.is_initialized()


def _exit(code: int) -> NoReturn:
    """Exits; a failed multi-process run skips JAX's shutdown barrier at exit, which would
    wait for processes that are gone or stuck in a collective, then abort."""
    if _distributed():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _traceback_note(e: UserError, job_dir: str) -> str:
    """For a plugin's exception that no errors.log holds yet (it was raised before the run
    dir existed): writes it to the Hydra job's directory, and says where. Not for a module
    that cannot be imported: the quoted error names the module (or file and line)."""
    cause = e.__cause__
    if not isinstance(e, PluginError) or e.log or cause is None:
        return ""
    if isinstance(cause, UserError | ImportError):
        return ""
    log = log_traceback(job_dir, cause, str(e))
    return f" The traceback is in {log}." if log else ""


def _interrupted(what: str = "Ctrl-C") -> NoReturn:
    """A second Ctrl-C, or one outside the run's handler: one line, exit 130 now.

    Not through the interpreter's exit: that would wait for a checkpoint still being
    written, which is what a second Ctrl-C asks not to do. Orbax leaves such a write as a
    temporary folder, which the next start reports and removes; nothing complete is
    touched, and the metrics file is flushed line by line."""
    print(
        f"nnxtrain: interrupted ({what}): exited at once, without a final checkpoint. "
        "Rerun the same command to resume from the last complete one.",
        file=sys.stderr,
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_PREEMPTED["SIGINT"])


def _interrupted_setting_up(signal: str) -> NoReturn:
    """SIGTERM or Ctrl-C before the first step: one line, exit 143 or 130 at once. Through
    os._exit when a compile it interrupted still runs on its thread (the interpreter's exit
    would tear XLA down under it); nothing is being written then."""
    print(
        f"nnxtrain: interrupted ({signal}) while setting up, before the first step: "
        "nothing was trained or saved. Rerun the same command to start again.",
        file=sys.stderr,
    )
    code = EXIT_PREEMPTED.get(signal, 143)
    if abandoned():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _exit(code)


def main() -> None:
    """Console-script entry point."""
    register_schemas()
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"  # the user asked for tracebacks
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra then raises its errors here
    on_second_interrupt(lambda: _interrupted("second Ctrl-C"))
    # `python -m` puts the working directory first on the import path, a console script
    # puts its own folder (.venv/bin): a plugin module beside the user is found either way,
    # after anything installed (a stray file does not shadow a package).
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    args = sys.argv[1:]
    try:
        check_command_line(args)
        _run()
    except UserError as e:
        _bad_input(e)
    except Interrupted as e:
        _interrupted_setting_up(e.signal)
    except KeyboardInterrupt:
        _interrupted()
    except Exception as e:
        error = None if full_error else explain(e, multirun=bool({"-m", "--multirun"} & {*args}))
        if error is None:
            raise
        _bad_input(error)


def _bad_input(e: UserError) -> NoReturn:
    bad_input("nnxtrain", e)


if __name__ == "__main__":
    main()
