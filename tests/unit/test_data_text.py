"""Reading text and tokenizing it: files and globs, documents, bad bytes, the tokenizers."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from nnxtrain.data.text import encode_files, expand_paths, iter_pieces
from nnxtrain.data.tokenizer import (
    ByteTokenizer,
    CharTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
)
from nnxtrain.errors import ConfigError

TEXT = "the cat sat on the mat.\nthe dog ate the log.\n" * 20


def write(path: Path, text: str | bytes) -> str:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


# -- files -------------------------------------------------------------------------------


def test_expand_paths_keeps_order_expands_globs_and_dedupes(tmp_path):
    a, b, c = (write(tmp_path / f"{n}.txt", "x") for n in "abc")
    got = expand_paths([c, str(tmp_path / "*.txt"), a], "data.path")
    assert got == [c, a, b]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda t: str(t / "missing.txt"), "no such file"),
        (lambda t: str(t / "*.nope"), "no files match"),
        (lambda t: str(t), "is a directory"),
        (lambda t: write(t / "empty.txt", ""), "is empty"),
    ],
)
def test_expand_paths_bad_input_names_the_key(tmp_path, make, match):
    with pytest.raises(ConfigError, match=match) as e:
        expand_paths(make(tmp_path), "data.val_path")
    assert e.value.key == "data.val_path"


def test_pieces_split_documents_at_the_separator_across_read_boundaries(tmp_path):
    docs = [f"document {i} " + "word " * (i * 7 % 23) for i in range(30)]
    path = write(tmp_path / "c.txt", "\n\n".join(docs))
    for chunk in (5, 16, 64, 1 << 20):  # separators straddle reads for the small chunks
        pieces = list(iter_pieces(path, "\n\n", chunk_bytes=chunk))
        got, current = [], ""
        for text, ends in pieces:
            current += text
            if ends:
                got.append(current)
                current = ""
        assert got == docs, chunk


def test_long_document_is_cut_after_newlines_and_never_inside_a_character(tmp_path):
    text = "héllo wörld ✓\n" * 500
    path = write(tmp_path / "c.txt", text)
    pieces = list(iter_pieces(path, "", chunk_bytes=100))
    assert "".join(p for p, _ in pieces) == text
    assert [ends for _, ends in pieces].count(True) == 1 and pieces[-1][1]
    assert all(p.endswith("\n") for p, _ in pieces)


def test_invalid_utf8_is_replaced_with_one_warning_for_the_corpus(tmp_path, caplog):
    a = write(tmp_path / "a.txt", b"good \xff\xfe text\n")
    b = write(tmp_path / "b.txt", b"more \xc3 bad\n")
    ok = write(tmp_path / "ok.txt", "fine \ufffd as it is\n")  # a real U+FFFD is not an error
    caplog.set_level(logging.WARNING, "nnxtrain.data")
    ids = encode_files([a, b, ok], ByteTokenizer())
    assert len(caplog.records) == 1 and caplog.records[0].levelno == logging.WARNING
    message = caplog.records[0].getMessage()
    assert "3 byte(s)" in message and "a.txt" in message and "1 more" in message
    assert ByteTokenizer().decode(ids).count("\ufffd") == 4
    caplog.clear()
    encode_files([ok], ByteTokenizer())
    assert not caplog.records


def test_documents_are_each_followed_by_eos(tmp_path):
    a = write(tmp_path / "a.txt", "ab")
    b = write(tmp_path / "b.txt", "c||d||")
    tok = ByteTokenizer()
    ids = encode_files([a, b], tok, separator="||").tolist()
    assert ids == [97, 98, 256, 99, 256, 100, 256]


# -- tokenizers --------------------------------------------------------------------------


def test_byte_tokenizer_round_trips_utf8():
    tok = ByteTokenizer()
    ids = tok.encode(["naïve ", "café ✓"])
    assert tok.vocab_size == 257 and tok.eos_id == 256 and ids.max() < 256
    assert tok.decode([*ids.tolist(), tok.eos_id]) == "naïve café ✓"


def test_char_tokenizer_maps_unknown_characters_and_saves_its_vocabulary(tmp_path):
    tok = CharTokenizer.build(["hello", "world"])
    assert tok.vocab_size == len(set("helloworld")) + 2
    ids = tok.encode(["hold", "!"])
    assert ids[-1] == tok.unk_id and tok.decode(ids[:-1].tolist()) == "hold"
    path = str(tmp_path / "char_vocab.json")
    tok.save(path)
    again = load_tokenizer(path)
    assert isinstance(again, CharTokenizer) and again.chars == tok.chars
    assert again.digest() == tok.digest() != CharTokenizer.build(["other"]).digest()


def _hf_tokenizer(tmp_path: Path, with_eos: bool) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[UNK]", "</s>"] if with_eos else ["[UNK]"]
    tok.train_from_iterator([TEXT], trainers.WordLevelTrainer(special_tokens=specials))
    path = tmp_path / f"tokenizer{int(with_eos)}.json"
    tok.save(str(path))
    return str(path)


def test_hugging_face_tokenizer_finds_or_adds_an_eos(tmp_path):
    with_eos = load_tokenizer(_hf_tokenizer(tmp_path, True))
    assert isinstance(with_eos, HFTokenizer)
    base = with_eos._tok.get_vocab_size()
    assert with_eos.vocab_size == base and with_eos.eos_id == with_eos._tok.token_to_id("</s>")
    ids = with_eos.encode(["the cat sat", "on the mat."])
    assert " ".join(with_eos.decode(ids.tolist()).split()) == "the cat sat on the mat ."
    without = load_tokenizer(_hf_tokenizer(tmp_path, False))
    assert without.eos_id == without.vocab_size - 1 == without._tok.get_vocab_size()
    with pytest.raises(ConfigError, match="eos_token"):
        HFTokenizer(_hf_tokenizer(tmp_path, False), eos_token="<nope>")


def test_sentencepiece_tokenizer(tmp_path):
    import sentencepiece as spm

    corpus = write(tmp_path / "corpus.txt", TEXT)
    spm.SentencePieceTrainer.train(
        input=corpus,
        model_prefix=str(tmp_path / "sp"),
        vocab_size=30,
        model_type="bpe",
        minloglevel=2,
    )
    tok = load_tokenizer(str(tmp_path / "sp.model"))
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.vocab_size == 30 and tok.eos_id == tok._sp.eos_id()
    ids = tok.encode(["the dog ate the log."])
    assert ids.max() < tok.vocab_size and tok.decode(ids.tolist()) == "the dog ate the log."


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("missing.json", None, "no such file"),
        ("broken.json", "{not json", "Hugging Face"),
        ("broken.model", "not a model", "SentencePiece"),
        ("binary.json", b"\xff\xfe\x00garbage", "cannot read"),
    ],
)
def test_unreadable_tokenizer_file_is_a_config_error(tmp_path, name, content, match):
    path = tmp_path / name
    if content is not None:
        write(path, content)
    with pytest.raises(ConfigError, match=match) as e:
        load_tokenizer(str(path))
    assert e.value.key == "data.tokenizer"


def test_char_vocabulary_file_must_be_one(tmp_path):
    path = write(tmp_path / "v.json", json.dumps({"type": "nnxtrain-char", "chars": 3}))
    with pytest.raises(ConfigError, match="not a char vocabulary"):
        load_tokenizer(path)


def test_encode_returns_uint_ids_below_the_vocabulary(tmp_path):
    path = write(tmp_path / "a.txt", TEXT)
    tok = CharTokenizer.build([TEXT])
    ids = encode_files([path], tok)
    assert ids.dtype == np.uint16 and ids.max() < tok.vocab_size
    assert tok.decode(ids.tolist()) == TEXT


def test_hugging_face_pieces_are_cut_after_newlines_only(tmp_path, monkeypatch):
    import nnxtrain.data.tokenizer as tokenizer_module

    tok = load_tokenizer(_hf_tokenizer(tmp_path, True))
    whole = tok.encode([TEXT]).tolist()
    monkeypatch.setattr(tokenizer_module, "HF_PIECE_CHARS", 50)  # many small pieces
    assert tok.encode([TEXT]).tolist() == whole
    pieces = tokenizer_module._split_after_newlines("a" * 120 + "\nbb\n" + "c" * 10, 50)
    assert "".join(pieces) == "a" * 120 + "\nbb\n" + "c" * 10
    assert pieces == ["a" * 120 + "\n", "bb\n" + "c" * 10]
