"""The run directory: where a run writes config.yaml and run_info.json.

    path = make_run_dir(cfg)              # run.dir, or runs/<time>; writes config.yaml
    write_json(os.path.join(path, "run_info.json"), info)   # atomic: never half-written

In a multi-process run every process gets the path, and only process 0 writes files.
"""

import json
import os
import time
from typing import Any

import jax
from omegaconf import OmegaConf

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
    """Creates the run directory (`run.dir`, or runs/<time>) and writes config.yaml in it;
    an unwritable directory is a one-line UserError naming run.dir."""
    path = os.path.abspath(cfg.run.dir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S")))
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(
            f"run.dir: {path!r} is a file, not a directory. "
            "Fix: set run.dir to a directory (it is created if missing)."
        )
    try:
        os.makedirs(path, exist_ok=True)
        if jax.process_index() == 0:
            with open(os.path.join(path, "config.yaml"), "w") as f:
                f.write(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    except OSError as e:
        raise UserError(
            f"run.dir: cannot write to {path!r} ({e.strerror}). "
            "Fix: set run.dir to a writable directory."
        ) from e
    return path


def write_run_info(run_dir: str, info: dict[str, Any]) -> None:
    """Writes run_info.json (process 0 only)."""
    if jax.process_index() == 0:
        write_json(os.path.join(run_dir, RUN_INFO), info)
