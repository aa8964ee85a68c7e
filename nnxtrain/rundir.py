"""The run directory: where a run writes config.yaml and run_info.json.

    path = make_run_dir(cfg)              # run.dir, or a new runs/<time>; checks it
    write_config(path, cfg)               # config.yaml, once there is something to do
    write_run_info(path, run_info(cfg, mesh, flops, num_params, floor, compiled_steps))
    final_record(path, step)              # run_info.json's "final" record of that step
    console.print(header(cfg, mesh, flops, num_params, floor))  # the run's first lines
    write_json(path_of_any_file, obj)     # atomic: never half-written

The trainer locks the directory (`nnxtrain.runlock`) before writing anything into it,
and writes config.yaml only once it knows there is something to do: a rerun of a
finished run leaves the records of the run that trained there unchanged. In a
multi-process run every process gets the path, and only process 0 writes files.
"""

import dataclasses
import itertools
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
from omegaconf import OmegaConf

from nnxtrain.accounting import FlopsReport
from nnxtrain.compile import CompiledStep
from nnxtrain.config import Config
from nnxtrain.errors import UserError

RUN_INFO = "run_info.json"


def write_json(path: str, obj: Any) -> None:
    """Writes `obj` as indented JSON through a temporary file and a rename, so a reader
    (or a crash) never sees a half-written file. The temporary file is this process's
    own: processes that race to write one file each rename a whole one. Values JSON
    lacks are written as str()."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


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


def run_info(
    cfg: Config,
    mesh: jax.sharding.Mesh,
    flops: FlopsReport,
    num_params: int,
    floor: float | None,
    steps: Sequence[CompiledStep],
) -> dict[str, Any]:
    """What run_info.json holds until the run ends (then also "final"): the model, its
    FLOPs, the mesh, the compiled steps' memory and compile times."""
    info = {
        "dry_run": cfg.run.dry_run,
        "model": cfg.model.name,
        **flops.as_dict(),
        "num_params": num_params,
        "loss_floor": floor,
        "mesh": dict(mesh.shape),
        "backend": jax.default_backend(),
        "batch_size": cfg.run.batch_size,
        "seq_len": cfg.run.seq_len,
        "jax_version": jax.__version__,
    }
    for step in steps:
        prefix = "" if step.name == "train" else f"{step.name}_"
        info[f"{prefix}compiled_memory"] = step.memory.as_dict()
        info[f"{prefix}lower_seconds"] = step.lower_seconds
        info[f"{prefix}compile_seconds"] = step.compile_seconds
    return info


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


def header(
    cfg: Config, mesh: jax.sharding.Mesh, flops: FlopsReport, num_params: int, floor: float | None
) -> str:
    """The run's first lines: model, mesh, batch, steps; parameters and FLOPs; loss floor."""
    platform = jax.devices()[0].platform
    lines = [
        f"nnxtrain: model {cfg.model.name} | mesh "
        + " ".join(f"{k}={v}" for k, v in mesh.shape.items())
        + f" ({mesh.size} {platform} device{'s' if mesh.size > 1 else ''}) | batch "
        f"{cfg.run.batch_size} x {cfg.run.seq_len} tokens | {cfg.run.steps} steps",
        dataclasses.replace(flops, num_params=num_params).summary(),
    ]
    if floor is not None:
        lines.append(f"loss floor (entropy rate of the data source): {floor:.4f}")
    return "\n".join(lines)
