"""User-facing errors: bad input that the CLI reports as one line, with no traceback.

Raise `ConfigError` for a bad key or value and `UserError` for anything else a user can
fix (a file, a plugin, the run directory). `nnxtrain.cli` prints `str(error)` and exits
with code 2 (4 for `LostProcessError`); code that catches an exception from deeper down
re-raises it as one of these with the key or file named, quoting the cause with
`first_line(e)`.
"""


class UserError(Exception):
    """An error the user can fix; its message is one line that says what and how."""


class ConfigError(UserError):
    """A bad config value: names the key, the problem and the fix."""

    def __init__(self, key: str, problem: str, fix: str):
        self.key, self.problem, self.fix = key, problem, fix
        super().__init__(f"{key}: {problem}. Fix: {fix}.")


class PluginError(UserError):
    """A callback plugin failed to load or raised inside a hook; names the plugin."""


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
