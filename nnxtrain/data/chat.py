"""Chat templates: `messages` rendered with jinja2, and which tokens are the assistant's.

    template = ChatTemplate.load(data.chat_template, tokenizer)
    ids, mask = template.encode(messages)      # mask: True on the assistant's tokens

`data.chat_template` empty means the tokenizer's template, found as transformers finds it:
`chat_template.jinja` beside the tokenizer file, else the `chat_template` of the
`tokenizer_config.json` there (a string, or a list whose entry named "default" is taken);
when there is neither, `DEFAULT_TEMPLATE`. `default` picks DEFAULT_TEMPLATE, and any other
value is a template file.

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
resumes; the common templates then fall back to a fixed date.
"""

import json
import os
import re
from typing import Any, NoReturn

import jinja2
import numpy as np
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

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
        self.output: list[str] | None = None  # the render's output so far, while recording
        self.spans: list[tuple[int, int]] = []

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_record")
        return nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _record(self, caller: Any) -> str:
        text = str(caller())
        if self.output is not None:
            start = sum(map(len, self.output))
            self.spans.append((start, start + len(text)))
        return text


def _raise(message: str) -> NoReturn:
    raise jinja2.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: Any = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


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


def find_template(spec: str, tokenizer: RecordTokenizer) -> tuple[str, str]:
    """(template source, where it came from) for data.chat_template=`spec`."""
    if spec == "default":
        return DEFAULT_TEMPLATE, "the built-in default template"
    if spec:
        path = os.path.abspath(os.path.expanduser(spec))
        if not os.path.isfile(path):
            raise ConfigError(KEY, f"no such file {spec!r}", "give a .jinja file, or default")
        return _read(path, "the template"), path
    folder = os.path.dirname(tokenizer.path)
    jinja_file = os.path.join(folder, "chat_template.jinja")
    if folder and os.path.isfile(jinja_file):
        return _read(jinja_file, "the template"), jinja_file
    found = tokenizer_config(tokenizer.path).get("chat_template")
    if isinstance(found, list):  # named templates: transformers' default is "default"
        named = [t for t in found if isinstance(t, dict) and t.get("name") == "default"]
        found = named[0].get("template") if named else None
    if isinstance(found, str) and found:
        return found, os.path.join(folder, "tokenizer_config.json")
    return DEFAULT_TEMPLATE, "the built-in default template"


class ChatTemplate:
    """A compiled chat template and the tokenizer it renders for."""

    def __init__(self, source: str, where: str, tokenizer: RecordTokenizer):
        if not GENERATION.search(source):
            raise ConfigError(
                KEY,
                f"the chat template of {where} has no {{% generation %}} block, so which "
                "tokens are the assistant's is unknown",
                "give a template file that wraps each assistant reply in {% generation %}"
                "...{% endgeneration %} (data.chat_template=FILE.jinja), or "
                "data.chat_template=default",
            )
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[_Generation, "jinja2.ext.loopcontrols"],
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ConfigError(
                KEY, f"the chat template of {where} is not valid Jinja ({first_line(e)})", "fix it"
            ) from e
        tracker = env.extensions[_Generation.identifier]
        assert isinstance(tracker, _Generation)
        self._tracker, self.where, self.tokenizer = tracker, where, tokenizer
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
        template raises (`raise_exception`, a missing key, ...) propagate."""
        output: list[str] = []
        self._tracker.output, self._tracker.spans = output, []
        try:
            for chunk in self._template.generate(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                tools=None,
                documents=None,
                **self.tokens,
            ):
                output.append(chunk)
        finally:
            self._tracker.output = None
        return "".join(output), self._tracker.spans

    def encode(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """The rendered conversation's ids and its assistant mask (bool), as transformers'
        apply_chat_template(..., return_assistant_tokens_mask=True) gives them."""
        text, spans = self.render(messages, add_generation_prompt)
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
