"""The command line, checked: bad flags and overrides, and Hydra's own errors, in one line.

    check_command_line(sys.argv[1:])    # before Hydra runs: raises ConfigError / UserError
    explain(error)                      # what Hydra raised -> UserError; None: not bad input

Hydra reports a bad command line in several lines (its message and a hint to set
HYDRA_FULL_ERROR, or a traceback) and exits 1, where the README promises one line naming
the key and exit code 2. `check_command_line` catches what it can before Hydra composes:
flags placed after the overrides, an override it cannot parse, an unknown group option,
an unknown key of a group's schema, a value of the wrong type. What only composition
finds (a key of a callback, `hydra.*` keys, deletions, `--config-path`, interpolations, an
output directory that cannot be created) reaches `explain` from the CLI, which has Hydra
raise its errors instead of printing them.
"""

import dataclasses
import re
import typing
from importlib import resources
from typing import Any

from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    ConfigTypeError,
    OmegaConfBaseException,
    ValidationError,
)

from nnxtrain.config import GROUPS
from nnxtrain.errors import ConfigError, UserError, first_line, unknown_key

SELECTABLE = (*GROUPS, "callbacks", "experiment", "hparams_search")
GRAMMAR = "https://hydra.cc/docs/advanced/override_grammar/basic/"
# Lines of Hydra's and OmegaConf's messages that only repeat what the one line says.
_NOISE = ("full_key:", "reference_type=", "object_type=", "See https://", "Config search path")


class _Refused(Exception):
    """argparse's complaint, raised instead of printed with the usage."""


def check_command_line(args: list[str]) -> None:
    """Fails in one line on flags Hydra's parser refuses, then checks the overrides."""
    parser = get_args_parser()

    def refuse(message: str) -> typing.NoReturn:
        raise _Refused(message)

    parser.error = refuse  # type: ignore[method-assign]
    try:
        overrides = parser.parse_args(args).overrides
    except _Refused as e:
        try:
            parser.parse_intermixed_args(args)
            fix = "put Hydra's flags (-m, --cfg, --config-path, ...) before the overrides"
        except _Refused:
            fix = "see nnxtrain --help"
        raise UserError(f"command line: {e}. Fix: {fix}.") from None
    check_overrides(overrides)


def _options(group: str) -> list[str]:
    folder = resources.files("nnxtrain.conf").joinpath(group)
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def check_overrides(overrides: list[str]) -> None:
    """Fails in one line on an override that does not parse, an unknown group option, or
    an unknown key of a group schema."""
    parser, parsed = OverridesParser.create(), []
    for arg in overrides:
        try:
            parsed.extend(parser.parse_overrides([arg]))
        except OverrideParseException as e:
            key = arg.partition("=")[0].lstrip("+~") or arg
            raise ConfigError(
                key,
                f"cannot parse {arg!r} ({first_line(e)})",
                f"quote a value with special characters, e.g. '{key}=\"...\"' (grammar: {GRAMMAR})",
            ) from None
    for o in parsed:
        key = o.key_or_group
        if key.startswith("hydra") or o.is_delete():
            continue
        if key in SELECTABLE and "." not in key:
            options = _options(key)
            values = (
                list(o.sweep_string_iterator())
                if o.is_sweep_override()
                else [o.get_value_element_as_str()]
            )
            for value in values:
                if value not in options:
                    raise ConfigError(
                        key,
                        f"unknown {key} {value!r} (available: {', '.join(options)})",
                        f"use {key}=<one of those>",
                    )
            continue
        group, _, rest = key.partition(".")
        if group in GROUPS and rest and not o.is_add():
            field = rest.split(".")[0]
            names = [f.name for f in dataclasses.fields(GROUPS[group])]
            if field not in names:
                raise unknown_key(f"{group}.{field}", names)
            if rest == field:
                _check_type(group, field, key, o)
        elif group not in (*SELECTABLE, "") and not o.is_add():
            raise ConfigError(
                key,
                "no such config group",
                f"top-level keys are {', '.join(SELECTABLE)}; prefix new keys with +",
            )


def _check_type(group: str, field: str, key: str, override: Any) -> None:
    """A value of the wrong type (`run.steps=abc`, `run.log_every=2.5`) fails in one line
    here; Hydra would stop composing with a multi-line report and exit 1."""
    try:
        values = (
            list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
        )
    except Exception:  # a sweep that is not a list of values (an interval): Hydra checks it
        return
    node = OmegaConf.structured(GROUPS[group])
    OmegaConf.set_readonly(node, False)
    for value in values:
        try:
            node[field] = value
        except ValidationError as e:
            expected = typing.get_type_hints(GROUPS[group])[field]
            raise ConfigError(
                key,
                first_line(e).removeprefix("ValidationError: "),
                f"give {key} a value of type {getattr(expected, '__name__', expected)}",
            ) from e


def explain(error: Exception, multirun: bool = False) -> UserError | None:
    """The one-line error for what Hydra raised while it read the command line, composed
    the config or prepared the output directory; None for anything else (a bug)."""
    cause = error.__cause__
    if isinstance(error, MissingConfigException):
        options = f" (available: {', '.join(error.options)})" if error.options else ""
        return UserError(
            f"{_compact(error).split(' Available options')[0]}{options}. Fix: check the "
            "option's spelling, --config-name and --config-path (nnxtrain --info searchpath)."
        )
    key = str(getattr(cause, "full_key", None) or "")  # the key OmegaConf refused
    if isinstance(cause, ConfigAttributeError | ConfigKeyError) and key:
        return _unknown(key, cause, str(error))
    if isinstance(cause, ConfigTypeError) and key and "deletion" in str(cause):
        return ConfigError(
            key,
            "cannot be deleted: every key of a schema has a value",
            f"set it instead ({key}=VALUE)",
        )
    if isinstance(cause, ValidationError) and key:
        return ConfigError(key, _compact(cause), f"give {key} a value of its type")
    key = str(getattr(error, "full_key", None) or "")
    if isinstance(error, OmegaConfBaseException) and key:
        return ConfigError(key, _compact(error), "correct the value or its ${...} interpolation")
    if isinstance(error, HydraException | OmegaConfBaseException):
        reason = _compact(error) + (f" ({_compact(cause)})" if cause else "")
        return UserError(f"hydra: {reason}. Fix: correct the command line ({GRAMMAR}).")
    if isinstance(error, OSError) and error.filename:
        key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
        return ConfigError(
            key,
            f"cannot create {error.filename} ({error.strerror})",
            f"set {key} to a writable directory",
        )
    return None


def _unknown(key: str, cause: OmegaConfBaseException, message: str) -> ConfigError:
    """An override of `key`, which the composed config does not have; `message` is
    Hydra's (it names the `+key=value` that would add it)."""
    parent = getattr(cause, "parent_node", None)
    known = [str(k) for k in parent] if parent is not None else []
    owner = key.rpartition(".")[0]
    if owner == "callbacks":
        return ConfigError(
            key,
            f"no such callback (this run has {', '.join(known) or 'none'})",
            f"add one with +{key}._target_=pkg.module.Class",
        )
    if owner in GROUPS or owner.startswith("hydra"):
        return unknown_key(key, known)  # a schema: a new key would be refused anyway
    append = re.search(r"use (\+\S+)", message)
    return unknown_key(key, known, f"add it with {append[1] if append else f'+{key}=VALUE'}")


def _compact(e: BaseException) -> str:
    """A multi-line library message on one line, without the lines that repeat the key."""
    lines = (line.strip() for line in str(e).splitlines())
    return " ".join(line for line in lines if line and not line.startswith(_NOISE)).rstrip(".")
