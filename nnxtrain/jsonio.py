"""Writing JSON files atomically: a reader, or a crash, never sees a half-written file.

write_json("runs/a/run_info.json", {"step": 10})
"""

import json
import os
from typing import Any


def write_json(path: str, obj: Any) -> None:
    """Writes `obj` as indented JSON through a temporary file and a rename, so a reader
    (or a crash) never sees a half-written file. The temporary file is this process's
    own: processes that race to write one file each rename a whole one. Values JSON
    lacks are written as str()."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)
