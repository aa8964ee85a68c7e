"""The run directory's lock: one run at a time writes into a run dir.

    lock = RunLock()
    lock.take(run_dir, wait_s=300)   # UserError if another run holds it
    ...                              # write config.yaml, checkpoints, metrics ...
    lock.release()                   # also when the process dies, by the OS

The lock is `fcntl.flock` on `<run_dir>/.lock`, held through an open file: the kernel
drops it when the file is closed or the process ends in any way (a crash, SIGKILL), so
no stale lock is ever left behind, and nothing needs cleaning up. The file keeps the
holder's pid and host, which a refused run names in its one-line error. The file itself
stays (deleting it would let a third run lock a fresh file while a second one still
locks the deleted one).

The checkpointer locks its `directory` the same way wherever it lies (another run may
name a checkpoints/ dir under this run dir as its own), unless it is the run dir itself.
A flock belongs to one open file, not to a process: two Trainers in one process exclude
each other too. On NFS, Linux maps flock onto the server's byte-range locks; a
filesystem without locks is a one-line error.

In a multi-process run the processes share one run dir, so only process 0 takes the
lock, for the whole run; the others ask it, through JAX's coordination service (host-only
RPCs), whether it got it, and a refused run ends on every process with the same line. On
a filesystem shared by every host (what multi-host checkpoints need) process 0's lock
covers the run; where each host has its own local run.dir, only process 0's is locked.
"""

import fcntl
import itertools
import json
import os
import socket
import time
from typing import Any

import jax

from nnxtrain.errors import UserError, first_line

LOCK_FILE = ".lock"

# One key per lock taken in the coordination service's store: every process builds its
# trainers in the same order, so the numbers match across processes.
_TAKEN = itertools.count()


class RunLock:
    """An exclusive lock on a run directory, held from `take` until `release`."""

    def __init__(self) -> None:
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def take(self, run_dir: str, wait_s: float = 300.0, key: str = "run.dir") -> None:
        """Locks `run_dir` (process 0 of a multi-process run; the others wait up to
        `wait_s` for its answer); a UserError naming `key` and the holder if another run
        has it."""
        error = None
        if jax.process_index() == 0:
            try:
                self._fd = _lock(run_dir, key)
            except UserError as e:
                error = str(e)
        try:
            if jax.process_count() > 1:
                error = _agree(error, wait_s, key)
            if error is not None:
                raise UserError(error)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Unlocks (a no-op when not held); the file keeps no holder."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.ftruncate(fd, 0)
            finally:
                os.close(fd)  # closing the file drops the lock


def _lock(run_dir: str, key: str) -> int:
    path = os.path.join(run_dir, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(
            f"{key}: cannot write to {run_dir!r} ({e.strerror}). "
            f"Fix: set {key} to a writable directory."
        ) from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _holder(fd) if isinstance(e, BlockingIOError) else None
        os.close(fd)
        if holder is None:
            raise UserError(
                f"{key}: cannot lock {path} ({e.strerror}). Fix: put {key} on a "
                "filesystem that supports file locks."
            ) from e
        raise UserError(
            f"{key}: {run_dir} is in use by another run ({holder}). Fix: wait for that "
            f"run to end, or set {key} to another directory."
        ) from e
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    return fd


def _holder(fd: int) -> str:
    """'pid N on host H' from the lock file; its holder writes it just after locking, so
    an empty file is read again for a moment."""
    for _ in range(50):
        try:
            info: Any = json.loads(os.pread(fd, 4096, 0))
            return f"pid {info['pid']} on host {info['host']}"
        except (ValueError, KeyError, TypeError):
            time.sleep(0.02)
    return "pid unknown: its lock file holds no pid"


def _agree(error: str | None, wait_s: float, key: str) -> str | None:
    """Process 0's outcome (None: locked; else its error), on every process. They meet at
    a barrier after reading it, so that a refused process 0 exits only once all have it."""
    client: Any = jax._src.distributed.global_state.client  # no public handle (see preemption)
    key, ms = f"nnxtrain/run_dir_lock/{next(_TAKEN)}", int(wait_s * 1000)
    try:
        if jax.process_index() == 0:
            client.key_value_set(key, error or "locked")
        else:
            answer = str(client.blocking_key_value_get(key, ms))
            error = None if answer == "locked" else answer
        client.wait_at_barrier(f"{key}/read", ms)
    except Exception as e:
        raise UserError(
            f"{key}: the processes did not agree on its directory's lock within {wait_s:g} s "
            f"({first_line(e)}). Fix: see every process's output, then rerun every process."
        ) from e
    return error
