"""build_dataset for text and tokens, memory-mapped token files, pretokenize, vocab sizes."""

import json
from pathlib import Path

import numpy as np
import pytest

from nnxtrain import compose
from nnxtrain.data import CHAR_VOCAB, PackedData, build_dataset, resolve_vocab
from nnxtrain.data.pretokenize import main as pretokenize_main
from nnxtrain.data.pretokenize import pretokenize
from nnxtrain.errors import ConfigError, UserError

LINES = [f"line {i}: to be or not to be, that is the question.\n" for i in range(400)]
TEXT, A, B = "".join(LINES), "".join(LINES[:200]), "".join(LINES[200:])
RUN = ["run.seq_len=32", "run.batch_size=4", "model=tiny"]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    (tmp_path / "a.txt").write_text(A, encoding="utf-8")
    (tmp_path / "b.txt").write_text(B, encoding="utf-8")
    return tmp_path


def same_batches(x: PackedData, y: PackedData, splits=("train", "eval")) -> None:
    for split in splits:
        for step in (0, 1, 17):
            a, b = x.batch(step, 4, 32, split), y.batch(step, 4, 32, split)
            for k in a:
                np.testing.assert_array_equal(a[k], b[k], err_msg=f"{split} {step} {k}")


def test_text_dataset_and_its_vocab_size(corpus):
    cfg = compose(["data=text", f"data.path={corpus}/*.txt", *RUN])
    data = build_dataset(cfg)
    assert isinstance(data, PackedData) and data.vocab_size == 257
    total = len(TEXT.encode()) + 2  # two files: two documents, each followed by EOS
    assert len(data.train) + len(data.val) == total
    assert len(data.val) == round(total * 0.1)
    assert resolve_vocab(cfg, data).model.vocab_size == 257
    keep = compose([*RUN, "data=text", f"data.path={corpus}/a.txt", "model.vocab_size=300",
                    "data.vocab_size_from_tokenizer=false"])  # fmt: skip
    assert resolve_vocab(keep, data).model.vocab_size == 300
    small = compose([*RUN, "data=text", f"data.path={corpus}/a.txt",
                     "data.vocab_size_from_tokenizer=false"])  # fmt: skip
    with pytest.raises(ConfigError, match="smaller than the tokenizer's 257") as e:
        resolve_vocab(small, data)
    assert e.value.key == "model.vocab_size"


def test_char_vocabulary_is_saved_in_the_run_dir_and_reloaded_on_resume(corpus, tmp_path):
    run_dir = tmp_path / "run"
    cfg = compose(["data=text", f"data.path={corpus}/a.txt", "data.tokenizer=char",
                   f"run.dir={run_dir}", *RUN])  # fmt: skip
    first = build_dataset(cfg)
    saved = json.loads((run_dir / CHAR_VOCAB).read_text(encoding="utf-8"))
    assert first.vocab_size == len(saved["chars"]) + 2
    # The corpus grows a character the saved vocabulary lacks: a resumed run keeps the
    # saved vocabulary (same ids), a new run builds a bigger one.
    with open(corpus / "a.txt", "a", encoding="utf-8") as f:
        f.write("Zebra\n")
    resumed = build_dataset(cfg)
    assert resumed.vocab_size == first.vocab_size
    assert resumed.tokenizer_digest == first.tokenizer_digest
    fresh = build_dataset(compose(["data=text", f"data.path={corpus}/a.txt",
                                   "data.tokenizer=char", *RUN]))  # fmt: skip
    assert fresh.vocab_size == first.vocab_size + 1


def test_separate_validation_files(corpus):
    cfg = compose(["data=text", f"data.path={corpus}/a.txt", f"data.val_path={corpus}/b.txt",
                   *RUN])  # fmt: skip
    data = build_dataset(cfg)
    assert len(data.train) == len(A.encode()) + 1
    assert len(data.val) == len(B.encode()) + 1


@pytest.mark.parametrize("fmt", ["bin", "npy"])
def test_pretokenized_files_give_the_same_batches_as_the_text(corpus, tmp_path, fmt):
    out = tmp_path / "tok"
    pretokenize([f"{corpus}/*.txt"], str(out), "char", val_fraction=0.1, fmt=fmt)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["files"][f"val.{fmt}"] > 0
    text = build_dataset(compose(["data=text", f"data.path={corpus}/*.txt",
                                  "data.tokenizer=char", *RUN]))  # fmt: skip
    tokens = build_dataset(compose(["data=tokens", f"data.path={out}/train.{fmt}",
                                    f"data.val_path={out}/val.{fmt}", *RUN]))  # fmt: skip
    assert tokens.vocab_size == text.vocab_size and tokens.eos_id == text.eos_id
    assert tokens.fingerprint() | {"kind": "text"} == text.fingerprint()
    same_batches(text, tokens)
    if fmt == "bin":
        assert isinstance(tokens.train.arrays[0], np.memmap)
    else:
        assert isinstance(tokens.train.arrays[0], np.memmap) or tokens.train.arrays[0].base


def test_tokens_without_meta_use_the_model_vocabulary_and_check_ids(tmp_path):
    ids = (np.arange(5000) % 50).astype(np.uint32)
    ids.tofile(tmp_path / "c.bin")
    cfg = compose(["data=tokens", f"data.path={tmp_path}/c.bin", "data.token_dtype=uint32",
                   *RUN])  # fmt: skip
    data = build_dataset(cfg)
    assert data.vocab_size is None and resolve_vocab(cfg, data) == cfg  # tiny: 64 tokens
    assert data.batch(0, 4, 32)["inputs"].max() < 50
    narrow = compose([*RUN, "data=tokens", f"data.path={tmp_path}/c.bin",
                      "data.token_dtype=uint32", "model.vocab_size=40"])  # fmt: skip
    with pytest.raises(UserError, match="not below the vocabulary size 40"):
        build_dataset(narrow).batch(0, 4, 32)


@pytest.mark.parametrize(
    "name, content, overrides, match",
    [
        ("c.bin", b"\x01\x00\x02", ["data.token_dtype=uint16"], "not a whole number"),
        ("c.npy", None, [], "shape"),
        ("c.txt", b"text", [], "neither .npy nor .bin"),
    ],
)
def test_bad_token_files(tmp_path, name, content, overrides, match):
    if content is None:
        np.save(tmp_path / name, np.zeros((4, 4), np.int32))
    else:
        (tmp_path / name).write_bytes(content)
    cfg = compose(["data=tokens", f"data.path={tmp_path}/{name}", *overrides, *RUN])
    with pytest.raises(ConfigError, match=match) as e:
        build_dataset(cfg)
    assert e.value.key == "data.path"


def test_a_meta_json_with_a_dtype_of_no_token_file_is_refused(corpus, tmp_path):
    pretokenize([f"{corpus}/a.txt"], str(tmp_path / "t"), "byte")
    meta = json.loads((tmp_path / "t" / "meta.json").read_text())
    (tmp_path / "t" / "meta.json").write_text(json.dumps({**meta, "dtype": "int8"}))
    cfg = compose(["data=tokens", f"data.path={tmp_path}/t/train.bin", *RUN])
    with pytest.raises(ConfigError, match=r"meta\.json beside the files gives dtype 'int8'") as e:
        build_dataset(cfg)
    assert e.value.key == "data.path"


def test_tokens_with_a_tokenizer_that_does_not_match_meta(corpus, tmp_path):
    pretokenize([f"{corpus}/a.txt"], str(tmp_path / "t"), "char", val_fraction=0.2)
    cfg = compose(["data=tokens", f"data.path={tmp_path}/t/train.bin", "data.tokenizer=byte",
                   f"data.val_path={tmp_path}/t/val.bin", *RUN])  # fmt: skip
    with pytest.raises(ConfigError, match="corpus was made with") as e:
        build_dataset(cfg)
    assert e.value.key == "data.tokenizer"


def test_pretokenize_command_line(corpus, tmp_path, capsys):
    out = tmp_path / "cli"
    pretokenize_main([f"{corpus}/*.txt", "--out", str(out), "--doc-separator", "\\n"])
    assert "train.bin" in capsys.readouterr().out
    ids = np.fromfile(out / "train.bin", np.uint16)
    assert (ids == 256).sum() == TEXT.count("\n")  # every line a document
    with pytest.raises(SystemExit) as e:
        pretokenize_main([str(tmp_path / "missing.txt"), "--out", str(out)])
    assert e.value.code == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["data=text"], "data.path"),
        (["data=text", "data.path=x", "data.val_fraction=1.0"], "data.val_fraction"),
        (["data=text", "data.path=x", "data.val_fraction=0"], "data.val_fraction"),
        (["data=tokens", "data.path=x", "data.token_dtype=int8"], "data.token_dtype"),
        (["data=tokens", "data.path=x", "data.tokenizer=char"], "data.tokenizer"),
        (["data=text", "data.path=x", "data.prefetch=-1"], "data.prefetch"),
        (["data.name=csv"], "data.name"),
    ],
)
def test_config_checks_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        compose(overrides)
    assert e.value.key == key
