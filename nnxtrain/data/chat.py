"""Chat templates: `messages` rendered with jinja2, and which tokens are the assistant's.

    template = ChatTemplate.load(data.chat_template, tokenizer)
    ids, mask = template.encode(messages)      # mask: True on the assistant's tokens

`data.chat_template` empty means the tokenizer's template, found as transformers finds it
beside the tokenizer file: `chat_template.jinja` and `additional_chat_templates/*.jinja`
(named by file) if there are any, else the `chat_template` of `tokenizer_config.json` (a
string, or a list of `{"name", "template"}` objects); of several named templates the one
named "default" is taken. Named templates with no "default", or a `chat_template` of
another type, are an error, as in transformers (no silent fallback). When the tokenizer has
no template at all, `DEFAULT_TEMPLATE`. `default` picks DEFAULT_TEMPLATE; any other value is
a template file, or the name of one of the tokenizer's named templates. `ChatTemplate.where`
says which template is in use (the start-up line prints it).

The mask is what transformers' `apply_chat_template(messages, return_dict=True,
return_assistant_tokens_mask=True)` returns, token for token, by the same method: the
template marks the replies it trains on with `{% generation %}...{% endgeneration %}`;
while rendering, each such block records the character span its output lands at (the
length of everything output before it); the whole text is tokenized in one call with no
special tokens added, and a token is the assistant's when its character span overlaps a
recorded span. So a template without `{% generation %}` is an error here (transformers
would return an all-zero mask, and nothing would be trained on).

The template sees `messages`, `add_generation_prompt`, `tools=None`, `documents=None` and
the special tokens of `tokenizer_config.json` (`bos_token`, `eos_token`, ...); where it has
none, `bos_token` and `eos_token` are the tokenizer's own (a byte tokenizer writes EOS as
`<|endoftext|>` and reads it back as the EOS id). It runs in jinja2's sandbox with
`trim_blocks`, `lstrip_blocks`, the `loopcontrols` extension, `raise_exception(message)` and a
`tojson` that does not escape HTML, as in transformers. `strftime_now` is left out on
purpose: a template that writes today's date would tokenize differently on the day a run
resumes; the common templates then fall back to a fixed date. The sandbox is bounded
(`nnxtrain.data.sandbox`): a render of more than 2,000,000 steps plus 10 per character of
the conversation (a step: a loop turn, a call, a filter, an operator, ... or 64 characters
it reads or makes), a value or output of more than 1,000,000 characters plus 10 per
character of the conversation, or (a backstop) a render or compile longer than 10 s,
raises `TemplateLimitError`.
"""

import json
import os
import re
from typing import Any, NoReturn

import jinja2
import numpy as np
from jinja2 import nodes
from jinja2.ext import Extension

from nnxtrain.data.sandbox import (
    MIN_BUDGET,
    SECONDS,
    STEPS,
    STEPS_PER_CHAR,
    BoundedSandbox,
    TemplateLimitError,
)
from nnxtrain.data.template_sizes import size
from nnxtrain.data.tokenizer import RecordTokenizer
from nnxtrain.errors import ConfigError, first_line

KEY = "data.chat_template"
SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")

# Used when the tokenizer has no template: each message is `<|role|>`, a newline, its
# content and a newline; an assistant reply ends with EOS before its newline, and the
# reply with its EOS is what the loss covers.
DEFAULT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}`: outputs its body and, while a render
    records, the character span the body lands at."""

    tags = {"generation"}  # noqa: RUF012 (jinja2 reads it from the class)

    def __init__(self, environment: jinja2.Environment):
        super().__init__(environment)
        self.recording = False
        self.spans: list[tuple[int, int]] = []

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_record")
        return nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _record(self, caller: Any) -> str:
        text = str(caller())
        if self.recording:
            assert isinstance(self.environment, BoundedSandbox)
            start = self.environment.written  # the length of the output so far
            self.spans.append((start, start + len(text)))
        return text


def _raise(message: str) -> NoReturn:
    raise jinja2.TemplateError(message)


def tokenizer_config(tokenizer_file: str) -> dict[str, Any]:
    """The `tokenizer_config.json` beside a tokenizer file ({} when there is none)."""
    folder = os.path.dirname(tokenizer_file)
    path = os.path.join(folder, "tokenizer_config.json")
    if not folder or not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(
            "data.tokenizer", f"cannot read {path} ({first_line(e)})", "fix it"
        ) from e
    return config if isinstance(config, dict) else {}


def special_token(config: dict[str, Any], name: str) -> str | None:
    """A special token's text in a tokenizer_config.json (a string or {"content": ...})."""
    value = config.get(name)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(KEY, f"cannot read {what} {path} ({first_line(e)})", "check it") from e


Named = dict[str, tuple[str, str]]  # name -> (template source, where it came from)


def tokenizer_templates(tokenizer: RecordTokenizer) -> tuple[Named, str]:
    """The tokenizer's templates by name (a single one is "default"), and where they were
    found ({} and "" when it has none)."""
    folder = os.path.dirname(tokenizer.path)
    if not folder:
        return {}, ""
    files = {}
    if os.path.isfile(jinja_file := os.path.join(folder, "chat_template.jinja")):
        files["default"] = jinja_file
    extra = os.path.join(folder, "additional_chat_templates")
    if os.path.isdir(extra):  # named templates, as transformers reads them since v4.54
        for name in sorted(os.listdir(extra)):
            if name.endswith(".jinja"):
                files[name.removesuffix(".jinja")] = os.path.join(extra, name)
    if files:
        named = {n: (_read(p, "the template"), f"the tokenizer's {p}") for n, p in files.items()}
        return named, folder
    path = os.path.join(folder, "tokenizer_config.json")
    found, where = (
        tokenizer_config(tokenizer.path).get("chat_template"),
        f"{path} key chat_template",
    )
    fix = "correct that file, or give data.chat_template=FILE.jinja, or default (built-in)"
    if found is None:
        return {}, ""
    if isinstance(found, str):
        return {"default": (found, f"the tokenizer's {where}")}, where
    if not isinstance(found, list):
        raise ConfigError(
            KEY,
            f"{where} is {_json_type(found)}, neither a template string nor a list of "
            '{"name": ..., "template": ...} objects (transformers refuses it too)',
            fix,
        )
    named = {}
    for i, entry in enumerate(found):
        title = entry.get("name") if isinstance(entry, dict) else None
        source = entry.get("template") if isinstance(entry, dict) else None
        if not isinstance(title, str) or not isinstance(source, str):
            raise ConfigError(
                KEY,
                f'entry {i} of {where} is not a {{"name": ..., "template": ...}} '
                "object of two strings (transformers refuses it too)",
                fix,
            )
        named[title] = (source, f'the tokenizer\'s {where}, entry "{title}"')
    return named, where


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    return "null" if value is None else names.get(type(value), "a number")


def find_template(spec: str, tokenizer: RecordTokenizer) -> tuple[str, str]:
    """(template source, which template it is) for data.chat_template=`spec`."""
    if spec == "default":
        return DEFAULT_TEMPLATE, "the built-in default (data.chat_template=default)"
    path = os.path.abspath(os.path.expanduser(spec)) if spec else ""
    if path and os.path.isfile(path):
        return _read(path, "the template"), f"data.chat_template={path}"
    named, origin = tokenizer_templates(tokenizer)
    names = ", ".join(f'"{n}"' for n in named)
    if spec:
        if spec in named:
            return named[spec]
        theirs = f", nor one of the tokenizer's named templates ({names})" if named else ""
        raise ConfigError(KEY, f"no such file {spec!r}{theirs}", "give a .jinja file, or default")
    if "default" in named:
        return named["default"]
    if named:
        raise ConfigError(
            KEY,
            f'the tokenizer\'s templates ({origin}) have no entry named "default" to use: '
            f"{names} (transformers refuses this too)",
            "pick one: data.chat_template=NAME, or a .jinja file, or default (built-in)",
        )
    return DEFAULT_TEMPLATE, "the built-in default (the tokenizer has none)"


class ChatTemplate:
    """A compiled chat template and the tokenizer it renders for."""

    def __init__(
        self,
        source: str,
        where: str,
        tokenizer: RecordTokenizer,
        steps: int = STEPS,
        seconds: float = SECONDS,
    ):
        if not GENERATION.search(source):
            raise ConfigError(
                KEY,
                f"the chat template, {where}, has no {{% generation %}} block, so which "
                "tokens are the assistant's is unknown",
                "give a template file that wraps each assistant reply in {% generation %}"
                "...{% endgeneration %} (data.chat_template=FILE.jinja), or "
                "data.chat_template=default",
            )
        env = BoundedSandbox(
            steps,
            seconds,
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[_Generation, "jinja2.ext.loopcontrols"],
        )
        env.globals["raise_exception"] = _raise
        env.seal()
        try:
            self._template = env.compile_bounded(source)
        except (jinja2.TemplateSyntaxError, TemplateLimitError, RecursionError, MemoryError) as e:
            raise ConfigError(
                KEY, f"the chat template, {where}, cannot be compiled ({first_line(e)})", "fix it"
            ) from e
        tracker = env.extensions[_Generation.identifier]
        assert isinstance(tracker, _Generation)
        self._env, self._tracker, self.where, self.tokenizer = env, tracker, where, tokenizer
        config = tokenizer_config(tokenizer.path)
        self.tokens = {n: t for n in SPECIAL_TOKENS if (t := special_token(config, n)) is not None}
        self.tokens.setdefault("eos_token", tokenizer.eos_text)
        self.tokens.setdefault("bos_token", tokenizer.bos_text)

    @classmethod
    def load(cls, spec: str, tokenizer: RecordTokenizer) -> "ChatTemplate":
        """The template data.chat_template=`spec` names, for `tokenizer`."""
        return cls(*find_template(spec, tokenizer), tokenizer)

    def render(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = False
    ) -> tuple[str, list[tuple[int, int]]]:
        """The text, and the character spans of its `{% generation %}` blocks. Errors the
        template raises (`raise_exception`, a missing key, ...) propagate; a render over
        its limits raises `TemplateLimitError`."""
        context = {
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "tools": None,
            "documents": None,
            **self.tokens,
        }
        chars = size(messages, 1 << 62)
        budget, steps = MIN_BUDGET + 10 * chars, self._env.steps + STEPS_PER_CHAR * chars
        self._tracker.recording, self._tracker.spans = True, []
        try:
            text = self._env.render_bounded(self._template, budget, steps, context)
        except MemoryError as e:
            raise TemplateLimitError(f"rendering ran out of memory ({first_line(e)})") from None
        finally:
            self._tracker.recording = False
        return text, self._tracker.spans

    def encode(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """The rendered conversation's ids and its assistant mask (bool), as transformers'
        apply_chat_template(..., return_assistant_tokens_mask=True) gives them."""
        return self.tokenize(*self.render(messages, add_generation_prompt))

    def tokenize(self, text: str, spans: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        """A rendered text's ids and the mask of the tokens its `spans` overlap."""
        ids, offsets = self.tokenizer.encode_offsets(text)
        return ids, assistant_mask(offsets, spans)


def assistant_mask(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """True for each token whose character span [start, end) overlaps a generation span:
    transformers' single pass over tokens and spans (both in order), vectorised."""
    if not spans or not len(offsets):
        return np.zeros(len(offsets), bool)
    starts, ends = np.array(spans, np.int64).T
    # the first span that ends after the token starts; the token counts if it reaches in
    first = np.searchsorted(ends, offsets[:, 0], side="right")
    inside = first < len(spans)
    return inside & (offsets[:, 1] > starts[np.minimum(first, len(spans) - 1)])
