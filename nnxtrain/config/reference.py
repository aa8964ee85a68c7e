"""The key tables of docs/config.md, written from the config schemas.

Each group's table lists every key with its default and its help: the one line, unit
included, that `setting(default, help)` in `nnxtrain.config.schema` attaches to the field.
`make docs` pastes the tables into docs/config.md; a test checks that the page holds them.
"""

import dataclasses
import typing

from nnxtrain.config.schema import GROUPS


def reference_tables() -> str:
    """The markdown tables of docs/config.md: every key, its default and its help."""
    out = []
    for group, cls in GROUPS.items():
        out += [f"## `{group}`", "", (cls.__doc__ or "").strip(), ""]
        out += ["| key | default | meaning |", "| --- | --- | --- |"]
        out += _rows(group, cls)
        out.append("")
    return "\n".join(out)


def _rows(prefix: str, cls: type) -> list[str]:
    """One row per key of `cls`; a nested section (model.lora) lists its own keys."""
    rows, hints = [], typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows += _rows(f"{prefix}.{f.name}", typing.cast(type, hints[f.name]))
            continue
        default = "{}" if f.default is dataclasses.MISSING else repr(f.default)
        default = repr(list(f.default)) if isinstance(f.default, tuple) else default
        rows.append(f"| `{prefix}.{f.name}` | `{default}` | {f.metadata['help']} |")
    return rows
