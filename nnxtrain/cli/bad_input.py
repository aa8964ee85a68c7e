"""How every command reports bad input: one line, `PROG: error: MESSAGE`, on stderr, and
exit code 2 (`EXIT_BAD_INPUT`). `bad_input` prints a `UserError` (whose message already
names the key or file and the fix) that way; `ArgumentParser` does the same for what
argparse refuses (an unknown option, a value of the wrong type or out of its choices),
where argparse would print its usage first, on a second line.
"""

import argparse
import sys
from typing import NoReturn

from nnxtrain.errors import EXIT_BAD_INPUT


def bad_input(prog: str, error: Exception | str) -> NoReturn:
    """Prints `PROG: error: ERROR` as one line on stderr and exits with EXIT_BAD_INPUT."""
    # A message quoting a library's error may hold newlines; the line must stay one.
    message = " ".join(str(error).split("\n"))
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose errors are `bad_input`'s one line, pointing at --help."""

    def error(self, message: str) -> NoReturn:
        fix = "" if "Fix:" in message else f". Fix: see {self.prog} --help"
        bad_input(self.prog, message + fix)
