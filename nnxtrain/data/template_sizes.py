"""How big what a chat template makes can get: `measure` (the characters a value prints as,
and its items) and, for the operations that can build a large value from small ones, an
estimate of what they would make from their inputs, checked before they run
(`nnxtrain.data.sandbox` uses both)."""

import re
from collections.abc import Callable, ItemsView, KeysView, ValuesView
from typing import Any

from jinja2.utils import Namespace

_DIGITS = re.compile(r"\d+")


def measure(value: Any, budget: int) -> tuple[int, int]:
    """An upper bound of the characters `value` prints as (str, or JSON), counting a shared
    item every time it appears, and the number of items in it (what going through it costs);
    stops counting once past `budget` characters (at most budget items)."""
    kind = type(value)
    if kind is str:  # most values: no walk
        return len(value) + 2, 0
    if kind is int or kind is bool or value is None:
        return (value.bit_length() // 3 + 2 if kind is int else 5), 0
    total, items, stack = 0, 0, [value]
    while stack and total <= budget:
        x = stack.pop()
        items += 1
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
        elif isinstance(x, list | tuple | set | frozenset | KeysView | ValuesView | ItemsView):
            total += 2 + 2 * len(x)
            stack.extend(x)
        elif isinstance(x, range):  # what iterating it gives (jinja2's range: <= 100,000)
            total += 2 + len(x) * (max(abs(x.start), abs(x.stop)).bit_length() // 3 + 3)
            items += len(x)
        elif isinstance(x, Namespace):
            total += 16
            stack.append(object.__getattribute__(x, "_Namespace__attrs"))
        else:
            total += 32
    return total, items


def size(value: Any, budget: int) -> int:
    """`measure`'s characters."""
    return measure(value, budget)[0]


def number(value: Any) -> int:
    """A width or count argument as a number of characters (a string counts its length)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return abs(value)
    return len(value) if isinstance(value, str) else 0


def format_size(fmt: str, args: tuple[Any, ...], kwargs: dict[str, Any], budget: int) -> int:
    """A bound for `fmt % args` or `fmt.format(*args, **kwargs)`: each field may print any
    argument, and each number in the format (a width, a precision) may be a width."""
    fields = fmt.count("%") + fmt.count("{")
    values = size(args, budget) + size(kwargs, budget)
    widths = sum(int(d) if len(d) < 12 else budget for d in _DIGITS.findall(fmt))
    ints = sum(number(a) for a in (*args, *kwargs.values()) if isinstance(a, int))
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
    return size(s, budget) + number(_arg(args, kwargs, 0, "width", 80))


def _indent_size(s: Any, args: tuple[Any, ...], kwargs: dict[str, Any], budget: int) -> int:
    lines = s.count("\n") + 1 if isinstance(s, str) else 1
    return size(s, budget) + lines * number(_arg(args, kwargs, 0, "width", 4))


def _wrap_size(s: Any, args: tuple[Any, ...], kwargs: dict[str, Any], budget: int) -> int:
    wrap = _arg(args, kwargs, 2, "wrapstring", "\n") or "\n"
    return size(s, budget) * (1 + number(wrap)) + number(_arg(args, kwargs, 0, "width", 79))


def _count_size(x: Any, args: tuple[Any, ...], kwargs: dict[str, Any], budget: int) -> int:
    """batch(linecount, fill_with) and slice(slices, fill_with): up to n fills or lists."""
    n = number(_arg(args, kwargs, 0, "linecount", _arg((), kwargs, 0, "slices", 0)))
    return size(x, budget) + n * (2 + size(_arg(args, kwargs, 1, "fill_with", None), budget))


FILTERS: dict[str, Estimate] = {
    "center": _width_size,
    "indent": _indent_size,
    "wordwrap": _wrap_size,
    "replace": _replace_size,
    "join": lambda x, a, k, b: _join_size(x, _arg(a, k, 0, "d", ""), b),
    "format": lambda x, a, k, b: format_size(x, a, k, b) if isinstance(x, str) else 0,
    "batch": _count_size,
    "slice": _count_size,
}
METHODS: dict[str, Estimate] = {
    "center": _width_size,
    "ljust": _width_size,
    "rjust": _width_size,
    "zfill": _width_size,
    "expandtabs": lambda s, a, k, b: len(s) + s.count("\t") * number(_arg(a, k, 0, "tabsize", 8)),
    "replace": _replace_size,
    "join": lambda sep, a, k, b: _join_size(a[0], sep, b) if a else 0,
    "format": format_size,
    "format_map": lambda s, a, k, b: format_size(s, (), a[0] if a else {}, b),
}
