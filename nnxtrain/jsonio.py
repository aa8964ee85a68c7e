"""The run's JSON: strict JSON, written whole, for every file a run writes.

    write_json("runs/a/run_info.json", {"step": 10})         # atomically
    f.write(json_line({"step": 3, "loss": float("nan")}))     # '{"step": 3, "loss": null}\n'

A number that is not finite (NaN, Infinity, -Infinity) is written as `null`: Python's
`json` would write the bare words `NaN` and `Infinity`, which are not JSON, and which
strict parsers (jq, JavaScript's JSON.parse, Go, serde) refuse. Values JSON lacks (a
numpy scalar is read as its number) are written as str().
"""

import json
import math
import os
from typing import Any


def strict(obj: Any) -> Any:
    """`obj` with every float that is not finite replaced by None, in nested dicts, lists
    and tuples too (a tuple becomes a list, as JSON writes it anyway)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict(v) for v in obj]
    return obj


def _other(obj: Any) -> Any:
    """A value JSON lacks: a numpy (or JAX) scalar as its Python number, else str()."""
    item = getattr(obj, "item", None)
    if callable(item) and getattr(obj, "shape", None) == ():
        return strict(item())
    return str(obj)


def dumps(obj: Any, **kwargs: Any) -> str:
    """`json.dumps` that writes strict JSON (non-finite numbers as null); never raises on a
    value JSON lacks."""
    return json.dumps(strict(obj), allow_nan=False, default=_other, **kwargs)


def json_line(record: Any) -> str:
    """One record of a JSON-lines file: strict JSON on one line, with its newline."""
    return dumps(record) + "\n"


def write_json(path: str, obj: Any) -> None:
    """Writes `obj` as indented strict JSON through a temporary file and a rename, so a
    reader (or a crash) never sees a half-written file. The temporary file is this
    process's own: processes that race to write one file each rename a whole one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(dumps(obj, indent=2))
    os.replace(tmp, path)
