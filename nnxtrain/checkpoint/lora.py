"""What a LoRA run's checkpoint holds: the adapters (and whatever else trains), their
optimizer state and the data position; never the frozen base, which it names instead.

A run with `model.lora.rank > 0` saves the TrainState less its frozen parameters. The
meta JSON's `lora_base` records the base they belong to: `run.init_from`'s path (empty for
a base initialised from `run.seed`) and the digest of its arrays as the run held them.
A restore reads the adapters and leaves the base's leaves abstract; the Trainer fills them
in (`run.init_from` again) and `check_base` refuses a checkpoint trained on another base.
"""

import hashlib
import json
import os
from typing import Any

import jax
from flax import nnx

from nnxtrain.checkpoint import digest
from nnxtrain.config import LoraConfig, ModelConfig, from_dict
from nnxtrain.errors import UserError
from nnxtrain.model import trainable


def lora_of(config: dict[str, Any]) -> LoraConfig | None:
    """The run's `model.lora` (a jsonable config), or None without LoRA."""
    section = (config.get("model") or {}).get("lora") or {}
    lora = from_dict(LoraConfig, dict(section), "model.lora.") if section else None
    return lora if lora is not None and lora.rank > 0 else None


def split_base(params: Any, config: dict[str, Any]) -> tuple[Any, Any]:
    """(what the checkpoint keeps, the frozen base or None) of a state's `params`."""
    lora = lora_of(config)
    if lora is None or not isinstance(params, nnx.State):  # a pure dict names what it wants
        return params, None
    keep, base = nnx.split_state(params, trainable(ModelConfig(lora=lora)), ...)
    return keep, base


def base_identity(base: Any, config: dict[str, Any]) -> dict[str, Any]:
    """meta's `lora_base`: the base's path (or seed) and one digest over its arrays."""
    paths, _ = jax.tree_util.tree_flatten_with_path(base)
    names = [jax.tree_util.keystr(path) for path, _ in paths]
    rows = dict(zip(names, digest.digests([leaf for _, leaf in paths]), strict=True))
    text = json.dumps(rows, sort_keys=True).encode()
    run = config.get("run") or {}
    init_from = str(run.get("init_from") or "")
    return {
        "init_from": os.path.abspath(init_from) if init_from else "",
        "seed": run.get("seed"),
        "digest": hashlib.sha256(text).hexdigest()[:16],
    }


def check_base(
    recorded: dict[str, Any] | None, where: str, params: Any, config: dict[str, Any]
) -> None:
    """A one-line UserError when `params`' base is not the one the adapters of checkpoint
    `where` were trained on (`recorded`: its meta's `lora_base`)."""
    if recorded is None:
        return
    _, base = split_base(params, config)
    if base is None:
        return
    now = base_identity(base, config)
    if now["digest"] == recorded.get("digest"):
        return
    theirs = recorded.get("init_from") or f"a random base (run.seed={recorded.get('seed')})"
    ours = now["init_from"] or f"a random base (run.seed={now['seed']})"
    raise UserError(
        f"checkpoint {where} holds LoRA adapters for another base: they were trained on "
        f"{theirs} (digest {recorded.get('digest')}), this run's base is {ours} (digest "
        f"{now['digest']}). Fix: set run.init_from to the base they were trained on, or "
        "start a new run.dir"
    )
