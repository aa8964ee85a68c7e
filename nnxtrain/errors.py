"""User-facing errors: bad input that the CLI reports as one line, with no traceback.

Raise `ConfigError` for a bad key or value and `UserError` for anything else a user can
fix (a file, a plugin, the run directory). `nnxtrain.cli` prints `str(error)` and exits
with code 2; code that catches an exception from deeper down re-raises it as one of these
with the key or file named, quoting the cause with `first_line(e)`.
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


def first_line(e: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message`, cut to `limit` characters (just `Type` when the
    message is empty): a cause quoted inside a one-line error (library messages often run
    to many lines)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:limit]}" if lines else type(e).__name__
