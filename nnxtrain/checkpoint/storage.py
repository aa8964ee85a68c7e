"""The checkpoint format on disk, and saving and restoring it with Orbax.

A checkpoint directory holds one folder per saved step, written by an Orbax
`CheckpointManager` with two items:

    <directory>/<step>/state/   the TrainState's arrays (Orbax PyTree, OCDBT), one entry
                                per leaf named by its path: step, params/embed,
                                params/layers/attn/wq, opt_state/1/0/mu/embed, ...
    <directory>/<step>/meta/    JSON: format, step, rng seed, resolved config, every
                                callback's state_dict(), the dataset's state (or null),
                                each array's digests and the JSON's own CRC32

Orbax writes a step to `<step>.orbax-checkpoint-tmp` and renames it only once every file
is written, so a folder with that suffix is a save that never finished (`partial_saves`).
Steps set aside are renamed out of Orbax's sight: `<step>.unreadable-<time>` (`set_aside`)
and `<directory>/diverged/<step>` (`move_aside`, after a divergence).
Arrays are saved as nested dicts of plain names, not as the TrainState's pytree classes,
so a restore only needs the *current* abstract state: its structure and shardings decide
what is read and where it lands, which is how a checkpoint moves between meshes. A
restore recomputes the digests of what it read (`checkpoint_digest`): a mismatch, like a
file Orbax cannot read, makes the checkpoint `Unreadable`.
"""

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Collection, Iterator
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from nnxtrain.checkpoint import digest
from nnxtrain.checkpoint.checks import check_fits, config_diff, jsonable, plugin_states
from nnxtrain.checkpoint.lora import base_identity, split_base
from nnxtrain.errors import UserError, first_line

FORMAT = 1
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's marker of an unfinished save


class _NoWaitWarning(logging.Filter):
    """Orbax warns when a save waited for the previous one; the plugin's own line says so."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Waiting for previous save to complete")


class Unreadable(UserError):
    """A checkpoint whose files cannot be read (truncated, deleted or garbled)."""


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


def partial_saves(directory: str) -> list[str]:
    """Names of unfinished saves (a process killed while writing) in `directory`."""
    if not os.path.isdir(directory):
        return []
    return sorted(n for n in os.listdir(directory) if TMP_SUFFIX in n)


class _KeepAlso(policies.PreservationPolicy):
    """Keeps the steps a callable names at the moment Orbax collects old ones (during
    `save`, on the caller's thread), so the caller can change them between saves."""

    def __init__(self, steps: Callable[[], Collection[int]]):
        self.steps = steps

    def should_preserve(self, checkpoints: Any, *, context: Any) -> list[bool]:
        keep = set(self.steps())
        return [c.step in keep for c in checkpoints]


def open_manager(
    directory: str,
    *,
    keep: int = 3,
    keep_every: int = 0,
    keep_also: Callable[[], Collection[int]] | None = None,
    on_written: Callable[[], None] | None = None,
    read_only: bool = False,
) -> ocp.CheckpointManager:
    """An async CheckpointManager keeping the last `keep` steps, every `keep_every`-th, and
    the steps `keep_also()` names when a save collects old ones."""
    keepers: list[Any] = [policies.LatestN(keep)]
    if keep_every:
        keepers.append(policies.EveryNSteps(keep_every))
    if keep_also is not None:
        keepers.append(_KeepAlso(keep_also))
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=True,
        preservation_policy=policies.AnyPreservationPolicy(keepers),
        cleanup_tmp_directories=not read_only,
        read_only=read_only,
        async_options=ocp.AsyncOptions(post_finalization_callback=on_written),
    )
    handlers = {"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def open_source(path: str) -> tuple[ocp.CheckpointManager, list[int]]:
    """A read-only manager for `load_from` and its complete steps to choose from (just
    one for a step's dir; none if there is no complete checkpoint): `path` is a run dir,
    its checkpoints/ dir, or one step's dir (checkpoints/<step>)."""
    path, step = os.path.abspath(path), None
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    elif os.path.basename(path).isdigit() and os.path.isdir(os.path.join(path, "meta")):
        path, step = os.path.dirname(path), int(os.path.basename(path))
    mngr = open_manager(path, read_only=True)
    steps = list(mngr.all_steps())
    return mngr, steps if step is None else [s for s in steps if s == step]


def set_aside(mngr: ocp.CheckpointManager, steps: list[int]) -> list[str]:
    """Renames unreadable steps to `<step>.unreadable-<time>` (kept for inspection, out of
    the way of new saves of those steps); returns the new names."""
    names = [f"{s}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}" for s in steps]
    if jax.process_index() == 0:
        for step, name in zip(steps, names, strict=True):
            os.rename(
                os.path.join(str(mngr.directory), str(step)),
                os.path.join(str(mngr.directory), name),
            )
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("nnxtrain checkpoint set_aside")
    mngr.reload()
    return names


def move_aside(mngr: ocp.CheckpointManager, steps: list[int], folder: str) -> list[str]:
    """Moves complete steps into `<directory>/<folder>/<step>` (a name already taken there
    gets `.<time>` added), out of Orbax's step listing but kept whole: `load_from` reads
    them from there. Waits for the writes in flight first; returns the new paths."""
    mngr.wait_until_finished()  # a step being written, or old ones being collected
    root = os.path.join(str(mngr.directory), folder)
    paths = []
    for step in steps:
        path = os.path.join(root, str(step))
        if os.path.exists(path):
            path += f".{time.strftime('%Y%m%d-%H%M%S')}"
        paths.append(path)
    if jax.process_index() == 0:
        os.makedirs(root, exist_ok=True)
        for step, path in zip(steps, paths, strict=True):
            os.rename(os.path.join(str(mngr.directory), str(step)), path)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("nnxtrain checkpoint move_aside")
    mngr.reload()  # Orbax's cached step list: the moved steps are no longer its own
    return paths


def saving(mngr: ocp.CheckpointManager) -> bool:
    """Whether a write is still running; the same answer on every process."""
    busy = bool(mngr.is_saving_in_progress())
    if jax.process_count() > 1:  # processes must agree on skipping, or saves deadlock
        busy = bool(multihost_utils.broadcast_one_to_all(busy))
    return busy


def make_meta(
    step: int, seed: int, config: dict[str, Any], callbacks: Any, dataset: Any
) -> dict[str, Any]:
    """The meta JSON of a save (before its digests): the format, the step, the run's seed
    and config (`jsonable`), every callback's state_dict() by name, and the dataset's
    state_dict() (None for a dataset without one)."""
    state_dict = getattr(dataset, "state_dict", None)
    meta = {
        "format": FORMAT,
        "step": step,
        "rng": {"seed": seed},
        "config": config,
        "callbacks": plugin_states(callbacks),
        "dataset": state_dict() if state_dict is not None else None,
    }
    return jsonable(meta)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Starts the background write of `step`: the state's arrays, as the plain tree of
    their names, and the meta JSON sealed with their digests (computed on the device;
    the save waits for them, as Orbax's copy of the arrays to the host does anyway)."""
    keep, base = split_base(getattr(state, "params", None), meta.get("config") or {})
    if base is not None:  # LoRA: the adapters, and the base named, not saved
        meta = {**meta, "lora_base": base_identity(base, meta["config"])}
        state = {"step": state.step, "params": keep, "opt_state": state.opt_state}
    names, leaves, _ = leaf_names(state)
    tree = unflatten_dict(dict(zip(names, leaves, strict=True)), sep="/")
    meta = digest.seal(meta, dict(zip(names, digest.digests(leaves), strict=True)))
    args = ocp.args.Composite(state=ocp.args.PyTreeSave(tree), meta=ocp.args.JsonSave(meta))
    absl, no_wait = logging.getLogger("absl"), _NoWaitWarning()
    absl.addFilter(no_wait)  # Orbax logs the wait inside save(), on this thread
    try:
        mngr.save(step, args=args, force=True)
    finally:
        absl.removeFilter(no_wait)


@contextlib.contextmanager
def quiet_leftover_reads() -> Iterator[None]:
    """Around a restore: drops the 'Event loop is closed' reports of reads it leaves
    running if it fails; any other report passes.

    Orbax closes its event loop on a restore's first error, and the reads it had started
    report from their own threads as they finish: from that moment on, and also after the
    restore has returned (within milliseconds), with nothing to wait on. So the filter
    goes on before the restore and comes off after one that succeeds; after one that
    fails it stays on.
    """
    previous = sys.unraisablehook

    def hook(report: Any) -> None:
        if not (report.exc_type is RuntimeError and "loop is closed" in str(report.exc_value)):
            previous(report)

    sys.unraisablehook = hook
    yield  # an error leaves from here, and the filter on for the reads it left running
    sys.unraisablehook = previous


def read_meta(mngr: ocp.CheckpointManager, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(meta JSON, {leaf name: array metadata}) of a step, or Unreadable."""
    path = os.path.join(str(mngr.directory), str(step))
    try:
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        saved = flatten_dict(mngr.item_metadata(step)["state"].tree, sep="/")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"meta/ is not an nnxtrain checkpoint of format {FORMAT}")
        digest.check_meta(meta)
        if meta.get("step") != step:
            raise ValueError(f"meta/ holds step {meta.get('step')} (a renamed step folder?)")
    except Exception as e:
        raise Unreadable(f"checkpoint {path} is unreadable ({first_line(e)})") from e
    return meta, saved


def restore(
    mngr: ocp.CheckpointManager,
    step: int,
    abstract_state: Any,
    config: dict[str, Any],
    params_only: bool = False,
    *,
    warn: Callable[[str], None],
) -> tuple[Any, dict[str, Any], list[str]]:
    """(state, or params when params_only; meta; config differences) of checkpoint `step`.

    Arrays land with the shardings of `abstract_state` (the current mesh). Raises a
    UserError naming the parameter and config keys when the checkpoint does not fit, and
    Unreadable when its files are damaged or what was read differs from its digests.
    """
    path = os.path.join(str(mngr.directory), str(step))
    meta, saved = read_meta(mngr, step)
    diff = config_diff(meta.get("config", {}), config)
    tree, prefix = (abstract_state.params, "params/") if params_only else (abstract_state, "")
    names, leaves, treedef = leaf_names(tree)
    names = [prefix + n for n in names]
    _, base = split_base(getattr(abstract_state, "params", None), config)
    frozen = {"params/" + n for n in leaf_names(base)[0]} if base is not None else set()
    wanted = {n: leaf for n, leaf in zip(names, leaves, strict=True) if n not in frozen}
    check_fits(path, saved, wanted, diff, prefix)
    target = unflatten_dict(wanted, sep="/")
    args = ocp.args.PyTreeRestore(
        item=target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=params_only,
    )
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(state=args))["state"]
        flat = flatten_dict(restored, sep="/")
        # a LoRA checkpoint's base stays abstract: the Trainer fills it in
        state = jax.tree.unflatten(
            treedef, [flat.get(n, leaf) for n, leaf in zip(names, leaves, strict=True)]
        )
    except Exception as e:
        raise Unreadable(f"checkpoint {path} is unreadable ({first_line(e)})") from e
    if "digests" not in meta:
        warn(f"checkpoint {path} has no digests (saved by an older nnxtrain): not verified")
        return state, meta, diff
    kept = [n for n in names if n in flat]
    bad = digest.mismatches(meta, kept, [flat[n] for n in kept])
    if bad:
        what = (
            f"{bad[0]} and {len(bad) - 1} more arrays differ from the digests saved with them"
            if bad[1:]
            else f"{bad[0]} differs from the digest saved with it"
        )
        raise Unreadable(f"checkpoint {path} is unreadable (corrupt data: {what})")
    return state, meta, diff


def restore_latest(
    mngr: ocp.CheckpointManager,
    steps: Any,
    abstract_state: Any,
    config: dict[str, Any],
    *,
    fallback: bool,
    key: str,
    warn: Callable[[str], None],
) -> tuple[int, Any, dict[str, Any], list[str]]:
    """`restore` of the latest of `steps`; with `fallback`, steps back past unreadable
    ones with a warning, else the error points to the option `key`."""
    steps = sorted(steps, reverse=True)
    for i, step in enumerate(steps):
        try:
            with quiet_leftover_reads():
                return (step, *restore(mngr, step, abstract_state, config, warn=warn))
        except Unreadable as e:
            if not fallback or i + 1 == len(steps):
                hint = "" if fallback else f"; set {key}=true to restore the previous one"
                raise Unreadable(f"{e}{hint}") from e
            warn(f"{e}; falling back to step {steps[i + 1]}")
    raise AssertionError("no steps to restore")
