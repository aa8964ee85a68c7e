"""Orbax plumbing for the checkpointer plugin: the layout on disk, names and restore checks.

A checkpoint directory holds one folder per saved step, written by an Orbax
`CheckpointManager` with two items:

    <directory>/<step>/state/   the TrainState's arrays (Orbax PyTree, OCDBT), one entry
                                per leaf named by its path: step, params/embed,
                                params/layers/attn/wq, opt_state/1/0/mu/embed, ...
    <directory>/<step>/meta/    JSON: format, step, rng seed, resolved config, every
                                callback's state_dict(), the dataset's state (or null)

Orbax writes a step to `<step>.orbax-checkpoint-tmp` and renames it only once every file
is written, so a folder with that suffix is a save that never finished (`partial_saves`).
Arrays are saved as nested dicts of plain names, not as the TrainState's pytree classes,
so a restore only needs the *current* abstract state: its structure and shardings decide
what is read and where it lands, which is how a checkpoint moves between meshes.
"""

import asyncio
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from nnxtrain import ConfigError, UserError

FORMAT = 1
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's marker of an unfinished save
# Test-only: seconds each background write sleeps before it completes (slow-save tests).
TEST_DELAY_ENV = "NNXTRAIN_CHECKPOINT_TEST_DELAY"


class Unreadable(UserError):
    """A checkpoint whose files cannot be read (truncated, deleted or garbled)."""


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
    if options["load_params_only"] and not options["load_from"]:
        raise ConfigError(
            f"{key}.load_params_only",
            f"needs {key}.load_from",
            f"set {key}.load_from=PATH (a run dir or its checkpoints dir)",
        )


def _key(k: Any) -> str:
    for attr in ("name", "key", "idx"):  # GetAttrKey, DictKey, SequenceKey/FlattenedIndexKey
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def leaf_names(tree: Any) -> tuple[list[str], list[Any], Any]:
    """(names, leaves, treedef); nnx.Variable's trailing `.value` is left out of names."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = []
    for path, _ in paths:
        keys = [_key(k) for k in path]
        if keys and keys[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey):
            keys.pop()
        names.append("/".join(keys))
    if len(set(names)) != len(names):
        raise RuntimeError(f"checkpoint: state leaves do not have unique names: {names}")
    return names, [leaf for _, leaf in paths], treedef


def nest(names: list[str], leaves: list[Any]) -> dict[str, Any]:
    """{'a/b': x} -> {'a': {'b': x}}: the plain tree Orbax stores."""
    out: dict[str, Any] = {}
    for name, leaf in zip(names, leaves, strict=True):
        *parents, last = name.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return out


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The inverse of `nest`."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def config_diff(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """'key: saved -> current' for every config key that differs (run.dir, callbacks aside)."""
    a, b = flatten(saved), flatten(current)
    keys = sorted(
        k for k in a.keys() | b.keys() if k != "run/dir" and not k.startswith("callbacks")
    )
    return [
        f"{k.replace('/', '.')}: {a.get(k, '<absent>')} -> {b.get(k, '<absent>')}"
        for k in keys
        if a.get(k, "<absent>") != b.get(k, "<absent>")
    ]


def partial_saves(directory: str) -> list[str]:
    """Names of unfinished saves (a process killed while writing) in `directory`."""
    if not os.path.isdir(directory):
        return []
    return sorted(n for n in os.listdir(directory) if TMP_SUFFIX in n)


class _SlowJson(ocp.handlers.JsonCheckpointHandler):
    """Test-only: the meta item's write finishes `delay` seconds late (see TEST_DELAY_ENV)."""

    def __init__(self, delay: float):
        super().__init__()
        self.delay = delay

    async def async_save(self, directory: Any, item: Any = None, args: Any = None) -> Any:
        futures = await super().async_save(directory, item, args) or []
        slow = ocp.future.CommitFutureAwaitingContractedSignals(asyncio.sleep(self.delay))
        return [*futures, slow]


def open_manager(
    directory: str,
    *,
    keep: int = 3,
    keep_every: int = 0,
    on_written: Callable[[], None] | None = None,
    read_only: bool = False,
) -> ocp.CheckpointManager:
    """An async CheckpointManager keeping the last `keep` steps and every `keep_every`-th."""
    keepers: list[Any] = [policies.LatestN(keep)]
    if keep_every:
        keepers.append(policies.EveryNSteps(keep_every))
    delay = float(os.environ.get(TEST_DELAY_ENV, "0") or 0)
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=True,
        preservation_policy=policies.AnyPreservationPolicy(keepers),
        cleanup_tmp_directories=not read_only,
        read_only=read_only,
        async_options=ocp.AsyncOptions(post_finalization_callback=on_written),
    )
    handlers = {
        "state": ocp.PyTreeCheckpointHandler(),
        "meta": _SlowJson(delay) if delay > 0 else ocp.JsonCheckpointHandler(),
    }
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def save_args(state: Any, meta: dict[str, Any]) -> ocp.args.Composite:
    names, leaves, _ = leaf_names(state)
    return ocp.args.Composite(
        state=ocp.args.PyTreeSave(nest(names, leaves)), meta=ocp.args.JsonSave(meta)
    )


def _fmt(shape: Any, dtype: Any) -> str:
    return f"{tuple(shape)} {jax.numpy.dtype(dtype).name}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def read_meta(mngr: ocp.CheckpointManager, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(meta JSON, {leaf name: array metadata}) of a step, or Unreadable."""
    path = os.path.join(str(mngr.directory), str(step))
    try:
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        saved = flatten(mngr.item_metadata(step)["state"].tree)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"meta/ is not an nnxtrain checkpoint of format {FORMAT}")
    except Exception as e:
        raise Unreadable(f"checkpoint {path} is unreadable ({_first_line(e)})") from e
    return meta, saved


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


def restore(
    mngr: ocp.CheckpointManager,
    step: int,
    abstract_state: Any,
    config: dict[str, Any],
    params_only: bool = False,
) -> tuple[Any, dict[str, Any], list[str]]:
    """(state, or params when params_only; meta; config differences) of checkpoint `step`.

    Arrays land with the shardings of `abstract_state` (the current mesh). Raises a
    UserError naming the parameter and config keys when the checkpoint does not fit, and
    Unreadable when its files are damaged.
    """
    path = os.path.join(str(mngr.directory), str(step))
    meta, saved = read_meta(mngr, step)
    diff = config_diff(meta.get("config", {}), config)
    tree, prefix = (abstract_state.params, "params/") if params_only else (abstract_state, "")
    names, leaves, treedef = leaf_names(tree)
    names = [prefix + n for n in names]
    check_fits(path, saved, dict(zip(names, leaves, strict=True)), diff, prefix)
    target = nest(names, leaves)
    args = ocp.args.PyTreeRestore(
        item=target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=params_only,
    )
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(state=args))["state"]
        flat = flatten(restored)
        state = jax.tree.unflatten(treedef, [flat[n] for n in names])
    except Exception as e:
        raise Unreadable(f"checkpoint {path} is unreadable ({_first_line(e)})") from e
    return state, meta, diff
