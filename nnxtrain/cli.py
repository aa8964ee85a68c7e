"""The `nnxtrain` command: Hydra composes conf/, this turns the result into a Trainer run.

    nnxtrain                                   # small default run on synthetic data
    nnxtrain +experiment=llama1b run.dry_run=true
    nnxtrain model=tiny run.steps=50 optim.lr=1e-3
    nnxtrain -m optim.lr=1e-3,3e-4             # Hydra multirun
    nnxtrain --cfg job                         # print the composed config

Bad input ends with one line on stderr that names the key and the fix, and exit code 2;
a run stopped by a non-finite loss exits 3; a multi-process run that lost a process exits
4, naming it in one line; SIGTERM/SIGINT save and exit 143/130. Overrides are checked
against the schemas before Hydra composes, so a typo is reported in one line too. JAX is
imported only after composition, so that settings which must precede JAX's start can be
applied first.
"""

import contextlib
import dataclasses
import math
import os
import sys
import time
import traceback
import typing
from importlib import resources
from typing import Any, NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ValidationError

from nnxtrain.config import GROUPS, from_omegaconf, register_schemas
from nnxtrain.errors import ConfigError, LostProcessError, UserError, first_line
from nnxtrain.sweep import write_status

EXIT_BAD_INPUT = 2
EXIT_NOT_FINITE = 3
EXIT_LOST_PROCESS = 4
EXIT_PREEMPTED = {"SIGTERM": 143, "SIGINT": 130}  # as a shell reports death by that signal
SELECTABLE = (*GROUPS, "callbacks", "experiment", "hparams_search")


def _options(group: str) -> list[str]:
    folder = resources.files("nnxtrain.conf").joinpath(group)
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def check_overrides(args: list[str]) -> None:
    """Fails in one line on an unknown group option or an unknown key of a group schema."""
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as e:  # Hydra reports the grammar error itself, in full
        del e
        return
    for o in parsed:
        key = o.key_or_group
        if key.startswith("hydra") or o.is_delete():
            continue
        if key in SELECTABLE and "." not in key:
            options = _options(key)
            values = (
                list(o.sweep_string_iterator())
                if o.is_sweep_override()
                else [o.get_value_element_as_str()]
            )
            for value in values:
                if value not in options:
                    raise ConfigError(
                        key,
                        f"unknown {key} {value!r} (available: {', '.join(options)})",
                        f"use {key}=<one of those>",
                    )
            continue
        group, _, rest = key.partition(".")
        if group in GROUPS and rest and not o.is_add():
            field = rest.split(".")[0]
            names = [f.name for f in dataclasses.fields(GROUPS[group])]
            if field not in names:
                raise ConfigError(
                    key, f"no such key in {group}/", f"use one of {group}.{{{', '.join(names)}}}"
                )
            if rest == field and not o.is_delete():
                _check_type(group, field, key, o)
        elif group not in (*SELECTABLE, "") and not o.is_add():
            raise ConfigError(
                key,
                "no such config group",
                f"top-level keys are {', '.join(SELECTABLE)}; prefix new keys with +",
            )


def _check_type(group: str, field: str, key: str, override: Any) -> None:
    """A value of the wrong type (`run.steps=abc`, `run.log_every=2.5`) fails in one line
    here; Hydra would stop composing with a multi-line report and exit 1."""
    try:
        values = (
            list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
        )
    except Exception:  # a sweep that is not a list of values (an interval): Hydra checks it
        return
    node = OmegaConf.structured(GROUPS[group])
    OmegaConf.set_readonly(node, False)
    for value in values:
        try:
            node[field] = value
        except ValidationError as e:
            expected = typing.get_type_hints(GROUPS[group])[field]
            raise ConfigError(
                key,
                first_line(e).removeprefix("ValidationError: "),
                f"give {key} a value of type {getattr(expected, '__name__', expected)}",
            ) from e


@hydra.main(version_base="1.3", config_path="pkg://nnxtrain.conf", config_name="config")
def _run(cfg: DictConfig) -> float:
    """One job: returns the objective a sweeper minimises (final eval loss, else train loss)."""
    hc = HydraConfig.get()
    sweeping = hc.mode == RunMode.MULTIRUN
    fail_fast = bool(OmegaConf.select(cfg, "run.fail_fast", default=False))
    job_dir = hc.runtime.output_dir
    status: dict[str, Any] = {
        "job": hc.job.num if sweeping else 0,
        "overrides": list(hc.overrides.task),
        "pid": os.getpid(),
        "run_dir": job_dir,
    }
    t0 = time.perf_counter()
    try:
        config = from_omegaconf(cfg, list(hc.overrides.task))
        if not config.run.dir:
            config = dataclasses.replace(config, run=dataclasses.replace(config.run, dir=job_dir))
        status["run_dir"] = config.run.dir
        from nnxtrain.trainer import Trainer  # imports JAX

        trainer = Trainer(config)
        result = trainer.fit()
    except UserError as e:
        code = EXIT_LOST_PROCESS if isinstance(e, LostProcessError) else EXIT_BAD_INPUT
        return _failed(status, job_dir, f"error: {e}", t0, sweeping and not fail_fast, code)
    except Exception as e:
        if not sweeping or fail_fast:
            if not _distributed():
                raise
            traceback.print_exc()
            _exit(1)
        return _failed(status, job_dir, f"job failed: {first_line(e, 300)}", t0, True)
    final_eval = result.eval_metrics.get("eval/loss")
    status.update(
        status=result.reason,
        final_loss=result.metrics.get("loss"),
        final_eval_loss=final_eval,
        best_eval_loss=result.best_eval_loss,
        tokens_per_sec=(
            result.step * config.run.batch_size * config.run.seq_len / result.seconds
            if result.seconds
            else None
        ),
        wall_seconds=time.perf_counter() - t0,
    )
    write_status(job_dir, status)
    if result.reason.startswith("preempted"):  # stops a whole sweep too
        print(f"nnxtrain: {result.reason}; rerun the same command to resume", file=sys.stderr)
        sys.exit(EXIT_PREEMPTED.get(trainer.preempted or "", 143))
    if result.reason.startswith("not finite"):
        print(f"nnxtrain: {result.reason}", file=sys.stderr)
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
    keep_going: bool,
    code: int = EXIT_BAD_INPUT,
) -> float:
    """Records a failed job; in a sweep the next job runs, otherwise the process exits."""
    print(f"nnxtrain: {line}", file=sys.stderr)
    # The status keeps the bare message: "error: run.steps: ..." -> "run.steps: ..."
    status.update(
        status="failed", error=line.split(": ", 1)[1], wall_seconds=time.perf_counter() - t0
    )
    with contextlib.suppress(OSError):
        write_status(job_dir, status)
    if not keep_going:
        _exit(code)
    return math.inf


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


def main() -> None:
    """Console-script entry point."""
    register_schemas()
    try:
        check_overrides(sys.argv[1:])
    except ConfigError as e:
        print(f"nnxtrain: error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    _run()


if __name__ == "__main__":
    main()
