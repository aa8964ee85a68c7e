"""The run directory: where a run writes config.yaml and run_info.json.

    path = make_run_dir(cfg)              # run.dir, or a new runs/<time>; checks it
    write_config(path, cfg)               # config.yaml, once there is something to do
    write_run_info(path, info)            # run_info.json (what it holds: nnxtrain.train.report)
    final_record(path, step)              # run_info.json's "final" record of that step

The trainer locks the directory (`nnxtrain.run.lock`) before writing anything into it,
and writes config.yaml only once it knows there is something to do: a rerun of a
finished run leaves the records of the run that trained there unchanged. In a
multi-process run every process gets the path, and only process 0 writes files.
"""

import itertools
import json
import os
import time
from typing import Any

import jax
from omegaconf import OmegaConf

from nnxtrain.config import Config
from nnxtrain.errors import UserError
from nnxtrain.jsonio import write_json

RUN_INFO = "run_info.json"
# Run dirs the CLI created before the run's checks (for Hydra, as its job dir): a run that
# fails before writing anything removes its empty run dir again. Here rather than in the
# CLI's module, which `python -m nnxtrain.cli.train` imports twice (as __main__ and by name).
CREATED_DIRS: set[str] = set()


def make_run_dir(cfg: Config) -> str:
    """Creates the run directory and returns its absolute path: `run.dir`, or else
    runs/<time> (a single-process run takes runs/<time>-2, ... when another run of that
    second has it; the processes of a multi-process run need one run.dir given). An
    unusable directory is a one-line UserError naming run.dir."""
    path = os.path.abspath(cfg.run.dir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S")))
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(
            f"run.dir: {path!r} is a file, not a directory. "
            "Fix: set run.dir to a directory (it is created if missing)."
        )
    try:
        if cfg.run.dir or jax.process_count() > 1:
            os.makedirs(path, exist_ok=True)
        else:
            path = _new_dir(path)
    except OSError as e:
        raise UserError(
            f"run.dir: cannot write to {path!r} ({e.strerror}). "
            "Fix: set run.dir to a writable directory."
        ) from e
    return path


def _new_dir(stem: str) -> str:
    """Creates `stem`, or the first free `stem-N`: a fresh directory no other run has."""
    for n in itertools.count(1):
        path = stem if n == 1 else f"{stem}-{n}"
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def write_config(run_dir: str, cfg: Config) -> bool:
    """Writes the resolved config as config.yaml (process 0 only), except that a dry run
    keeps the records of a run that trained in run_dir: then it returns False, and
    run_info.json is to be kept too."""
    if cfg.run.dry_run and holds_a_run(run_dir):
        return False
    if jax.process_index() != 0:
        return True
    try:
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    except OSError as e:
        raise UserError(
            f"run.dir: cannot write to {run_dir!r} ({e.strerror}). "
            "Fix: set run.dir to a writable directory."
        ) from e
    return True


def read_run_info(run_dir: str) -> dict[str, Any]:
    """What run_info.json holds ({} when there is none, or it cannot be read)."""
    try:
        with open(os.path.join(run_dir, RUN_INFO), encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def final_record(run_dir: str, step: int) -> dict[str, Any]:
    """run_info.json's "final" record (metrics, eval_metrics, best_eval_loss) when it is of
    `step`, else {}."""
    final = read_run_info(run_dir).get("final")
    return final if isinstance(final, dict) and final.get("step") == step else {}


def holds_a_run(run_dir: str) -> bool:
    """Whether run_dir holds the records of a run that trained (not of a dry run)."""
    info = read_run_info(run_dir)
    return bool(info) and not info.get("dry_run", False)


def write_run_info(run_dir: str, info: dict[str, Any]) -> None:
    """Writes run_info.json (process 0 only)."""
    if jax.process_index() == 0:
        write_json(os.path.join(run_dir, RUN_INFO), info)
