"""Finding and building callback plugins from config.

`callbacks.<name>` entries name a class by dotted path (`_target_: my_pkg.mod.Class`) or by
a short name that a package registered in the `nnxtrain.callbacks` entry-point group
(`_target_: metrics_logger`); the other keys are passed to the constructor, each first
checked against the type its parameter is annotated with (`check_options`). Entries are
built in config order, and each instance's `name` is its config key.
"""

import collections.abc
import inspect
import logging
import types
import typing
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

import hydra.utils

from nnxtrain.errors import ConfigError, PluginError, UserError, first_line
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
        check_options(cls, kwargs, key)
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


# What a config value of each annotated type may be: the types Hydra parses a value into.
# `float` takes an int too (`k=6`); a bool is never a number here, though Python's is.
_SCALARS: list[tuple[Any, tuple[type, ...], str]] = [
    (bool, (bool,), "true or false"),
    (int, (int,), "an integer"),
    (float, (int, float), "a number"),
    (str, (str,), "a string"),
    (type(None), (type(None),), "null"),
]
# Containers are checked as a whole, not their items.
_CONTAINERS: list[tuple[Any, type, str]] = [
    (list, collections.abc.Sequence, "a list"),
    (tuple, collections.abc.Sequence, "a list"),
    (collections.abc.Sequence, collections.abc.Sequence, "a list"),
    (dict, collections.abc.Mapping, "a mapping"),
    (collections.abc.Mapping, collections.abc.Mapping, "a mapping"),
]


def _expected(hint: Any) -> list[str] | None:
    """What a value of `hint` may be, in words (one entry per alternative); None for a hint
    this check does not know (Any, a class of the plugin's own): the value is not checked."""
    origin = typing.get_origin(hint) or hint
    if origin in (typing.Union, types.UnionType):
        alternatives = [_expected(arg) for arg in typing.get_args(hint)]
        if any(a is None for a in alternatives):
            return None
        return [word for a in alternatives if a is not None for word in a]
    if origin is typing.Literal:
        return [repr(arg) for arg in typing.get_args(hint)]
    for known, _, words in (*_SCALARS, *_CONTAINERS):
        if origin is known:
            return [words]
    return None


def _fits(value: Any, hint: Any) -> bool:
    """Whether `value` is of `hint`, a hint `_expected` knows."""
    origin = typing.get_origin(hint) or hint
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    if origin is typing.Literal:
        return any(value == arg and type(value) is type(arg) for arg in typing.get_args(hint))
    for known, accepted, _ in _SCALARS:
        if origin is known:
            return isinstance(value, accepted) and (known is bool or not isinstance(value, bool))
    container = next(accepted for known, accepted, _ in _CONTAINERS if origin is known)
    return isinstance(value, container) and not isinstance(value, str)


def check_options(cls: type[Callback], options: Mapping[str, Any], key: str) -> None:
    """Each option of `callbacks.<name>` (`key`) against the annotation of the constructor's
    parameter of that name: a value of another type is a one-line ConfigError naming the
    option, before the plugin ever sees it. Options without a parameter, parameters
    without an annotation, and annotations this check does not know (Any, a class) are
    left to the constructor; annotations that do not resolve leave the whole plugin to it."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # a forward reference to a name that is not there at run time
        return
    for name, value in options.items():
        hint = hints.get(name) if name != "return" else None
        expected = _expected(hint) if hint is not None else None
        if expected is None or _fits(value, hint):
            continue
        wanted = " or ".join(expected)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        quote = (
            f" (quote a number to keep it a string: '{key}.{name}=\"{value}\"')"
            if number and "a string" in expected
            else ""
        )
        raise ConfigError(
            f"{key}.{name}",
            f"{value!r} is not {wanted} ({cls.__name__}'s {name} is {_name(hint)})",
            f"give {key}.{name} {wanted}{quote}",
        )


def _name(hint: Any) -> str:
    """`int`, `str | None`: the annotation as it reads in the source."""
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("collections.abc.", "")
