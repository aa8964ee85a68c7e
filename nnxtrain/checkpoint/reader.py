"""Reading a run's checkpoint read-only: which step, the config it was saved with, and its
parameters. Used by `run.init_from` (`nnxtrain.interop.init_from`), `nnxtrain-export` and
`nnxtrain-generate`.

    ckpt = locate("runs/a")                   # a run dir, its checkpoints/ dir or one step's dir
    ckpt.step, ckpt.config["model"]           # the latest complete step; its saved config
    params = read_params(ckpt, abstract)      # pure dict of arrays, each in its target's shards

The layout is the checkpointer plugin's (nnxtrain/checkpoint/storage.py): `<dir>/<step>/state`
(Orbax PyTree) and `<dir>/<step>/meta` (JSON). Orbax writes a step to a temporary name and
renames it when every file is written, so a folder named by a step number is a complete
save. `locate` reads only files, never a JAX device: it runs while the config is composed,
before JAX starts. Bad input is a one-line `UserError` naming the path.
"""

import json
import logging
import os
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, cast

from omegaconf import OmegaConf

from nnxtrain.errors import UserError, first_line

META_FILE = os.path.join("meta", "metadata")  # what Orbax's JSON handler writes for `meta`


@dataclass(frozen=True)
class Checkpoint:
    """One complete checkpoint of a run."""

    directory: str  # the checkpoints directory
    step: int
    steps: tuple[int, ...]  # every complete step of `directory`, ascending
    config: dict[str, Any]  # the config saved with it (else the run's config.yaml)
    lora_base: dict[str, Any] | None = None  # a LoRA checkpoint's base (checkpoint.lora)

    @property
    def path(self) -> str:
        return os.path.join(self.directory, str(self.step))


def run_config(run_dir: str) -> dict[str, Any] | None:
    """The run's config.yaml as plain data (None when there is none)."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return None
    try:
        data = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as e:
        raise UserError(f"{path} is unreadable ({first_line(e)}). Fix: repair it.") from e
    return cast(dict[str, Any], data) if isinstance(data, dict) else None


def checkpoint_dir(run_dir: str) -> str:
    """The checkpoints directory of a run dir (or the directory itself if it is one)."""
    default = os.path.join(run_dir, "checkpoints")
    if os.path.isdir(default):
        return default
    config = run_config(run_dir) or {}
    for cb in config.get("callbacks", {}).values():  # a checkpointer saving elsewhere
        target = str(cb.get("_target_", "")) if isinstance(cb, dict) else ""
        if target.rsplit(".", 1)[-1].lower() == "checkpointer" and cb.get("directory"):
            return os.path.join(run_dir, cb["directory"])
    return run_dir  # perhaps the checkpoints directory itself


def complete_steps(directory: str) -> list[int]:
    """The steps saved completely in a checkpoints directory, ascending."""
    if not os.path.isdir(directory):
        return []
    return sorted(
        int(n)
        for n in os.listdir(directory)
        if n.isdigit() and os.path.isfile(os.path.join(directory, n, META_FILE))
    )


def is_step_dir(path: str) -> bool:
    return os.path.basename(os.path.normpath(path)).isdigit() and os.path.isfile(
        os.path.join(path, META_FILE)
    )


def locate(path: str, step: int | None = None, step_key: str = "step") -> Checkpoint:
    """The checkpoint of `path` (a run dir, a checkpoints dir or one `<step>` dir): `step`,
    or the latest complete one; `step_key` names the step's option in errors."""
    if not os.path.isdir(path):
        raise UserError(f"{path} is not a directory. Fix: give a run directory.")
    path = os.path.abspath(path)
    if is_step_dir(path):
        directory, only = os.path.dirname(path), int(os.path.basename(path))
        steps = [only]
        step = only if step is None else step
    else:
        directory = checkpoint_dir(path)
        steps = complete_steps(directory)
    if not steps:
        raise UserError(
            f"{path} has no complete checkpoint (looked in {directory}). "
            "Fix: give the run directory of a run that saved one."
        )
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise UserError(
            f"{step_key} {step}: {directory} has no checkpoint of that step "
            f"(it has {', '.join(map(str, steps))}). Fix: pick one of those."
        )
    where = os.path.join(directory, str(step))
    try:
        with open(os.path.join(where, META_FILE)) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"checkpoint {where} is unreadable ({first_line(e)})") from e
    saved = meta.get("config") if isinstance(meta, dict) else None
    saved = saved or run_config(os.path.dirname(directory)) or run_config(path)
    if not saved or "model" not in saved:
        raise UserError(
            f"{where} records no model config, and its run has no config.yaml. "
            "Fix: give the run directory the checkpoint came from."
        )
    base = meta.get("lora_base") if isinstance(meta, dict) else None
    return Checkpoint(directory, step, tuple(steps), saved, base)


def read_params(ckpt: Checkpoint, target: dict[str, Any]) -> dict[str, Any]:
    """The parameters of `ckpt` as a pure dict shaped like `target` (ShapeDtypeStructs with
    shardings: each array is read straight into its shards, in the target's dtype).

    The checkpointer's own reader does the work, so what is read is checked against the
    digests saved with it: a damaged checkpoint is a one-line UserError, never weights.
    """
    from nnxtrain.checkpoint import storage  # (imports JAX and Orbax)

    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # Orbax notes each option read_only sets: noise here
    try:
        mngr = storage.open_manager(ckpt.directory, read_only=True)
        try:
            with storage.quiet_leftover_reads():
                params, _, _ = storage.restore(
                    mngr,
                    ckpt.step,
                    SimpleNamespace(params=target),
                    ckpt.config,
                    params_only=True,
                    warn=_to_stderr,
                )
        finally:
            mngr.close()
    finally:
        absl.setLevel(level)
    return cast(dict[str, Any], params)


def _to_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)
