"""`nnxtrain-plugins`: lists the callback plugins that can be switched on by short name.

    nnxtrain-plugins                  # every plugin registered in `nnxtrain.callbacks`
    nnxtrain-plugins early_stopping   # only these

For each short name registered through the `nnxtrain.callbacks` entry-point group (the
built-ins and those of installed packages) it prints the class path, the first line of
the class docstring, and the constructor's options with their types and defaults, which
are the keys accepted under `callbacks.<name>`, then how to switch it on, or, for a plugin
a plain `nnxtrain` runs already, the key it runs under (adding a second copy would clash
with the first). A plugin that cannot be imported is listed with the one-line reason, and
the command then exits with code 1.
"""

import inspect
import sys
from collections.abc import Mapping, Sequence

from nnxtrain.cli.bad_input import ArgumentParser, bad_input
from nnxtrain.config import compose
from nnxtrain.errors import PluginError
from nnxtrain.train.registry import ENTRY_POINT_GROUP, registered, resolve


def options(cls: type) -> list[str]:
    """`name: type = default` for each constructor parameter of `cls`."""
    lines = []
    for p in inspect.signature(cls).parameters.values():
        if p.kind is p.VAR_KEYWORD:
            lines.append(f"**{p.name} (any other key)")
            continue
        if p.kind is p.VAR_POSITIONAL:
            continue
        text = p.name
        if p.annotation is not p.empty:
            text += f": {inspect.formatannotation(p.annotation)}"
        text += " (required)" if p.default is p.empty else f" = {p.default!r}"
        lines.append(text)
    return lines


def summary(cls: type) -> str:
    """The first line of the class's own docstring ('' when it has none)."""
    doc = cls.__dict__.get("__doc__") or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def default_keys() -> dict[type, str]:
    """Plugin class -> its key in the callbacks a plain `nnxtrain` runs (the shipped
    config's defaults, `callbacks: default`)."""
    keys: dict[type, str] = {}
    for key, spec in compose([]).callbacks.items():
        if isinstance(spec, Mapping) and "_target_" in spec:
            try:
                keys.setdefault(resolve(str(spec["_target_"]), key), key)
            except PluginError:  # listed below with its own error, if registered
                continue
    return keys


def usage(name: str, cls: type, defaults: Mapping[type, str]) -> str:
    """How to switch the plugin on, or to change or drop it when it is on by default."""
    key = defaults.get(cls)
    if key is None:
        return f"use: +callbacks.{name}._target_={name}"
    key = f"callbacks.{key}"
    return f"on by default as {key} (set: {key}.OPTION=VALUE; off: ~{key})"


def describe(name: str, value: str, defaults: Mapping[type, str]) -> tuple[list[str], bool]:
    """Lines about one registered plugin, and whether it could be loaded."""
    lines = [f"{name}  ({value})"]
    try:
        cls = resolve(value, f"entry point {name!r}")
    except PluginError as e:  # resolve() wraps whatever the import raised
        lines.append(f"    cannot load: {e}")
        return lines, False
    lines.append(f"    {summary(cls) or '(no docstring)'}")
    opts = options(cls)
    lines += [f"    {o}" for o in opts] if opts else ["    (no options)"]
    lines.append(f"    {usage(name, cls, defaults)}")
    return lines, True


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    parser = ArgumentParser(
        prog="nnxtrain-plugins",
        description=f"List the callback plugins registered in the {ENTRY_POINT_GROUP!r} "
        "entry-point group, with their options.",
    )
    parser.add_argument("names", nargs="*", help="only these short names")
    args = parser.parse_args(argv)
    found = registered()
    unknown = [n for n in args.names if n not in found]
    if unknown:
        bad_input(
            parser.prog,
            f"not registered: {', '.join(unknown)}. Fix: give one of the registered names "
            f"({', '.join(sorted(found)) or 'none'}), or none to list them all",
        )
    ok, defaults = True, default_keys()
    for i, name in enumerate(sorted(args.names or found)):
        lines, loaded = describe(name, found[name], defaults)
        ok = ok and loaded
        print(("\n" if i else "") + "\n".join(lines))
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
