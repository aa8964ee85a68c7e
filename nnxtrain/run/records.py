"""JSON-lines record files in the run dir (metrics.jsonl, memstats.jsonl), kept true
across resumes.

A resumed run redoes the steps after its checkpoint, so a plugin that appends records
first cuts its file back to the restored step:

    drop_records_after(os.path.join(run_dir, "metrics.jsonl"), restored_step)

and a kill that tore the last line in half leaves no trace.
"""

import contextlib
import json
import math
import os


def drop_records_after(path: str, step: int) -> int:
    """Keeps the JSON lines of `path` up to `step` and returns how many it dropped.

    Dropped: every record whose `step` is later, every line that is not a JSON object with
    an integer `step` (the last line a kill tore mid-write), and for `step` 0 everything.
    The old file stays whole until the new one is: the kept lines go to a temporary file in
    the same directory, which is synced and then renamed over the old one. A file with
    nothing to drop is left untouched; a missing file is fine.
    """
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines(keepends=True)
    except FileNotFoundError:
        return 0
    kept = [line for line in lines if step > 0 and _step_of(line) <= step]
    if len(kept) == len(lines) and all(line.endswith(b"\n") for line in lines):
        return 0
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.writelines(line if line.endswith(b"\n") else line + b"\n" for line in kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    # The rename itself must survive a crash too: sync the directory that records it.
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(lines) - len(kept)


def _step_of(line: bytes) -> float:
    """The record's step; infinity (dropped on every resume) for a line that has none."""
    try:
        record = json.loads(line)
    except ValueError:  # a torn line: cut JSON or cut UTF-8
        return math.inf
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else math.inf
