"""The jinja2 sandbox chat templates render in, bounded in the work they do and in the size of
what they build: a template comes with a downloaded tokenizer, and is untrusted code.

    env = BoundedSandbox(trim_blocks=True, ...)     # an ImmutableSandboxedEnvironment
    env.seal()                                      # once its filters are in place
    template = env.compile_bounded(source)          # TemplateLimitError: over a limit
    text = env.render_bounded(template, budget, steps, {"messages": ...})  # chars, steps

jinja2's sandbox keeps a template from reaching Python (no attribute of `_` names, no
mutation, `range` capped at 100,000 items), but not from asking for more than the machine
has: `'x' * 2000000000` allocates 2 GB (and the Rust tokenizer then aborts on it), nested
ranges loop for hours. Here:

- Size: no value a render makes may hold more than `budget` characters (the expanded size
  of a string, or of a list or dict as text: what printing it would write). Operations
  that could build a large value from small ones are checked before they run (`*` and
  `**`, `%` and str.format with their widths, str.replace/join/center/expandtabs..., the
  filters center/indent/wordwrap/replace/join/format/batch/slice; tojson is written piece
  by piece), everything a call, filter or operator returns after, and so are `~`, `{{ }}`
  output and a block's joined text; the whole output is capped at `budget` too. `lipsum`
  is left out.
- Work: a render (and a compile: jinja2 folds constant expressions then) may take at most
  `steps` steps, counted in the rendering thread as it goes: each turn of a `{% for %}`
  loop (the compiled loop reads its items through a counter), each call (macros too),
  filter, test, operator, `~`, slice, comparison, block and output chunk is one step, plus
  one per `CHARS_PER_STEP` characters it reads or makes, plus the digit work of big
  integer arithmetic. Past the count it raises where it is, so it needs no other thread,
  signal or timer, and gives the same answer on a busy machine as on an idle one.
  Every loop and every recursion passes a counted point each turn, and what runs between
  two counted points is bounded by the template's length, so the count bounds the time.
  As a backstop for an operation that costs more than it is charged, the same points also
  check a deadline of `seconds` (wall clock, read in the rendering thread).

Either limit raises `TemplateLimitError` (its message says which); the caller names the
template and the record.
"""

import json
import time
from collections.abc import Callable, Iterable, Iterator
from functools import wraps
from typing import Any, cast

import jinja2
from jinja2 import nodes
from jinja2.runtime import LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from nnxtrain.data.template_sizes import FILTERS, METHODS, format_size, measure, number, size

MIN_BUDGET = 1_000_000  # characters a value or output may always hold
INT_BITS = 1 << 16  # the largest integer a template may build (about 20,000 digits)
# What an operation is charged, in steps: about what it takes, in units of a loop's turn
# (well under a microsecond): a call (a macro's too) 10, a filter or test 2, anything else
# 1; plus one per item and per CHARS_PER_STEP characters of what it reads and makes.
CALL_STEPS, FILTER_STEPS, CHARS_PER_STEP = 10, 2, 64
# The limit: STEPS plus STEPS_PER_CHAR per character of the conversation. Measured on a
# loaded 2-core machine, a hostile template runs 0.4-1.8 us a step (nested loops, macros,
# recursive loops, long searches and sorts), so STEPS is a few seconds at most. Templates
# that read every message (ChatML, Llama-3-style headers, tool calls and JSON) took 0.05-0.75
# steps per character of the chat, and 37-150 steps for a 2-turn chat: real use stays over
# 10x under the per-character part and 10,000x under STEPS.
STEPS, STEPS_PER_CHAR = 2_000_000, 10
SECONDS = 10.0  # the backstop: a render or compile running longer stops


class TemplateLimitError(Exception):
    """A template went over its work or size limit."""


# -- the environment ---------------------------------------------------------------------


# Filters the parser wraps around each loop's items and each side of a comparison, so that
# they count; a template cannot name them (a filter name has no "-").
ITERATE, COMPARED = "nnxtrain-iterate", "nnxtrain-compared"


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """An immutable jinja2 sandbox that bounds what a template builds and the work it does.
    Its filters and tests are final once `seal()` has run (it wraps them); `tojson` is its
    own. One render at a time: the counts are the environment's."""

    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})

    def __init__(self, steps: int = STEPS, seconds: float = SECONDS, **options: Any):
        super().__init__(finalize=self._output, **options)
        self.steps, self.seconds, self.budget, self.written = steps, seconds, MIN_BUDGET, 0
        self._start("compiling it", steps)
        self.globals.pop("lipsum", None)  # paragraphs on demand: nothing a chat needs
        self.filters["tojson"] = self.tojson

    def seal(self) -> None:
        """Wraps every filter and test in its checks (once they are all in place)."""
        self.filters = {name: self._filter(name, f) for name, f in self.filters.items()}
        tests = cast(dict[str, Callable[..., Any]], self.tests)
        self.tests = {name: self._filter(name, f, "test") for name, f in tests.items()}
        self.filters[ITERATE], self.filters[COMPARED] = self._iterate, self._compared

    # -- counting ------------------------------------------------------------------------

    def _start(self, doing: str, steps: int) -> None:
        self._doing, self._limit, self._left = doing, steps, steps
        self._deadline = time.monotonic() + self.seconds

    def _spend(self, steps: int) -> None:
        self._left -= steps
        if self._left < 0:
            raise TemplateLimitError(f"{self._doing} took more than {self._limit:,} steps")
        if time.monotonic() > self._deadline:
            raise TemplateLimitError(f"{self._doing} took more than {self.seconds:g} s")

    def _iterate(self, items: Iterable[Any]) -> Iterator[Any]:
        """What a `{% for %}` loop (or a filter's lazy input) reads: one step an item."""
        for item in items:
            self._spend(1)
            yield item

    def _cost(self, values: Iterable[Any]) -> int:
        """The steps going through `values` costs: their items, and their characters."""
        steps = 0
        for value in values:
            chars, items = measure(value, self.budget)
            steps += items + chars // CHARS_PER_STEP
        return steps

    def _compared(self, value: Any) -> Any:  # each side of a comparison (`==`, `in`, ...)
        self._spend(1 + self._cost((value,)))
        return value

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        """The parsed template, its loops' items and comparisons' sides counted."""
        tree = super()._parse(source, name, filename)

        def counted(node: nodes.Node, through: str) -> nodes.Expr:
            return nodes.Filter(node, through, [], [], None, None, lineno=node.lineno)

        for loop in list(tree.find_all(nodes.For)):
            loop.iter = counted(loop.iter, ITERATE)
        for compare in list(tree.find_all(nodes.Compare)):
            compare.expr = counted(compare.expr, COMPARED)
            for op in compare.ops:
                op.expr = counted(op.expr, COMPARED)
        return tree

    # -- size checks ---------------------------------------------------------------------

    def tojson(
        self,
        x: Any,
        ensure_ascii: bool = False,
        indent: Any = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        """transformers' tojson (no HTML escaping), written piece by piece up to the budget."""
        self._check(number(indent or 0), "the indent of the tojson filter")
        encoder = json.JSONEncoder(
            ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )
        out, total = [], 0
        for piece in encoder.iterencode(x):
            total += len(piece)
            self._check(total, "the tojson filter")
            out.append(piece)
        return "".join(out)

    def _filter(self, name: str, f: Callable[..., Any], kind: str = "filter") -> Callable[..., Any]:
        estimate = FILTERS.get(name) if kind == "filter" else None
        skip = int(hasattr(f, "jinja_pass_arg"))

        @wraps(f)
        def bounded(*args: Any, **kwargs: Any) -> Any:
            self._spend(FILTER_STEPS + self._cost(args[skip:]) + self._cost(kwargs.values()))
            if len(args) > skip and isinstance(args[skip], Iterator):
                # a lazy input (map, select, ...): each item it gives costs a step
                value = self._iterate(args[skip])
                if estimate is not None:  # to estimate, the items are needed first
                    value = list(value)  # type: ignore[assignment]
                args = (*args[:skip], value, *args[skip + 1 :])
            if estimate is not None and len(args) > skip:
                self._check(estimate(args[skip], args[skip + 1 :], kwargs, self.budget), name)
            return self._checked(f(*args, **kwargs), f"the {name} {kind}")

        return bounded

    def _check(self, n: int, what: str) -> None:
        if n > self.budget:
            raise TemplateLimitError(f"{what} would make more than {self.budget:,} characters")

    def _checked(self, value: Any, what: str) -> Any:
        chars, items = measure(value, self.budget)
        self._check(chars, what)
        self._spend(1 + items + chars // CHARS_PER_STEP)
        return value

    def _output(self, value: Any) -> Any:
        return self._checked(value, "a {{ }} expression")

    def concat(self, parts: Any) -> str:  # type: ignore[override]  # a block's text
        parts = list(parts)
        n = sum(map(len, parts))
        self._check(n, "a block")
        self._spend(1 + n // CHARS_PER_STEP)
        return "".join(parts)

    def _join(self, parts: Any) -> str:  # the ~ operator
        return "".join(map(str, self._checked(list(parts), "the ~ operator")))

    def getitem(self, obj: Any, argument: Any) -> Any:
        value = super().getitem(obj, argument)
        if isinstance(argument, slice):  # a copy
            return self._checked(value, "a slice")
        return value

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        seq, n = (right, left) if isinstance(left, int) else (left, right)
        ints = isinstance(left, int) and isinstance(right, int)
        if operator == "*" and isinstance(seq, str | bytes | list | tuple) and isinstance(n, int):
            each = len(seq) if isinstance(seq, str | bytes) else size(seq, self.budget)
            self._check(each * max(n, 0), "the * operator")
        elif operator in ("*", "**") and ints:
            bits = left.bit_length() + right.bit_length()
            if operator == "**":
                bits = left.bit_length() * max(right, 0)
            if bits > INT_BITS:
                raise TemplateLimitError(
                    f"the {operator} operator would make a {bits:,}-bit integer"
                )
            # digit work: long multiplication and division grow with both lengths
            self._spend(bits * max(left.bit_length(), right.bit_length()) >> 16)
        elif operator == "%" and isinstance(left, str):
            args = right if isinstance(right, tuple) else (right,)
            self._check(format_size(left, args, {}, self.budget), "the % operator")
        elif ints:
            self._spend(left.bit_length() * right.bit_length() >> 16)
        self._spend(1 + self._cost((left, right)))
        result = super().call_binop(context, operator, left, right)
        return self._checked(result, f"the {operator} operator")

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        owner, name = getattr(method, "__self__", None), getattr(method, "__name__", "")
        estimate = METHODS.get(name) if isinstance(owner, str | bytes) else None
        if estimate is not None:
            if name == "join" and args and not hasattr(args[0], "__len__"):
                args = (list(__self._iterate(args[0])), *args[1:])  # what a generator gives
            __self._check(estimate(owner, args, kwargs, __self.budget), f"str.{name}")
        if isinstance(__obj, LoopContext) and args:  # a recursive loop's next level
            args = (__self._iterate(args[0]), *args[1:])
        steps = CALL_STEPS + __self._cost(args) + __self._cost(kwargs.values())
        if isinstance(owner, str | bytes | list | dict):  # a method: it may read its owner
            steps += __self._cost((owner,))
        __self._spend(steps)
        result = super().call(__context, __obj, *args, **kwargs)
        return __self._checked(result, f"a call of {name or 'a function'}")

    # -- compiling and rendering ---------------------------------------------------------

    def compile_bounded(self, source: str) -> jinja2.Template:
        """`from_string(source)`, counted (jinja2 calls filters on constants then)."""
        self._start("compiling it", self.steps)
        template = self.from_string(source)
        # `~` compiles to a call of str_join (markup_join under autoescape), names the
        # template's module imports from jinja2.runtime: bound them there.
        for fn in (template.root_render_func, *template.blocks.values()):
            fn.__globals__["str_join"] = fn.__globals__["markup_join"] = self._join
        return template

    def render_bounded(
        self, template: jinja2.Template, budget: int, steps: int, context: dict[str, Any]
    ) -> str:
        """The template's text in at most `steps` steps, every value and the whole output
        at most `budget` characters (MIN_BUDGET at least). While it runs, `written` is the
        length of the output so far (an extension may read it)."""
        self.budget, self.written, out = max(budget, MIN_BUDGET), 0, []
        self._start("rendering", steps)
        for chunk in template.generate(**context):
            self.written += len(chunk)
            self._check(self.written, "the output")
            self._spend(1 + len(chunk) // CHARS_PER_STEP)
            out.append(chunk)
        return "".join(out)
