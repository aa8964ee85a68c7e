"""Checkpoints: the one owner of their format on disk (public API, used by the
checkpointer plugin, `run.init_from`, `nnxtrain-export` and `nnxtrain-generate`).

- `storage`: the layout (`<dir>/<step>/state` Orbax arrays, `<dir>/<step>/meta` JSON),
  async saves and restores onto any mesh, with `Unreadable` for damaged files, and steps
  set aside (unreadable, or saved after a divergence);
- `digest`: the per-array digests that prove a restore read what was saved;
- `checks`: whether a checkpoint fits this run, and the checkpointer's options;
- `reader`: a run's checkpoint read-only (`locate`, `read_params`), before JAX starts;
- `lora`: a LoRA run's checkpoint, adapters without their base (`check_base`);
- `model`: `read_model`, the Transformer of a run's checkpoint.

docs/checkpointing.md is the manual.
"""

from nnxtrain.checkpoint.checks import check_directory, check_options, config_diff, jsonable
from nnxtrain.checkpoint.lora import check_base
from nnxtrain.checkpoint.model import read_model
from nnxtrain.checkpoint.reader import Checkpoint, locate, read_params
from nnxtrain.checkpoint.storage import (
    FORMAT,
    Unreadable,
    make_meta,
    move_aside,
    open_manager,
    open_source,
    partial_saves,
    restore_latest,
    save,
    saving,
    set_aside,
)

__all__ = [
    "FORMAT",
    "Checkpoint",
    "Unreadable",
    "check_base",
    "check_directory",
    "check_options",
    "config_diff",
    "jsonable",
    "locate",
    "make_meta",
    "move_aside",
    "open_manager",
    "open_source",
    "partial_saves",
    "read_model",
    "read_params",
    "restore_latest",
    "save",
    "saving",
    "set_aside",
]
