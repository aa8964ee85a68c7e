"""The jinja2 sandbox chat templates render in, bounded in time and in the size of what they
build: a template comes with a downloaded tokenizer, and is untrusted code.

    env = BoundedSandbox(trim_blocks=True, ...)     # an ImmutableSandboxedEnvironment
    env.seal()                                      # once its filters are in place
    template = env.compile_bounded(source)          # TemplateLimitError: over a limit
    text = env.render_bounded(template, budget, messages=...)   # budget: characters

jinja2's sandbox keeps a template from reaching Python (no attribute of `_` names, no
mutation, `range` capped at 100,000 items), but not from asking for more than the machine
has: `'x' * 2000000000` allocates 2 GB (and the Rust tokenizer then aborts on it), nested
ranges loop for hours. Here:

- Size: no value a render makes may hold more than `budget` characters (the expanded size
  of a string, or of a list or dict as text: what printing it would write). Operations
  that could build a large value from small ones are checked before they run (`*` and
  `**`, `%` and str.format with their widths, str.replace/join/center/expandtabs..., the
  filters center/indent/wordwrap/replace/join/format/batch/slice; tojson is written piece
  by piece), everything a
  call, filter or operator returns after, and so are `~`, `{{ }}` output and a block's
  joined text; the whole output is capped at `budget` too. `lipsum` is left out.
- Time: a render (and a compile: jinja2 folds constant expressions then) that runs past
  `seconds` is interrupted: one watchdog thread raises in the rendering thread, between two
  bytecodes (CPython's PyThreadState_SetAsyncExc), so any pure-Python loop stops; a single
  C call finishes first, which the size checks keep short. It works in any thread.

Either limit raises `TemplateLimitError` (its message says which); the caller names the
template and the record.
"""

import ctypes
import gc
import json
import re
import threading
import time
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

SECONDS = 10.0  # a render or compile longer than this is stopped (real templates take ms)
MIN_BUDGET = 1_000_000  # characters a value or output may always hold
INT_BITS = 1 << 16  # the largest integer a template may build (about 20,000 digits)
_DIGITS = re.compile(r"\d+")
T = TypeVar("T")


class TemplateLimitError(Exception):
    """A template went over its time or size limit."""


class _Timeout(BaseException):  # a BaseException: no `except Exception` on the way stops it
    pass


# -- sizes -------------------------------------------------------------------------------


def size(value: Any, budget: int) -> int:
    """An upper bound of the characters `value` prints as (str, or JSON), counting a shared
    item every time it appears; stops counting once past `budget` (at most budget steps)."""
    if isinstance(value, str):  # most values: no walk
        return len(value) + 2
    total, stack = 0, [value]
    while stack and total <= budget:
        x = stack.pop()
        if isinstance(x, str | bytes):
            total += len(x) + 2
        elif isinstance(x, bool) or x is None:
            total += 5
        elif isinstance(x, int):
            total += x.bit_length() // 3 + 2
        elif isinstance(x, dict):
            total += 2 + 2 * len(x)
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list | tuple | set | frozenset):
            total += 2 + 2 * len(x)
            stack.extend(x)
        elif isinstance(x, Namespace):
            total += 16
            stack.append(object.__getattribute__(x, "_Namespace__attrs"))
        else:
            total += 32
    return total


def _number(value: Any) -> int:
    """A width or count argument as a number of characters (a string counts its length)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return abs(value)
    return len(value) if isinstance(value, str) else 0


def _format_size(fmt: str, args: tuple[Any, ...], kwargs: dict[str, Any], budget: int) -> int:
    """A bound for `fmt % args` or `fmt.format(*args, **kwargs)`: each field may print any
    argument, and each number in the format (a width, a precision) may be a width."""
    fields = fmt.count("%") + fmt.count("{")
    values = size(args, budget) + size(kwargs, budget)
    widths = sum(int(d) if len(d) < 12 else budget for d in _DIGITS.findall(fmt))
    ints = sum(_number(a) for a in (*args, *kwargs.values()) if isinstance(a, int))
    return len(fmt) + fields * values + widths + ints


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, name: str, default: Any) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


# What each amplifying operation may build, from its inputs: (value, args, kwargs, budget).
Estimate = Callable[[Any, tuple[Any, ...], dict[str, Any], int], int]


def _join_size(items: Any, sep: Any, budget: int) -> int:
    return size(items, budget) + len(items) * size(sep, budget)


def _replace_size(s: Any, args: tuple[Any, ...], kwargs: dict[str, Any], budget: int) -> int:
    old, new = _arg(args, kwargs, 0, "old", ""), _arg(args, kwargs, 1, "new", "")
    if type(s) not in (str, bytes) or type(old) is not type(s):
        return 0
    count = s.count(old) if old else len(s) + 1
    return int(len(s) + count * size(new, budget))


def _width_size(s: Any, args: tuple[Any, ...], kwargs: dict[str, Any], budget: int) -> int:
    return size(s, budget) + _number(_arg(args, kwargs, 0, "width", 80))


def _indent_size(s: Any, args: tuple[Any, ...], kwargs: dict[str, Any], budget: int) -> int:
    lines = s.count("\n") + 1 if isinstance(s, str) else 1
    return size(s, budget) + lines * _number(_arg(args, kwargs, 0, "width", 4))


def _wrap_size(s: Any, args: tuple[Any, ...], kwargs: dict[str, Any], budget: int) -> int:
    wrap = _arg(args, kwargs, 2, "wrapstring", "\n") or "\n"
    return size(s, budget) * (1 + _number(wrap)) + _number(_arg(args, kwargs, 0, "width", 79))


def _count_size(x: Any, args: tuple[Any, ...], kwargs: dict[str, Any], budget: int) -> int:
    """batch(linecount, fill_with) and slice(slices, fill_with): up to n fills or lists."""
    n = _number(_arg(args, kwargs, 0, "linecount", _arg((), kwargs, 0, "slices", 0)))
    return size(x, budget) + n * (2 + size(_arg(args, kwargs, 1, "fill_with", None), budget))


FILTERS: dict[str, Estimate] = {
    "center": _width_size,
    "indent": _indent_size,
    "wordwrap": _wrap_size,
    "replace": _replace_size,
    "join": lambda x, a, k, b: _join_size(x, _arg(a, k, 0, "d", ""), b),
    "format": lambda x, a, k, b: _format_size(x, a, k, b) if isinstance(x, str) else 0,
    "batch": _count_size,
    "slice": _count_size,
}
METHODS: dict[str, Estimate] = {
    "center": _width_size,
    "ljust": _width_size,
    "rjust": _width_size,
    "zfill": _width_size,
    "expandtabs": lambda s, a, k, b: len(s) + s.count("\t") * _number(_arg(a, k, 0, "tabsize", 8)),
    "replace": _replace_size,
    "join": lambda sep, a, k, b: _join_size(a[0], sep, b) if a else 0,
    "format": _format_size,
    "format_map": lambda s, a, k, b: _format_size(s, (), a[0] if a else {}, b),
}


# -- the environment ---------------------------------------------------------------------


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """An immutable jinja2 sandbox that bounds what a template builds and how long it runs.
    Its filters are final once `seal()` has run (it wraps them); `tojson` is its own."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, seconds: float = SECONDS, **options: Any):
        super().__init__(finalize=self._output, **options)
        self.seconds, self.budget = seconds, MIN_BUDGET
        self.globals.pop("lipsum", None)  # paragraphs on demand: nothing a chat needs
        self.filters["tojson"] = self.tojson

    def seal(self) -> None:
        """Wraps every filter in its checks (once the filters are all in place)."""
        self.filters = {name: self._filter(name, f) for name, f in self.filters.items()}

    def tojson(
        self,
        x: Any,
        ensure_ascii: bool = False,
        indent: Any = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        """transformers' tojson (no HTML escaping), written piece by piece up to the budget."""
        self._check(_number(indent or 0), "the indent of the tojson filter")
        encoder = json.JSONEncoder(
            ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )
        out, total = [], 0
        for piece in encoder.iterencode(x):
            total += len(piece)
            self._check(total, "the tojson filter")
            out.append(piece)
        return "".join(out)

    def _filter(self, name: str, f: Callable[..., Any]) -> Callable[..., Any]:
        estimate, skip = FILTERS.get(name), int(hasattr(f, "jinja_pass_arg"))

        @wraps(f)
        def bounded(*args: Any, **kwargs: Any) -> Any:
            if estimate is not None and len(args) > skip:
                value = args[skip]
                if not hasattr(value, "__len__"):  # a generator: count what it gives
                    value = list(value)
                    args = (*args[:skip], value, *args[skip + 1 :])
                self._check(estimate(value, args[skip + 1 :], kwargs, self.budget), name)
            return self._checked(f(*args, **kwargs), f"the {name} filter")

        return bounded

    def _check(self, n: int, what: str) -> None:
        if n > self.budget:
            raise TemplateLimitError(f"{what} would make more than {self.budget:,} characters")

    def _checked(self, value: Any, what: str) -> Any:
        self._check(size(value, self.budget), what)
        return value

    def _output(self, value: Any) -> Any:
        return self._checked(value, "a {{ }} expression")

    def concat(self, parts: Any) -> str:  # type: ignore[override]  # a block's text
        parts = list(parts)
        self._check(sum(map(len, parts)), "a block")
        return "".join(parts)

    def _join(self, parts: Any) -> str:  # the ~ operator
        parts = list(parts)
        self._check(size(parts, self.budget), "the ~ operator")
        return "".join(map(str, parts))

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        seq, n = (right, left) if isinstance(left, int) else (left, right)
        if operator == "*" and isinstance(seq, str | bytes | list | tuple) and isinstance(n, int):
            each = len(seq) if isinstance(seq, str | bytes) else size(seq, self.budget)
            self._check(each * max(n, 0), "the * operator")
        elif operator in ("*", "**") and isinstance(left, int) and isinstance(right, int):
            bits = left.bit_length() + right.bit_length()
            if operator == "**":
                bits = left.bit_length() * max(right, 0)
            if bits > INT_BITS:
                raise TemplateLimitError(
                    f"the {operator} operator would make a {bits:,}-bit integer"
                )
        elif operator == "%" and isinstance(left, str):
            args = right if isinstance(right, tuple) else (right,)
            self._check(_format_size(left, args, {}, self.budget), "the % operator")
        result = super().call_binop(context, operator, left, right)
        return self._checked(result, f"the {operator} operator")

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        owner, name = getattr(method, "__self__", None), getattr(method, "__name__", "")
        estimate = METHODS.get(name) if isinstance(owner, str | bytes) else None
        if estimate is not None:
            if name == "join" and args and not hasattr(args[0], "__len__"):
                args = (list(args[0]), *args[1:])  # a generator: count what it gives
            __self._check(estimate(owner, args, kwargs, __self.budget), f"str.{name}")
        result = super().call(__context, __obj, *args, **kwargs)
        return __self._checked(result, f"a call of {name or 'a function'}")

    # -- compiling and rendering ---------------------------------------------------------

    def compile_bounded(self, source: str) -> jinja2.Template:
        """`from_string(source)` within the time limit (jinja2 folds constants then)."""
        template = within(self.seconds, "compiling it", lambda: self.from_string(source))
        # `~` compiles to a call of str_join (markup_join under autoescape), names the
        # template's module imports from jinja2.runtime: bound them there.
        for fn in (template.root_render_func, *template.blocks.values()):
            fn.__globals__["str_join"] = fn.__globals__["markup_join"] = self._join
        return template

    def render_bounded(
        self,
        template: jinja2.Template,
        budget: int,
        context: dict[str, Any],
        out: list[str] | None = None,
    ) -> str:
        """The template's text within the time limit, every value and the whole output
        at most `budget` characters (MIN_BUDGET at least); the chunks go to `out` as they
        come (an extension may read it while the render runs)."""
        self.budget, out = max(budget, MIN_BUDGET), [] if out is None else out

        def render() -> str:
            total = 0
            for chunk in template.generate(**context):
                total += len(chunk)
                self._check(total, "the output")
                out.append(chunk)
            return "".join(out)

        return within(self.seconds, "rendering", render)


# -- the time limit ----------------------------------------------------------------------


class _Watchdog:
    """One daemon thread that raises `_Timeout` in each thread whose deadline has passed,
    again every REFIRE seconds until it disarms: an exception that lands in a garbage
    collector callback or a finalizer is printed and dropped by Python, not raised."""

    REFIRE = 0.1

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._armed: dict[int, list[float]] = {}  # thread id -> [next raise, raised (0/1)]
        self._wake: float | None = None  # when the thread wakes next (None: idle)
        self._thread: threading.Thread | None = None

    def arm(self, seconds: float) -> int:
        tid = threading.get_ident()
        with self._cond:
            when = time.monotonic() + seconds
            self._armed[tid] = [when, 0.0]
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="nnxtrain-template-watchdog", daemon=True
                )
                self._thread.start()
            if self._wake is None or when < self._wake:
                self._cond.notify()
        return tid

    def disarm(self, tid: int) -> None:
        """Ends the watch on `tid`: a `_Timeout` raised but not landed yet is withdrawn
        (under the lock, so that none is raised after this)."""
        with self._cond:
            entry = self._armed.pop(tid, None)
            if entry is not None and entry[1]:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), None)

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                for tid, entry in self._armed.items():
                    if entry[0] <= now:
                        entry[:] = [now + self.REFIRE, 1.0]
                        exc = ctypes.py_object(_Timeout)
                        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), exc)
                self._wake = min((e[0] for e in self._armed.values()), default=None)
                self._cond.wait(None if self._wake is None else self._wake - now)


_WATCHDOG = _Watchdog()


def within(seconds: float, doing: str, fn: Callable[[], T]) -> T:
    """`fn()`, stopped with `TemplateLimitError` once it has run `seconds`.

    A `_Timeout` may land wherever this thread is: inside `fn`, or after it ended and
    before the watch is off; each is caught here (a plain function: no frame of
    contextlib's lies between). The garbage collector stays off meanwhile, so that none
    lands in one of its callbacks."""
    collecting = gc.isenabled()
    gc.disable()
    tid = _WATCHDOG.arm(seconds)
    ended, timed_out, value, error = False, False, None, None
    while True:
        try:
            if not (ended or timed_out):
                try:
                    value, ended = fn(), True
                except _Timeout:
                    timed_out = True
                except BaseException as e:  # raised below, once the watch is off
                    error, ended = e, True
            _WATCHDOG.disarm(tid)
            break
        except _Timeout:
            timed_out = timed_out or not ended
    if collecting:
        gc.enable()
    if error is not None:
        raise error
    if not ended:
        raise TemplateLimitError(f"{doing} took more than {seconds:g} s")
    return value  # type: ignore[return-value]  # fn returned it
