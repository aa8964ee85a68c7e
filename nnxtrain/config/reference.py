"""The key tables of docs/config.md, written from the config schemas.

Each group's table lists every key with its default and its help: the one line, unit
included, that `setting(default, help)` in `nnxtrain.config.schema` attaches to the field.
`make docs` pastes the tables into docs/config.md; a test checks that the page holds them.
"""

import dataclasses

from nnxtrain.config.schema import GROUPS


def reference_tables() -> str:
    """The markdown tables of docs/config.md: every key, its default and its help."""
    out = []
    for group, cls in GROUPS.items():
        out += [f"## `{group}`", "", (cls.__doc__ or "").strip(), ""]
        out += ["| key | default | meaning |", "| --- | --- | --- |"]
        for f in dataclasses.fields(cls):
            default = "{}" if f.default is dataclasses.MISSING else repr(f.default)
            out.append(f"| `{group}.{f.name}` | `{default}` | {f.metadata['help']} |")
        out.append("")
    return "\n".join(out)
