"""Checks of checkpoints: the checkpointer's options, and whether a checkpoint fits this run.

All fail with one line: a bad option, or a checkpoint directory that cannot be written,
names `callbacks.<name>.<option>`; a checkpoint that does not fit names the first
mismatching parameter and the config keys that differ between the checkpoint's config and
this run's.
"""

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax.traverse_util import flatten_dict

from nnxtrain.errors import ConfigError, PluginError, UserError, first_line


def _count(low: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


OPTIONS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "directory": (lambda v: v is None or isinstance(v, str), "a path or null"),
    "every": (_count(0), "an integer >= 0"),
    "keep": (_count(1), "an integer >= 1"),
    "keep_every": (_count(0), "an integer >= 0"),
    "if_busy": (lambda v: v in ("skip", "wait"), "skip or wait"),
    "load_from": (lambda v: v is None or isinstance(v, str), "a path or null"),
    "load_params_only": (lambda v: isinstance(v, bool), "true or false"),
    "fallback": (lambda v: isinstance(v, bool), "true or false"),
}


def check_options(key: str, options: Mapping[str, Any]) -> None:
    """A one-line ConfigError naming `<key>.<option>` for the first bad option."""
    for opt, (ok, what) in OPTIONS.items():
        if not ok(options[opt]):
            raise ConfigError(
                f"{key}.{opt}", f"must be {what}, got {options[opt]!r}", f"set it to {what}"
            )
    if options["load_params_only"]:  # replaced by run.init_from, which also takes the shape
        raise ConfigError(
            f"{key}.load_params_only",
            "is replaced by run.init_from (a run's parameters at step 0, a fresh optimizer)",
            f"drop {key}.load_params_only and {key}.load_from, set run.init_from=PATH",
        )


def check_directory(key: str, path: str) -> None:
    """A one-line ConfigError naming `key` unless `path` is, or can be made, a directory
    this process can write into: found at setup, not at the first save after training."""
    fix = "set it to a writable directory (created if missing), or null for <run.dir>/checkpoints"
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(key, f"{path} is a file, not a directory", fix)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):  # unnamed where the OS allows: leaves nothing
            pass
    except OSError as e:
        raise ConfigError(key, f"cannot write to {path} ({e.strerror})", fix) from e


def jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def plugin_states(callbacks: Any) -> dict[str, Any]:
    """Every callback's `state_dict()`, by name; one that JSON cannot hold is a PluginError
    naming the plugin (turning it into a string would restore something else)."""
    states = {}
    for cb in callbacks:
        state = cb.state_dict()
        try:
            json.dumps(state)
        except (TypeError, ValueError) as e:
            raise PluginError(
                f"callbacks.{cb.name}: state_dict() returned a value JSON cannot hold "
                f"({first_line(e)}). Fix: return only dicts with string keys, lists, "
                "strings, numbers, booleans and None."
            ) from e
        states[cb.name] = state
    return states


# Keys a resumed run may change without a note: where and how long it runs, what it logs.
BOOKKEEPING = {
    *("run.dir", "run.steps", "run.log_every", "run.eval_every", "run.eval_batches"),
    *("run.dry_run", "run.fail_fast", "run.compile_cache", "run.host_devices"),
    *("mesh.coordinator", "mesh.process_id", "mesh.init_timeout"),
}


def config_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: saved -> current' for every config key that differs, bookkeeping and
    callbacks aside; model and optim keys first (they decide the arrays' shapes)."""
    a, b = flatten_dict(saved, sep="."), flatten_dict(current, sep=".")
    keys = sorted(
        (k for k in a.keys() | b.keys() if k not in BOOKKEEPING and k.split(".")[0] != "callbacks"),
        key=lambda k: (not k.startswith(("model.", "optim.")), k),
    )
    return [
        f"{k}: {a.get(k, '<absent>')} -> {b.get(k, '<absent>')}"
        for k in keys
        if a.get(k, "<absent>") != b.get(k, "<absent>")
    ]


def _fmt(shape: Any, dtype: Any) -> str:
    return f"{tuple(shape)} {jax.numpy.dtype(dtype).name}"


def check_fits(
    path: str, saved: dict[str, Any], target: dict[str, Any], diff: list[str], prefix: str = ""
) -> None:
    """Raises a one-line UserError naming the first parameter that does not match."""
    problems = []
    for name, want in target.items():
        have = saved.get(name)
        if have is None:
            problems.append(f"{name} is missing from the checkpoint")
        elif tuple(have.shape) != tuple(want.shape) or have.dtype != want.dtype:
            problems.append(
                f"{name} is {_fmt(have.shape, have.dtype)} in the checkpoint "
                f"but {_fmt(want.shape, want.dtype)} in this run"
            )
    extra = [n for n in saved if n.startswith(prefix) and n not in target]
    problems += [f"{n} is in the checkpoint but not in this run" for n in extra]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        keys = "; ".join(diff[:6]) if diff else "none (did the model or optimizer code change?)"
        raise UserError(
            f"checkpoint {path} does not fit this run: {problems[0]}{more}. Config keys that "
            f"differ: {keys}. Fix: use the checkpoint's config, or a new run.dir"
        )
