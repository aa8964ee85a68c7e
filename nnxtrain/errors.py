"""User-facing errors: bad input that the CLI reports as one line, with no traceback.

Raise `ConfigError` for a bad key or value and `UserError` for anything else a user can
fix (a file, a plugin, the run directory). `nnxtrain.cli.train` prints `str(error)` and exits
with code 2 (`EXIT_BAD_INPUT`; 4 for `LostProcessError`); code that catches an exception
from deeper down re-raises it as one of these with the key or file named, quoting the
cause with `first_line(e)`. `unknown_key` words a misspelt key with its closest match.

A plugin's own bug is a `PluginError` too (the run cannot go on, and the fix is in the
plugin or its options), but its traceback is what its author needs: `log_traceback`
appends it to `<run dir>/errors.log`, and the one line says where.
"""

import difflib
import os
import socket
import time
import traceback
from collections.abc import Sequence

EXIT_BAD_INPUT = 2
ERRORS_LOG = "errors.log"


class UserError(Exception):
    """An error the user can fix; its message is one line that says what and how."""


class ConfigError(UserError):
    """A bad config value: names the key, the problem and the fix."""

    def __init__(self, key: str, problem: str, fix: str):
        self.key, self.problem, self.fix = key, problem, fix
        super().__init__(f"{key}: {problem}. Fix: {fix}.")


class PluginError(UserError):
    """A callback plugin failed to load or raised inside a hook; names the plugin.

    `log` is the file that holds the traceback of the plugin's exception, once written."""

    log: str | None = None


class LostProcessError(UserError):
    """Processes of a multi-process run stopped answering (killed, crashed): names them."""

    def __init__(self, lost: list[int], num_processes: int, context: str):
        self.lost = lost
        s = "es" if len(lost) > 1 else ""
        super().__init__(
            f"lost process{s} {', '.join(map(str, lost))} of {num_processes} ({context}). "
            "Fix: see that process's output for why it ended, then rerun every process "
            "to resume from the last checkpoint."
        )


def first_line(e: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message`, cut to `limit` characters (just `Type` when the
    message is empty): a cause quoted inside a one-line error (library messages often run
    to many lines)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:limit]}" if lines else type(e).__name__


def check_int(key: str, value: object, low: float, fix: str, why: str = "") -> None:
    """Raises `ConfigError` naming `key` unless `value` is an int (not a bool) >= `low`
    (-inf: any int): for options a plugin takes from Python, where no schema typed them.
    `why` follows the bound in the message, e.g. " (steps count from 1)"."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= low:
        return
    bound = f" >= {low:g}" if low > float("-inf") else ""
    raise ConfigError(key, f"must be an integer{bound}{why}, got {value!r}", fix)


def unknown_key(key: str, known: Sequence[str], otherwise: str = "") -> ConfigError:
    """`key` is not one of `known` (the names beside it): suggests the closest name when
    one is close, else lists them all; `otherwise` adds a way out (such as `+key=...`)."""
    parent, _, name = key.rpartition(".")
    prefix = f"{parent}." if parent else ""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    if close:
        fix = f"use {prefix}{close[0]}, the closest key"
    elif known:
        fix = f"use one of {prefix}{{{', '.join(known)}}}"
    else:
        fix = ""
    return ConfigError(key, "no such key", ", or ".join(p for p in (fix, otherwise) if p))


def log_traceback(directory: str, error: BaseException, context: str) -> str | None:
    """Appends `error`'s full traceback to `<directory>/errors.log` under a header with the
    time, host, pid and `context`; returns the file's path, None if it cannot be written
    (the one-line error then quotes the exception alone)."""
    if not directory or not os.path.isdir(directory):
        return None
    path = os.path.join(os.path.abspath(directory), ERRORS_LOG)
    header = (
        f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} host {socket.gethostname()} "
        f"pid {os.getpid()}: {context}\n"
    )
    text = "".join(traceback.format_exception(error))
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(header + text + "\n")
    except OSError:
        return None
    return path
