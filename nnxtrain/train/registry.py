"""Finding and building callback plugins from config.

`callbacks.<name>` entries name a class by dotted path (`_target_: my_pkg.mod.Class`) or by
a short name that a package registered in the `nnxtrain.callbacks` entry-point group
(`_target_: metrics_logger`); the other keys are passed to the constructor. Entries are
built in config order, and each instance's `name` is its config key.
"""

import inspect
import logging
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

import hydra.utils

from nnxtrain.errors import PluginError, UserError, first_line
from nnxtrain.train.events import Callback

ENTRY_POINT_GROUP = "nnxtrain.callbacks"


def registered() -> dict[str, str]:
    """Short name -> 'module:attr' for every plugin registered through entry points.

    Two installed packages registering one name for different classes is an error: the
    winner would otherwise depend on installation order.
    """
    found: dict[str, str] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if found.get(ep.name, ep.value) != ep.value:
            raise PluginError(
                f"plugin short name {ep.name!r} is registered twice ({found[ep.name]} and "
                f"{ep.value}). Fix: uninstall one package or use a dotted _target_ path."
            )
        found[ep.name] = ep.value
    return found


def resolve(target: str, key: str) -> type:
    """The class a `_target_` names, or a one-line PluginError naming the key."""
    if "." not in target and ":" not in target:
        found = registered()
        if target not in found:
            raise PluginError(
                f"{key}: no plugin registered as {target!r} (known: "
                f"{', '.join(sorted(found)) or 'none'}). Fix: use a dotted path "
                f"pkg.module.Class or install the package that provides it."
            )
        target = found[target]
    try:
        obj = _locate(target.replace(":", "."))
    except Exception as e:  # whatever the module raised while importing
        raise PluginError(
            f"{key}: cannot import {target!r} ({first_line(e.__cause__ or e)}). "
            "Fix: check the dotted path and that its package is installed."
        ) from e
    if not (inspect.isclass(obj) and issubclass(obj, Callback)):
        raise PluginError(
            f"{key}: {target!r} is not a subclass of nnxtrain.Callback. "
            "Fix: point _target_ at a Callback class."
        )
    return obj


def _locate(path: str) -> Any:
    """The object at dotted `path` (Hydra's resolver); its failure is raised, not logged."""
    logger = logging.getLogger(hydra.utils.__name__)
    quiet, logger.disabled = logger.disabled, True  # the caller's one-line error says it
    try:
        return hydra.utils.get_object(path)
    finally:
        logger.disabled = quiet


def build_callbacks(entries: Mapping[str, Any]) -> list[Callback]:
    """Instantiates `callbacks.<name>` entries in order; a null entry is skipped."""
    callbacks = []
    for name, spec in entries.items():
        if spec is None:
            continue
        key = f"callbacks.{name}"
        if not isinstance(spec, Mapping) or "_target_" not in spec:
            raise PluginError(
                f"{key}: needs a _target_ (a dotted class path or registered "
                f"name). Fix: +{key}._target_=pkg.module.Class"
            )
        cls = resolve(str(spec["_target_"]), f"{key}._target_")
        kwargs = {k: v for k, v in spec.items() if k != "_target_"}
        try:
            callback = cls(**kwargs)
        except UserError:
            raise
        except Exception as e:  # TypeError for unknown keys, ValueError from its own checks
            raise PluginError(
                f"{key}: {cls.__name__} refused its options ({first_line(e)}). "
                f"Fix: check the keys under {key}."
            ) from e
        callback.name = name
        callbacks.append(callback)
    return callbacks
