"""Chat templates: the assistant masks agree token for token with transformers'."""

import gc
import json
import re
import threading
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from nnxtrain.data import chat
from nnxtrain.data.chat import DEFAULT_TEMPLATE, ChatTemplate, assistant_mask, find_template
from nnxtrain.data.sandbox import STEPS, TemplateLimitError
from nnxtrain.data.tokenizer import ByteTokenizer, load_tokenizer
from nnxtrain.errors import ConfigError

CHATML = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['role'] == 'assistant' %}"
    "{% generation %}{{ m['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Llama-3 style: BOS, whitespace control, a header around each turn, a role check.
HEADERS = """{{- bos_token }}
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('unknown role ' + message['role']) }}
    {%- endif %}
    {{- '<|start|>' + message['role'] + '<|end|>\\n\\n' }}
    {%- if message['role'] == 'assistant' %}
        {%- generation %}{{- message['content'] | trim + '<|eot|>' }}{%- endgeneration %}
    {%- else %}
        {{- message['content'] | trim + '<|eot|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start|>assistant<|end|>\\n\\n' }}{%- endif %}
"""
# Role and content run together, so a BPE token can start before a reply and end inside it.
TIGHT = (
    "{% for m in messages %}{{ m['role'] }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}"
    "{% else %}{{ m['content'] }}{% endif %}{{ eos_token }}{% endfor %}"
)
SPECIALS = ["<|im_start|>", "<|im_end|>", "<s>", "<|start|>", "<|end|>", "<|eot|>"]
CORPUS = [
    "hello there, how are you? I am fine thanks.",
    "user assistant system: what is two plus two? It is four.",
    "héllo wörld ✓ — naïve café",
] * 30
CHATS = [
    [
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "I am fine, thanks."},
    ],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "what is two plus two?"},
        {"role": "assistant", "content": "four"},
        {"role": "user", "content": "and héllo wörld ✓?"},
        {"role": "assistant", "content": " naïve café \n"},
    ],
]


def make_tokenizer(folder: Path, template: str, eos: str, bos: str = "<s>") -> str:
    """A byte-level BPE tokenizer.json trained here, and a tokenizer_config.json with
    `template`, in `folder`; returns the tokenizer.json path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": template,
        "eos_token": eos,
        "bos_token": bos,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return str(folder / "tokenizer.json")


def reference(folder: Path, messages: list, add_generation_prompt: bool) -> tuple[list, list]:
    """transformers' ids and assistant mask for `messages`."""
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    out = tok.apply_chat_template(
        messages,
        add_generation_prompt=add_generation_prompt,
        return_assistant_tokens_mask=True,
        return_dict=True,
    )
    return list(out["input_ids"]), list(out["assistant_masks"])


@pytest.mark.parametrize(
    "template, eos",
    [(CHATML, "<|im_end|>"), (HEADERS, "<|eot|>")],
    ids=["chatml-eos-is-end-of-turn", "headers-eos-is-eot"],
)
@pytest.mark.parametrize("chat", range(len(CHATS)))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_masks_are_token_identical_to_transformers(
    tmp_path, template, eos, chat, add_generation_prompt
):
    # EOS is the end-of-turn token in both templates: the regression case where an EOS
    # inside a conversation must neither end the mask early nor be left out of it.
    path = make_tokenizer(tmp_path / "tok", template, eos)
    tok = load_tokenizer(path, eos)
    ids, mask = ChatTemplate.load("", tok).encode(CHATS[chat], add_generation_prompt)
    ref_ids, ref_mask = reference(tmp_path / "tok", CHATS[chat], add_generation_prompt)
    assert ids.tolist() == ref_ids
    assert mask.astype(int).tolist() == ref_mask
    assert 0 < mask.sum() < len(mask)
    eos_id = tok.eos_id
    assert (ids == eos_id).sum() >= 2  # several turns end with it...
    assert mask[ids == eos_id].sum() == sum(m["role"] == "assistant" for m in CHATS[chat])


def test_a_token_straddling_the_start_of_a_reply_counts_as_in_transformers(tmp_path):
    path = make_tokenizer(tmp_path / "tok", TIGHT, "<|im_end|>")
    tok = load_tokenizer(path)
    chat = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "ant is fine, thanks"},
        {"role": "user", "content": "ok"},
        {"role": "assistant", "content": "ere two"},
    ]
    template = ChatTemplate.load("", tok)
    text, spans = template.render(chat)
    _, offsets = tok.encode_offsets(text)
    straddles = [(a < s < b) for a, b in offsets.tolist() for s, _ in spans]
    assert any(straddles)  # the case this test is about does occur
    ids, mask = template.encode(chat)
    assert (ids.tolist(), mask.astype(int).tolist()) == reference(tmp_path / "tok", chat, False)


def test_the_template_comes_from_the_jinja_file_before_the_config(tmp_path):
    path = make_tokenizer(tmp_path / "tok", CHATML, "<|im_end|>")
    tok = load_tokenizer(path)
    config = tmp_path / "tok" / "tokenizer_config.json"
    assert find_template("", tok) == (CHATML, f"the tokenizer's {config} key chat_template")
    (tmp_path / "tok" / "chat_template.jinja").write_text(HEADERS, encoding="utf-8")
    assert find_template("", tok)[0] == HEADERS
    assert find_template("default", tok)[0] == DEFAULT_TEMPLATE
    assert find_template("", ByteTokenizer())[0] == DEFAULT_TEMPLATE


def test_a_template_without_generation_blocks_is_refused(tmp_path):
    plain = CHATML.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    path = make_tokenizer(tmp_path / "tok", plain, "<|im_end|>")
    with pytest.raises(ConfigError, match=r"no \{% generation %\} block") as e:
        ChatTemplate.load("", load_tokenizer(path))
    assert e.value.key == "data.chat_template"


def test_default_template_with_the_byte_tokenizer_trains_replies_and_their_eos():
    tok = ByteTokenizer()
    ids, mask = ChatTemplate.load("default", tok).encode(CHATS[0])
    text = "<|user|>\nhello there\n<|assistant|>\nI am fine, thanks."
    assert ids.tolist() == [*text.encode(), tok.eos_id, ord("\n")]
    assert tok.decode(ids[mask]) == "I am fine, thanks."
    assert mask.tolist() == [False] * len(text.split("I am")[0]) + [True] * 19 + [False]


def test_byte_offsets_cover_multibyte_characters_and_lone_surrogates():
    tok = ByteTokenizer()
    text = "aé✓\U0001f600\ud800<|endoftext|>z"
    ids, offsets = tok.encode_offsets(text)
    assert ids.tolist() == [*"aé✓\U0001f600?".encode(errors="surrogateescape"), 256, ord("z")]
    chars = [0, 1, 1, 2, 2, 2, 3, 3, 3, 3, 4]
    assert offsets[:, 0].tolist() == [*chars, 5, 18]
    assert offsets[:, 1].tolist() == [c + 1 for c in chars] + [18, 19]


def test_assistant_mask_marks_every_token_overlapping_a_span():
    offsets = np.array([[0, 2], [2, 5], [5, 6], [6, 9], [9, 9], [9, 12]])
    assert assistant_mask(offsets, [(3, 6), (9, 10)]).tolist() == [0, 1, 1, 0, 0, 1]
    assert assistant_mask(offsets, []).tolist() == [0] * 6


def test_sentencepiece_offsets_are_characters_and_control_pieces_are_ids(tmp_path):
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("héllo wörld, the cat sat on the mat.\n" * 50, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=30,
        model_type="bpe",
        minloglevel=2,
    )
    tok = load_tokenizer(str(tmp_path / "sp.model"))
    assert tok.bos_ids == (tok._sp.bos_id(),) and tok.eos_text == "</s>"
    text = "<s>héllo mat</s>"
    ids, offsets = tok.encode_offsets(text)
    assert ids.tolist() == [*tok.bos_ids, *tok.encode(["héllo mat"]).tolist(), tok.eos_id]
    spans = [text[a:b] for a, b in offsets.tolist()]
    assert spans[0] == "<s>" and spans[-1] == "</s>"
    assert "".join(spans[1:-1]).replace(" ", "") == "héllomat"  # characters, not bytes


def test_a_tokenizer_json_without_eos_reads_the_placeholder_as_its_added_id(tmp_path):
    path = make_tokenizer(tmp_path / "tok", CHATML, "<|im_end|>")
    tok = load_tokenizer(path)  # no EOS candidate among its tokens: one id is added
    assert tok.eos_id == tok.vocab_size - 1 and tok.eos_text == "<|endoftext|>"
    ids, offsets = tok.encode_offsets("hello<|endoftext|>")
    assert ids.tolist() == [*tok.encode(["hello"]).tolist(), tok.eos_id]
    assert offsets[-1].tolist() == [5, 18]


# -- which template: transformers' rules, no silent fallback -------------------------------

PLAIN = "{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}"
OTHER = PLAIN.replace("m['content']", "m['role']")
ENTRIES = [{"name": "tool_use", "template": OTHER}, {"name": "default", "template": PLAIN}]
# id -> (tokenizer_config.json's chat_template, files beside it, data.chat_template,
#        the template found or None, its `where` (found) or what the error says)
SOURCES = {
    "list-with-default": (ENTRIES, {}, "", PLAIN, 'key chat_template, entry "default"'),
    "list-entry-by-name": (ENTRIES, {}, "tool_use", OTHER, 'entry "tool_use"'),
    "list-without-default": (
        ENTRIES[:1],
        {},
        "",
        None,
        r'key chat_template\) have no entry named "default" to use: "tool_use"',
    ),
    "list-entry-not-an-object": (["x"], {}, "", None, "entry 0 of .* is not a"),
    "list-entry-without-template": ([{"name": "default"}], {}, "", None, "entry 0 of"),
    "a-number": (3, {}, "", None, "is a number, neither a template string nor a list"),
    "an-object": ({"default": PLAIN}, {}, "", None, "is an object, neither"),
    "extra-files-without-default": (
        PLAIN,
        {"additional_chat_templates/tools.jinja": OTHER},
        "",
        None,
        'have no entry named "default" to use: "tools"',
    ),
    "extra-files-beside-the-jinja-file": (
        None,
        {"chat_template.jinja": PLAIN, "additional_chat_templates/tools.jinja": OTHER},
        "tools",
        OTHER,
        "the tokenizer's .*additional_chat_templates/tools.jinja",
    ),
    "none-at-all": (None, {}, "", DEFAULT_TEMPLATE, r"the built-in default \(the tokenizer has"),
}


@pytest.mark.parametrize("case", list(SOURCES))
def test_the_tokenizers_template_is_found_as_transformers_finds_it_or_refused(tmp_path, case):
    value, files, spec, found, says = SOURCES[case]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": value}))
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    tok = types.SimpleNamespace(path=str(tmp_path / "tokenizer.json"))  # only its folder counts
    if found is None:
        with pytest.raises(ConfigError) as e:
            find_template(spec, tok)
        assert e.value.key == "data.chat_template"
        assert re.search(says, str(e.value)), str(e.value)
        assert "\n" not in str(e.value)
    else:
        source, where = find_template(spec, tok)
        assert source == found and re.search(says, where), where


# -- hostile templates: bounded in time and size ------------------------------------------

# Each would hang, or allocate gigabytes (the first aborted the process in the tokenizer).
# The cases that would run for hours count their steps against a lower limit than the real
# one (STEPS_FOR_TESTS): the same check, in a fraction of a second.
STEPS_FOR_TESTS = 100_000
# (the limit, plus 10 steps per character of the conversation: CHATS[0] is short)
OVER = r"rendering took more than 10\d,\d{3} steps"
HOSTILE = {
    "repeat-2e9": ("{{ 'x' * 2000000000 }}", "the \\* operator would make more than"),
    "repeat-a-list": ("{% set l = ['abc'] * 100000000 %}", "the \\* operator"),
    "double-by-~": (
        "{% set ns = namespace(x='xx') %}"
        "{% for i in range(60) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}",
        "the ~ operator",
    ),
    "double-by-+": (
        "{% set ns = namespace(x='xx') %}"
        "{% for i in range(60) %}{% set ns.x = ns.x + ns.x %}{% endfor %}",
        "the \\+ operator",
    ),
    "center-filter": ("{{ 'x'|center(2000000000) }}", "center would make"),
    "center-method": ("{{ 'x'.center(2000000000) }}", "str.center would make"),
    "format-width": ("{{ '%2000000000s'|format('x') }}", "format would make"),
    "percent-width": ("{{ '%2000000000s' % 'x' }}", "the % operator"),
    "str.format-width": ("{{ '{:2000000000}'.format('x') }}", "str.format would make"),
    "replace-quadratic": ("{% set s = 'x' * 100000 %}{{ s|replace('x', s) }}", "replace"),
    "join-a-generator": (
        "{% set s = 'y' * 1000 %}{{ range(10000)|map('string')|join(s) }}",
        "join would make",
    ),
    "batch-fill": ("{{ [1]|batch(2000000000, 'x')|list|length }}", "batch would make"),
    "tojson-indent": ("{{ messages|tojson(indent=100000000) }}", "indent of the tojson"),
    "block-of-repeats": (
        "{% set s = 'y' * 900000 %}"
        "{% set b %}{% for i in range(3) %}{{ s }}{% endfor %}{% endset %}",
        "a block would make",
    ),
    "output": ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", "the output"),
    "power": ("{{ 10 ** 100000000 }}", "the \\*\\* operator would make a 400,000,000-bit integer"),
    "squaring": (
        "{% set ns = namespace(x=10) %}"
        "{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}{% endfor %}",
        "-bit integer",
    ),
    "nested-ranges": (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        OVER,
    ),
    "exponential-macro": (
        "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
        "{{ f(60) }}",
        OVER,
    ),
    # loops whose turns do more than a turn's work: each is charged what it reads
    "search-a-long-string": (
        "{% set s = 'ab' * 400000 %}{% for i in range(100000) %}{% for j in range(100000) %}"
        "{% if 'bac' in s %}{% endif %}{% endfor %}{% endfor %}",
        OVER,
    ),
    "sort-a-long-list": (
        "{% set l = range(100000)|list %}{% for i in range(100000) %}{{ l|sort|first }}"
        "{% endfor %}",
        OVER,
    ),
    "chained-lazy-filters": (
        "{% for i in range(100000) %}{{ range(100000)|map('abs')|map('abs')|select|list|length }}"
        "{% endfor %}",
        OVER,
    ),
    "recursive-loop": (
        "{% set l = [[[[1]]]] * 1000 %}{% for i in range(100000) %}{% for x in l recursive %}"
        "{% if x is iterable %}{{ loop(x) }}{% endif %}{% endfor %}{% endfor %}",
        OVER,
    ),
    "big-integer-division": (
        "{% set ns = namespace(x=7, y=7) %}{% for i in range(14) %}{% set ns.y = ns.x %}"
        "{% set ns.x = ns.x * ns.x %}{% endfor %}{% for i in range(100000) %}"
        "{% for j in range(100000) %}{% set q = ns.x // ns.y %}{% endfor %}{% endfor %}",
        OVER,
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_template_stops_at_its_limits(case):
    body, says = HOSTILE[case]
    steps = STEPS_FOR_TESTS if says == OVER else STEPS  # the size limits at the real count
    template = ChatTemplate(body + PLAIN, "test", ByteTokenizer(), steps=steps)
    with pytest.raises(TemplateLimitError, match=says):
        template.render(CHATS[0])


def test_real_templates_take_far_fewer_steps_than_the_limit(monkeypatch):
    # The limit is STEPS plus STEPS_PER_CHAR (10) per character of the conversation; these
    # templates (a long chat too) render within 1 step per character and no STEPS at all.
    monkeypatch.setattr(chat, "STEPS_PER_CHAR", 1)
    long_chat = CHATS[1] * 100
    for source in (DEFAULT_TEMPLATE, CHATML, HEADERS, TIGHT):
        template = ChatTemplate(source, "test", ByteTokenizer(), steps=0)
        for messages in (*CHATS, long_chat):
            assert template.render(messages)[1]  # spans: it rendered


def test_the_step_limit_needs_no_other_thread_and_leaves_the_collector_on(monkeypatch):
    # The limit used to be a watchdog thread raising into the rendering thread, with the
    # garbage collector off meanwhile; its leftover "async exception" flag hung the JAX
    # profiler later in the process. Now the render counts its own steps.
    monkeypatch.setattr(gc, "disable", lambda: pytest.fail("the collector was turned off"))
    body = HOSTILE["nested-ranges"][0] + PLAIN
    template = ChatTemplate(body, "test", ByteTokenizer(), steps=STEPS_FOR_TESTS)
    threads = set(threading.enumerate())

    def render() -> str:
        with pytest.raises(TemplateLimitError) as e:
            template.render(CHATS[0])
        return str(e.value)

    with ThreadPoolExecutor(1) as pool:  # in any thread
        said = pool.submit(render).result(timeout=60)
        assert re.fullmatch(OVER, said), said
        assert pool.submit(render).result(timeout=60) == said  # the same count each time
    assert render() == said
    assert set(threading.enumerate()) <= threads  # no thread of its own
    # and the template renders a conversation again, unharmed
    template = ChatTemplate(PLAIN, "test", ByteTokenizer(), steps=STEPS_FOR_TESTS)
    assert template.render(CHATS[0])[0] == "hello thereI am fine, thanks."


def test_the_wall_clock_backstop_stops_a_render_in_its_own_thread():
    template = ChatTemplate(PLAIN, "test", ByteTokenizer(), seconds=0.0)
    with pytest.raises(TemplateLimitError, match="rendering took more than 0 s"):
        template.render(CHATS[0])


def test_templates_that_cannot_compile_are_one_line(tmp_path):
    deep = "{{ " + "(" * 100_000 + "1" + ")" * 100_000 + " }}" + PLAIN  # the parser recurses
    with pytest.raises(ConfigError, match=r"cannot be compiled \(RecursionError") as e:
        ChatTemplate(deep, "test", ByteTokenizer())
    assert e.value.key == "data.chat_template"
