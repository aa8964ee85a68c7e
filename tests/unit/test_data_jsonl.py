"""data=jsonl: records to documents and loss weights, bad records, truncation, the builder."""

import dataclasses
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from test_data_chat import CHATML, make_tokenizer

from nnxtrain import compose
from nnxtrain.data import DocumentData, build_dataset
from nnxtrain.data.jsonl import Fields, RecordReader
from nnxtrain.data.tokenizer import ByteTokenizer, load_tokenizer
from nnxtrain.errors import ConfigError

EOS = ByteTokenizer.eos_id


def write_jsonl(path: Path, records: list) -> str:
    """One line per record: JSON for objects, strings written as they are."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def reader(tok=None, seq_len: int = 64, **kw) -> RecordReader:
    return RecordReader(tok or ByteTokenizer(), Fields(), seq_len=seq_len, **kw)


def dataset(docs, seq_len: int = 64, **kw) -> DocumentData:
    kw = {"seed": 0, "eos_id": EOS, "vocab_size": 257, "prefetch": 0, **kw}
    return DocumentData(docs, None, seq_len=seq_len, **kw)


def one_row(data: DocumentData) -> dict:
    """The first training row of an unshuffled dataset, trimmed to its documents."""
    b = data.batch(0, 1, data.seq_len)
    keep = b["segment_ids"][0] > 0
    return {k: v[0][keep] for k, v in b.items()}


# -- records and weights -----------------------------------------------------------------


def test_prompt_targets_weigh_nothing_and_completion_plus_eos_weigh_one(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "2+2=", "completion": "4!"}])
    row = one_row(dataset(reader().read([path], "data.path"), shuffle=False))
    assert row["inputs"].tolist() == list(b"2+2=4!")
    assert row["targets"].tolist() == [*b"+2=4!", EOS]
    # targets "+", "2", "=" belong to the prompt; "4", "!" and EOS to the completion
    assert row["weights"].tolist() == [0, 0, 0, 1, 1, 1]


def test_text_records_count_every_target_and_field_names_are_settings(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"body": "abc"}, {"q": "xx", "a": "yz"}])
    r = RecordReader(ByteTokenizer(), Fields("body", "q", "a", "chat"), seq_len=64)
    row = one_row(dataset(r.read([path], "data.path"), shuffle=False))
    assert row["segment_ids"].tolist() == [1, 1, 1, 1, 2, 2, 2]  # the longer one first
    assert row["inputs"].tolist() == list(b"xxyzabc")
    assert row["weights"].tolist() == [0, 1, 1, 1, 1, 1, 1]  # ("x") "yz" + EOS | "bc" + EOS
    assert r.shapes == {"text": 1, "prompt/completion": 1}


def test_bos_follows_the_tokenizer_and_eos_its_config(tmp_path):
    """A tokenizer.json whose post-processor adds <s>, and tokenizer_config.json's EOS
    <|im_end|> (the end-of-turn token): text records match transformers' tokenizer(text)
    plus that EOS."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, processors

    path = make_tokenizer(tmp_path / "tok", CHATML, "<|im_end|>")
    raw = Tokenizer.from_file(path)
    bos_id = raw.token_to_id("<s>")
    raw.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos_id)]
    )
    raw.save(path)
    cfg = compose(["data=jsonl", f"data.path={path}", f"data.tokenizer={path}"])
    from nnxtrain.data import _record_tokenizer

    tok = _record_tokenizer(cfg)
    assert tok.bos_ids == (bos_id,)
    assert tok.eos_id == raw.token_to_id("<|im_end|>")  # not </s>-style guessing
    text = "hello there, how are you?"
    data = write_jsonl(tmp_path / "a.jsonl", [{"text": text}])
    docs = reader(tok).read([data], "data.path")
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))(text)["input_ids"]
    assert docs.tokens.tolist() == [*ref, tok.eos_id]
    assert ref[0] == bos_id


def test_a_conversation_is_one_document_even_when_eos_ends_each_turn(tmp_path):
    """The regression: EOS = end-of-turn must not split a conversation into documents."""
    path = make_tokenizer(tmp_path / "tok", CHATML, "<|im_end|>")
    tok = load_tokenizer(path, "<|im_end|>")
    chat = [
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "I am fine"},
        {"role": "user", "content": "how are you?"},
        {"role": "assistant", "content": "fine thanks"},
    ]
    data = write_jsonl(tmp_path / "a.jsonl", [{"messages": chat}])
    docs = reader(tok).read([data], "data.path")
    ids, mask = reader(tok).encode({"messages": chat})[:2]
    row = one_row(dataset(docs, eos_id=tok.eos_id, vocab_size=tok.vocab_size, shuffle=False))
    assert (row["inputs"] == tok.eos_id).sum() == 4  # each turn ends with it (then "\\n")
    assert set(row["segment_ids"].tolist()) == {1}
    assert row["positions"].tolist() == list(range(len(ids) - 1))
    assert row["weights"].tolist() == mask[1:].astype(float).tolist()
    assert row["weights"][row["targets"] == tok.eos_id].tolist() == [0, 1, 0, 1]


# -- bad records -------------------------------------------------------------------------

GOOD = {"text": "fine"}
CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
BAD = [
    ('{"text": "unterminated', "invalid JSON"),
    ("[1, 2]", "a record is a JSON object, got an array"),
    ({"title": "x"}, r"no 'text', 'prompt' \+ 'completion' or 'messages' field"),
    ({"prompt": "2+2="}, "no 'completion' field"),
    ({"text": 3}, "'text' must be a string, got a number"),
    ({"prompt": "a", "completion": None}, "'completion' must be a string, got null"),
    ({"prompt": "2+2=", "completion": ""}, "'completion' is empty"),
    ({"text": ""}, "'text' is empty"),
    ({"messages": "hi"}, "'messages' must be an array, got a string"),
    ({"messages": []}, "'messages' is empty"),
    ({"messages": [{"role": "user"}]}, r"messages\[0\]: no 'content' field"),
    ({"messages": [{"role": "user", "content": 1}]}, r"messages\[0\]: 'content' must be"),
    # scraped text often holds lone surrogates; Python's JSON reader recurses per level
    ({"text": "ab\ud800cd"}, r"'text' holds a lone UTF-16 surrogate \(\\ud800 at character 2\)"),
    ({"prompt": "\udfff", "completion": "x"}, "'prompt' holds a lone UTF-16 surrogate"),
    ({"prompt": "p", "completion": "x\udc00"}, "'completion' holds a lone UTF-16 surrogate"),
    ({"messages": [{"role": "user", "content": "\ud83d"}]}, r"messages\[0\]: 'content' holds"),
    ("[" * 100_000 + "]" * 100_000, "nested deeper than Python's JSON reader goes"),
]


@pytest.mark.parametrize("record, says", BAD, ids=[s for _, s in BAD])
def test_each_bad_record_stops_the_run_naming_its_file_and_line(tmp_path, record, says):
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD, "", GOOD, record, GOOD])
    with pytest.raises(ConfigError) as e:
        reader().read([path], "data.path")
    assert re.search(says, str(e.value)), str(e.value)
    assert f"{path}:4: " in str(e.value)  # the blank line 2 counts as a line
    assert e.value.key == "data.path"
    assert "data.skip_bad_records=true" in e.value.fix


def test_a_template_that_raises_is_a_bad_record_naming_its_line(tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text(
        "{% for m in messages %}{% if m['role'] == 'tool' %}"
        "{{ raise_exception('no tools here') }}{% endif %}"
        "{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}"
    )
    tool = {"messages": [{"role": "tool", "content": "x"}]}
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD, tool])
    with pytest.raises(ConfigError, match=f"{path}:2: the chat template failed.*no tools here"):
        reader(chat_template=str(template)).read([path], "data.path")


def test_a_lone_surrogate_the_template_prints_from_another_field_is_a_bad_record(tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text(
        "{% for m in messages %}{{ m['name'] }}"
        "{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}"
    )
    named = {"messages": [{"role": "assistant", "content": "x", "name": "\ud800"}]}
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD, named])
    with pytest.raises(ConfigError, match=f"{path}:2: the chat template's text holds a lone"):
        reader(chat_template=str(template)).read([path], "data.path")


def test_a_template_over_its_limits_stops_the_run_even_when_skipping(tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{{ 'x' * 2000000000 }}{% generation %}x{% endgeneration %}")
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD, {"messages": CHAT}])
    with pytest.raises(ConfigError) as e:
        reader(skip_bad=True, chat_template=str(template)).read([path], "data.path")
    assert e.value.key == "data.chat_template"
    assert f"went over its limits on {path}:2: the * operator would make more than" in str(e.value)


def test_skip_mode_counts_each_kind_reports_them_and_keeps_the_good(tmp_path, caplog):
    records = [GOOD, *(r for r, _ in BAD), GOOD]
    path = write_jsonl(tmp_path / "a.jsonl", records)
    r = reader(skip_bad=True)
    docs = r.read([path], "data.path")
    assert len(docs) == 2
    assert r.bad == {
        **{"invalid JSON": 1, "wrong type": 5, "missing field": 3, "empty": 3},
        **{"lone surrogate": 4, "nested too deep": 1},
    }
    assert r.first_bad["invalid JSON"] == f"{path}:2"
    assert "skipped 17 bad record(s): 1 invalid JSON (first" in r.report()
    cfg = compose(["data=jsonl", f"data.path={path}", "data.skip_bad_records=true"])
    with caplog.at_level(logging.WARNING, logger="nnxtrain.data"):
        build_dataset(cfg)
    assert caplog.text.count("skipped 17 bad record(s)") == 1


# -- truncation --------------------------------------------------------------------------


def test_truncate_right_cuts_drop_drops_and_error_names_the_line(tmp_path):
    records = [{"text": "a" * 5}, {"prompt": "p" * 9, "completion": "c"}, {"text": "b" * 20}]
    path = write_jsonl(tmp_path / "a.jsonl", records)
    cut = reader(seq_len=8, truncate="right")
    docs = cut.read([path], "data.path")
    assert docs.lengths.tolist() == [6, 9, 9]  # a record may fill seq_len + 1 tokens
    assert (cut.truncated, cut.lost) == (2, 1)  # the completion was cut away entirely
    assert "2 cut to run.seq_len + 1 tokens, 1 of them left with no loss token" in cut.report()
    drop = reader(seq_len=8, truncate="drop")
    assert drop.read([path], "data.path").lengths.tolist() == [6]
    assert drop.dropped == 2 and "2 longer than run.seq_len + 1 tokens dropped" in drop.report()
    with pytest.raises(ConfigError, match=f"{path}:2 has 11 tokens, more than") as e:
        reader(seq_len=8, truncate="error").read([path], "data.path")
    assert e.value.key == "data.truncate"


# -- splits with no loss token ----------------------------------------------------------

USER_ONLY = {
    "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
}
PROMPT_ONLY = (  # the generation block sits where only the prompt for a reply goes
    "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}{% generation %}<reply>{% endgeneration %}{% endif %}"
)
NEVER = (
    "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    "{% if 0 %}{% generation %}{% endgeneration %}{% endif %}"
)
# id -> (records, overrides, the key named, what the line says)
NO_LOSS_SPLITS = {
    "every-prompt-too-long": (
        [{"prompt": "p" * 40, "completion": "c"}] * 3,
        ["run.seq_len=16"],
        "data.path",
        "of its 3 records, 3 cut at run.seq_len + 1 tokens before their first loss token. "
        "Fix: raise run.seq_len",
    ),
    "no-assistant-turn": (
        [USER_ONLY] * 3,
        [],
        "data.path",
        "of its 3 records, 3 chats with no assistant turn",
    ),
    "generation-only-with-add_generation_prompt": (
        [{"messages": CHAT}] * 3,
        ["data.chat_template={tmp}/prompt_only.jinja"],
        "data.chat_template",
        "marks no token of any of the 3 chats with an assistant turn (the first: {tmp}/a.jsonl:1):"
        " its {% generation %} block fires only with add_generation_prompt",
    ),
    "generation-never-fires": (
        [GOOD, {"messages": CHAT}],  # the text record alone would train
        ["data.chat_template={tmp}/never.jinja"],
        "data.chat_template",
        "its {% generation %} block never fires",
    ),
    "held-out-split": (
        [GOOD] * 3 + [USER_ONLY],
        ["data.val_fraction=0.25", "run.eval_every=5"],
        "data.val_fraction",
        "no token of the held-out last 1 records counts for the loss",
    ),
}


@pytest.mark.parametrize("case", list(NO_LOSS_SPLITS))
def test_a_split_with_no_loss_token_is_refused_saying_why(tmp_path, case):
    records, overrides, key, says = NO_LOSS_SPLITS[case]
    (tmp_path / "prompt_only.jinja").write_text(PROMPT_ONLY)
    (tmp_path / "never.jinja").write_text(NEVER)
    path = write_jsonl(tmp_path / "a.jsonl", records)
    settings = {"data.val_fraction": "0", "run.eval_every": "0"}  # the case's win
    settings |= dict(o.replace("{tmp}", str(tmp_path)).split("=", 1) for o in overrides)
    cfg = compose(["data=jsonl", f"data.path={path}", *(f"{k}={v}" for k, v in settings.items())])
    with pytest.raises(ConfigError) as e:
        build_dataset(cfg)
    assert e.value.key == key
    assert says.replace("{tmp}", str(tmp_path)) in str(e.value), str(e.value)


def test_the_data_line_counts_records_without_loss_and_names_the_template(tmp_path, capsys):
    path = write_jsonl(tmp_path / "a.jsonl", [{"messages": CHAT}, USER_ONLY])
    for spec, named in [
        ("", "the built-in default (the tokenizer has none)"),
        ("default", "the built-in default (data.chat_template=default)"),
    ]:
        cfg = compose(["data=jsonl", f"data.path={path}", "run.eval_every=0"])
        build_dataset(
            dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, chat_template=spec))
        )
        line = capsys.readouterr().out
        assert "; 1 chats with no assistant turn (only the assistant's tokens count)" in line
        assert f"; chat template: {named};" in line


# -- the builder -------------------------------------------------------------------------


def test_build_dataset_holds_out_the_last_records_and_reports_packing(tmp_path, capsys):
    records = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(20)]
    path = write_jsonl(tmp_path / "a.jsonl", records)
    cfg = compose(
        [
            *("data=jsonl", f"data.path={path}", "run.seq_len=16", "run.batch_size=2"),
            *("data.val_fraction=0.25", "data.prefetch=0"),
        ]
    )
    data = build_dataset(cfg)
    assert isinstance(data, DocumentData)
    assert (len(data.train.docs), len(data.val.docs)) == (15, 5)
    assert data.val.docs.tokens[:3].tolist() == list(b"q15")  # the last five, in order
    printed = capsys.readouterr().out
    assert "20 records (20 prompt/completion)" in printed
    assert f"packing efficiency {data.train.efficiency:.3f}" in printed
    batch = data.batch(0, 2, 16, split="eval")
    assert set(batch) == {"inputs", "targets", "weights", "segment_ids", "positions"}


def test_val_path_and_bad_settings(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD] * 3)
    val = write_jsonl(tmp_path / "v.jsonl", [{"text": "held"}])
    cfg = compose(["data=jsonl", f"data.path={path}", f"data.val_path={val}", "run.seq_len=8"])
    data = build_dataset(cfg)
    assert (len(data.train.docs), len(data.val.docs)) == (3, 1)
    for override, key in [
        ("data.truncate=left", "data.truncate"),
        ("data.tokenizer=char", "data.tokenizer"),
        ("data.prompt_field=text", "data.text_field"),
    ]:
        with pytest.raises(ConfigError) as e:
            compose(["data=jsonl", f"data.path={path}", override])
        assert e.value.key == key
    empty = write_jsonl(tmp_path / "e.jsonl", ["{}"])
    cfg = compose(["data=jsonl", f"data.path={empty}", "data.skip_bad_records=true"])
    with pytest.raises(ConfigError, match="no usable record"):
        build_dataset(cfg)


def test_the_feed_places_segments_only_with_the_document_mask_on(tmp_path):
    import jax

    from nnxtrain.parallel.mesh import build_mesh
    from nnxtrain.train.feed import BATCH_DTYPES, DOCUMENT_DTYPES, Feed

    path = write_jsonl(tmp_path / "a.jsonl", [GOOD] * 4)
    data = dataset(reader().read([path], "data.path"), seq_len=8)
    mesh = build_mesh(compose(["mesh=single"]).mesh, jax.devices()[:1])
    batch = Feed(data, mesh, batch_size=2, seq_len=8).train(0)
    assert set(batch) == set(BATCH_DTYPES) | set(DOCUMENT_DTYPES)
    assert np.asarray(batch["weights"]).sum() > 0
    data.document_mask = False  # data.document_mask=false: the three keys only
    assert set(Feed(data, mesh, batch_size=2, seq_len=8).train(0)) == set(BATCH_DTYPES)
