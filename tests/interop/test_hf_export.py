"""`nnxtrain-export`: a run trained with the CLI becomes an HF directory that transformers
loads with no missing or unexpected keys, whose logits equal nnxtrain's forward on the
checkpoint's parameters; bad input is one line and exit 2."""

import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import cli_env, run_cli
from hf_models import TOLERANCE, hf_model, tensors, word_tokenizer

from nnxtrain.checkpoint.model import read_model

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
    done = run_cli(args, cwd=tmp)
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


def test_export_in_bfloat16(run_dir, tmp_path):
    done = export(str(run_dir), str(tmp_path / "hf"), "--step", "4", "--dtype", "bfloat16")
    assert done.returncode == 0, done.stderr
    assert {t.dtype.name for t in tensors(tmp_path / "hf").values()} == {"bfloat16"}


def test_the_console_script_is_registered():
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts["nnxtrain-export"] == "nnxtrain.cli.export:main"


def test_bad_input_is_one_line_and_exit_2(run_dir, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    cases = {
        "has no complete checkpoint": [str(tmp_path), str(tmp_path / "a")],
        "--step 3: ": [str(run_dir), str(tmp_path / "b"), "--step", "3"],
        "is not empty": [str(run_dir), str(tmp_path / "full")],
        "is not a directory": [str(tmp_path / "nope"), str(tmp_path / "c")],
    }
    for expected, args in cases.items():
        done = export(*args)
        assert done.returncode == 2, (expected, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (expected, done.stderr)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
