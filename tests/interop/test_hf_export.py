"""`nnxtrain-export`: a run trained with the CLI becomes an HF directory that transformers
loads with no missing or unexpected keys, whose logits equal nnxtrain's forward on the
checkpoint's parameters, in any of the dtypes the API writes; bad input is one line
(`nnxtrain-export: error: ...`) and exit 2, found before anything is written, and a write
that fails on the way leaves no half-written directory."""

import errno
import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import cli_env, run_cli_in_process
from hf_models import TOLERANCE, hf_model, tensors, word_tokenizer

from nnxtrain.checkpoint.model import read_model
from nnxtrain.cli.export import check_float16, main
from nnxtrain.errors import UserError

pytestmark = pytest.mark.slow

TEXT = "the cat sat on the mat . the dog sat on the log . a cat and a dog met . " * 20


def export(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nnxtrain.cli.export", *args],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("run")
    (tmp / "corpus.txt").write_text(TEXT)
    tokenizer = word_tokenizer(tmp / "tokenizer.json", TEXT)
    args = ["model=tiny", "mesh=single", "run.steps=4", "run.batch_size=2", "run.seq_len=16"]
    args += ["run.eval_every=0", "data=text", f"data.path={tmp}/corpus.txt"]
    args += [f"data.tokenizer={tokenizer}", f"run.dir={tmp}/run"]
    done = run_cli_in_process(args, tmp)
    assert done.returncode == 0, done.stderr[-2000:]
    return tmp / "run"


def test_export_loads_in_transformers_with_nnxtrains_logits(run_dir, tmp_path):
    out = tmp_path / "hf"
    done = export(str(run_dir), str(out))
    assert done.returncode == 0, done.stderr
    assert (out / "tokenizer.json").read_bytes() == (run_dir.parent / "tokenizer.json").read_bytes()
    config = json.loads((out / "config.json").read_text())
    vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    assert config["eos_token_id"] == vocab["</s>"]
    assert {t.dtype.name for t in tensors(out).values()} == {"float32"}  # as trained

    reference, info = hf_model(out)
    assert all(not v for v in info.values()), info
    ckpt, _, model = read_model(str(run_dir))
    step = ckpt.step
    assert step == 4
    toks = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (2, 16), dtype=np.int32)
    with torch.no_grad():
        theirs = reference(torch.tensor(toks, dtype=torch.long)).logits.numpy()
    diff = float(np.max(np.abs(np.asarray(model(jnp.asarray(toks))) - theirs)))
    print(f"parity nnxtrain-export of a trained run: max abs diff {diff:.2e}")
    assert diff <= TOLERANCE


def export_in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """`nnxtrain-export ARGS` run by its main() in this process: (exit code, stderr)."""
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_export_in_another_dtype(run_dir, tmp_path, capsys, dtype):
    code, err = export_in_process(capsys, str(run_dir), str(tmp_path / "hf"), "--dtype", dtype)
    assert code == 0, err
    written = tensors(tmp_path / "hf")
    assert {t.dtype.name for t in written.values()} == {dtype}
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == dtype
    _, _, model = read_model(str(run_dir))
    trained = np.asarray(model.embed[...])  # float32, as trained
    np.testing.assert_array_equal(written["model.embed_tokens.weight"], trained.astype(dtype))


def test_the_console_script_is_registered():
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts["nnxtrain-export"] == "nnxtrain.cli.export:main"


def test_a_float16_export_of_weights_past_its_range_is_refused(run_dir):
    _, _, model = read_model(str(run_dir))
    check_float16(model)  # a trained tiny model fits
    model.embed[...] = model.embed[...].at[3, 1].set(1e5)  # float16's largest is 65504
    with pytest.raises(UserError, match=r"--dtype float16: the parameter embed reaches 1e\+05"):
        check_float16(model)


NOT_ROOT = pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("no checkpoint", "has no complete checkpoint"),
        ("no such step", "--step 3: "),
        ("not a directory", "is not a directory"),
        ("out is not empty", "is not empty"),
        ("out is a file", "OUT_DIR {tmp}/file is a file, not a directory"),
        ("out's parent is a file", "cannot be created: {tmp}/file is a file"),
        pytest.param(
            "no permission",
            "cannot be created: no permission to write in {tmp}/ro",
            marks=NOT_ROOT,
        ),
        pytest.param("out is read-only", "{tmp}/ro: no permission", marks=NOT_ROOT),
        ("a float64 dtype", "argument --dtype: invalid choice: 'float64'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(run_dir, tmp_path, capsys, case, says):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    (tmp_path / "file").write_text("mine")
    (tmp_path / "ro").mkdir(mode=0o500)
    run, out = str(run_dir), str(tmp_path / "out")
    args = {
        "no checkpoint": [str(tmp_path), out],
        "no such step": [run, out, "--step", "3"],
        "not a directory": [str(tmp_path / "nope"), out],
        "out is not empty": [run, str(tmp_path / "full")],
        "out is a file": [run, str(tmp_path / "file")],
        "out's parent is a file": [run, str(tmp_path / "file" / "hf")],
        "no permission": [run, str(tmp_path / "ro" / "hf")],
        "out is read-only": [run, str(tmp_path / "ro")],
        "a float64 dtype": [run, out, "--dtype", "float64"],
    }[case]
    code, err = export_in_process(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("nnxtrain-export: error: "), err
    assert says.format(tmp=tmp_path) in lines[0] and "Fix:" in lines[0], lines[0]
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert (tmp_path / "file").read_text() == "mine"
    assert not (tmp_path / "out").exists() and not os.listdir(tmp_path / "ro")


@pytest.mark.parametrize("out_exists", [False, True])
def test_a_write_that_fails_leaves_nothing_half_written(
    run_dir, tmp_path, capsys, monkeypatch, out_exists
):
    import nnxtrain.interop.hf as hf

    def disk_full_after_the_weights(*args, **kwargs):
        write_shards(*args, **kwargs)  # model.safetensors is on disk, then:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    write_shards = hf.write_shards
    monkeypatch.setattr(hf, "write_shards", disk_full_after_the_weights)
    out = tmp_path / "new" / "hf"
    if out_exists:
        out.mkdir(parents=True)
    code, err = export_in_process(capsys, str(run_dir), str(out))
    assert code == 2, err
    assert err.startswith(f"nnxtrain-export: error: OUT_DIR {out}: ") and "\n" not in err.strip()
    assert "No space left on device" in err
    if out_exists:  # the empty directory given stays, empty
        assert os.listdir(out) == []
    else:  # every directory the export created is gone
        assert not (tmp_path / "new").exists()
