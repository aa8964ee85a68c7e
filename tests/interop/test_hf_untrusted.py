"""A downloaded Hugging Face directory is untrusted input (issue 24): an index naming shards
outside it, absurd sizes, values of the wrong type or range, integer tensors and a missing
tokenizer are each one line, from `nnxtrain.hf.load` and from the CLI's run.init_from
alike, before anything is built, and nothing outside the directory is opened. A Hub cache
snapshot (shards as symlinks into ../../blobs) still loads.

The directories are written by nnxtrain.interop.hf.save from a tiny model, then spoiled
(test_hf_input.py's helpers): no torch, no transformers. The CLI cases run in-process.
"""

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import TINY, assert_one_line_error, run_cli_in_process
from flax import nnx
from safetensors.numpy import load_file, save_file
from test_hf_input import _edit_config, _error, _saved

import nnxtrain.interop.hf as hf
import nnxtrain.interop.hf.reader as reader_module
from nnxtrain import compose
from nnxtrain.errors import ConfigError
from nnxtrain.model import Transformer


@pytest.fixture(scope="module")
def model() -> Transformer:
    return Transformer(TINY, rngs=nnx.Rngs(0))


def _cli_error(path: Path, key: str, cwd: Path, *args: str) -> str:
    """The CLI's run.init_from=path: exit 2 and one line naming `key`, quickly (the bound,
    generous for a loaded machine, only proves that no model was built nor step compiled:
    the absurd sizes took minutes)."""
    t0 = time.perf_counter()
    proc = run_cli_in_process([f"run.init_from={path}", "run.steps=1", *args], cwd)
    assert time.perf_counter() - t0 < 30
    assert_one_line_error(proc, key)
    return proc.stderr.strip()


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """Every file the reader hands to safetensors (whose opens happen in Rust, out of
    Python's sight: this is where each starts), as an absolute path."""
    files: list[str] = []
    real = reader_module.safe_open

    def spy(file: str, **kwargs):
        files.append(os.path.abspath(file))
        return real(file, **kwargs)

    monkeypatch.setattr(reader_module, "safe_open", spy)
    return files


# id -> the name the index gives a shard, `outside` being a valid shard beside the model dir
OUTSIDE = {
    "parent": lambda outside: "../outside.safetensors",
    "absolute": str,
    "through-a-subfolder": lambda outside: "sub/../../outside.safetensors",
    "etc-passwd": lambda outside: "/etc/passwd",
    "empty": lambda outside: "",
}


@pytest.mark.parametrize("case", sorted(OUTSIDE))
def test_shard_names_stay_inside_the_model_dir(model, tmp_path, opened, case):
    """A valid shard outside the dir was read and trained on silently; /etc/passwd was opened
    and its header parsed. Refused by the name the index gives, before any file is opened."""
    path = _saved(model, tmp_path / "m", max_shard_bytes=2000)
    (path / "sub").mkdir()
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    outside = tmp_path / "outside.safetensors"
    shutil.copyfile(path / shard, outside)
    name = OUTSIDE[case](outside)
    index["weight_map"] = {t: name if f == shard else f for t, f in index["weight_map"].items()}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    message = _error(path)
    assert f'in "{name}", which is not a file name inside {path}' in message, message
    if case == "parent":
        line = _cli_error(path, "model.safetensors.index.json", tmp_path)
        assert line.startswith(f"nnxtrain: error: run.init_from: {path}/model.safetensors.index")
    assert opened == []  # nothing opened, outside the dir or in it


def test_a_hub_cache_snapshot_loads_through_its_symlinks(model, tmp_path):
    """The Hub's cache keeps each file once in blobs/, linked from snapshots/<revision>/:
    the names stay inside, the links lead out, and it loads. An index that names
    ../../blobs/<hash> itself is refused like any name outside."""
    saved = _saved(model, tmp_path / "saved", max_shard_bytes=2000)
    blobs, snapshot = tmp_path / "hub" / "blobs", tmp_path / "hub" / "snapshots" / "0a1b2c"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in saved.iterdir():
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blobs / digest)
        (snapshot / file.name).symlink_to(f"../../blobs/{digest}")
    assert len([f for f in snapshot.iterdir() if f.suffix == ".safetensors"]) > 2
    loaded = jax.tree.leaves(nnx.state(hf.load(str(snapshot))))
    for a, b in zip(loaded, jax.tree.leaves(nnx.state(model)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    index_file = snapshot / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    blob = os.readlink(snapshot / shard)
    index["weight_map"] = {t: blob if f == shard else f for t, f in index["weight_map"].items()}
    index_file.unlink()
    index_file.write_text(json.dumps(index))
    assert f'"{blob}", which is not a file name inside' in _error(snapshot)


# id -> (config.json changes, what the line must say); the first three are the issue's
ABSURD = {
    "hidden_size": ({"hidden_size": 10**9}, "'hidden_size' (1000000000) makes it"),
    "num_hidden_layers": ({"num_hidden_layers": 10**7}, "'num_hidden_layers' is 10000000,"),
    "vocab_size": ({"vocab_size": 10**12}, "'vocab_size' (1000000000000) makes it"),
    "intermediate_size": ({"intermediate_size": 10**9}, "'intermediate_size' (1000000000)"),
    "num_attention_heads": ({"num_attention_heads": 10**6}, "'num_attention_heads' (1000000)"),
    "head_dim": ({"head_dim": 10**8}, "'head_dim' (100000000) make it"),
    "as-a-float": ({"hidden_size": 1e9}, "'hidden_size' is 1000000000.0, not an integer"),
}


@pytest.mark.parametrize("case", sorted(ABSURD))
def test_absurd_sizes_are_one_line_before_anything_is_built(model, tmp_path, case):
    """`hidden_size: 1e9` and `num_hidden_layers: 1e7` hung for minutes, `vocab_size: 1e12`
    ended in an OverflowError: config.json is compared with the safetensors headers first."""
    changes, says = ABSURD[case]
    path = _saved(model, tmp_path / "m")
    _edit_config(path, **changes)
    assert says in _error(path)
    if case in ("hidden_size", "num_hidden_layers", "vocab_size"):
        key = says.split("'")[1]
        assert says in _cli_error(path, f"config.json key '{key}'", tmp_path)


# id -> (config.json changes, the key the line must name): each value of the wrong type
WRONG_TYPES = {
    "vocab-size-string": ({"vocab_size": "abc"}, "vocab_size"),
    "max-position-null": ({"max_position_embeddings": None}, "max_position_embeddings"),
    "rope-theta-string": ({"rope_theta": "abc"}, "rope_theta"),
    "layers-bool": ({"num_hidden_layers": True}, "num_hidden_layers"),
    "intermediate-list": ({"intermediate_size": [24]}, "intermediate_size"),
    "heads-null": ({"num_attention_heads": None}, "num_attention_heads"),
    "kv-heads-string": ({"num_key_value_heads": "2"}, "num_key_value_heads"),
    "head-dim-float": ({"head_dim": 8.0}, "head_dim"),
    "eps-string": ({"rms_norm_eps": "1e-5"}, "rms_norm_eps"),
    "eps-huge-int": ({"rms_norm_eps": 10**400}, "rms_norm_eps"),
    "tie-int": ({"tie_word_embeddings": 1}, "tie_word_embeddings"),
    "init-null": ({"initializer_range": None}, "initializer_range"),
    "bias-zero": ({"attention_bias": 0}, "attention_bias"),
    "rope-scaling-string": ({"rope_scaling": "linear"}, "rope_scaling"),
    "rope-factor-string": (
        {"rope_scaling": {"rope_type": "linear", "factor": "4"}},
        "rope_scaling.factor",
    ),
    "rope-original-float": (
        {
            "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}
            | {"high_freq_factor": 4.0, "original_max_position_embeddings": 64.5}
        },
        "rope_parameters.original_max_position_embeddings",
    ),
    "partial-bool": ({"partial_rotary_factor": True}, "partial_rotary_factor"),
}


@pytest.mark.parametrize("case", sorted(WRONG_TYPES))
def test_a_value_of_the_wrong_type_names_its_key(model, tmp_path, case):
    changes, key = WRONG_TYPES[case]
    path = _saved(model, tmp_path)
    _edit_config(path, **changes)
    assert f"config.json key '{key}' is " in _error(path)


# id -> (config.json changes, the key, the problem): the CLI's model checks, from Python too
LLAMA3_BANDS = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 16}
OUT_OF_RANGE = {
    "eps-negative": ({"rms_norm_eps": -1}, "rms_norm_eps", "must be > 0, got -1.0"),
    "theta-zero": ({"rope_theta": 0}, "rope_theta", "must be > 0, got 0.0"),
    "heads-zero": ({"num_attention_heads": 0}, "num_attention_heads", "must be positive"),
    "kv-heads-3": (
        {"num_key_value_heads": 3},
        "num_key_value_heads",
        "must divide the number of query heads (4), got 3",
    ),
    "head-dim-odd": ({"head_dim": 7}, "head_dim", "must be even"),
    "init-negative": ({"initializer_range": -0.1}, "initializer_range", "must be > 0"),
    "max-len-zero": ({"max_position_embeddings": 0}, "max_position_embeddings", "must be"),
    "llama3-bands": (
        {"rope_scaling": {**LLAMA3_BANDS, "low_freq_factor": 4.0, "high_freq_factor": 1.0}},
        "rope_scaling.high_freq_factor",
        "must be > the low-frequency factor (4.0), got 1.0",
    ),
}


@pytest.mark.parametrize("case", sorted(OUT_OF_RANGE))
def test_python_and_the_cli_refuse_the_same_values(model, tmp_path, case):
    """nnxtrain.hf.load ran none of the CLI's checks: rms_norm_eps -1 and rope_theta 0 loaded
    and computed NaN. Both run `validate_model`, and name the config.json key."""
    changes, key, problem = OUT_OF_RANGE[case]
    path = _saved(model, tmp_path / "m")
    _edit_config(path, **changes)
    message = _error(path)
    assert message.startswith(f"{path}: config.json key '{key}' {problem}"), message
    if case in ("eps-negative", "theta-zero"):
        assert f"config.json key '{key}' {problem}" in _cli_error(path, key, tmp_path)


def test_tensors_must_hold_floats(model, tmp_path):
    """int8, int64 and bool tensors (a quantized checkpoint, say) were cast to float32 and
    trained as garbage: one line naming the tensor and its file. float64 is read."""
    path = _saved(model, tmp_path / "m")
    original = load_file(str(path / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"
    for dtype, shown in ((np.int8, "int8"), (np.int64, "int64"), (np.bool_, "bool")):
        weights = dict(original)
        weights[name] = original[name].astype(dtype)
        save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
        message = _error(path)
        assert f"{path}/model.safetensors: tensor {name} holds {shown}, not floats" in message
    _cli_error(path, f"tensor {name} holds bool", tmp_path)
    weights = {k: v.astype(np.float64) for k, v in original.items()}
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    assert hf.load(str(path)).cfg.param_dtype == "float32"


def test_an_hf_dir_without_a_tokenizer_needs_data_tokenizer(model, tmp_path):
    """save_pretrained of a model alone writes no tokenizer: fine-tuning on text then used
    the byte tokenizer, ids the model never saw, and nnxtrain-generate refused the dir."""
    path = _saved(model, tmp_path / "m")
    (tmp_path / "corpus.txt").write_text("some text to read " * 50)
    (tmp_path / "chats.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    text = ["data=text", f"data.path={tmp_path}/corpus.txt"]
    jsonl = ["data=jsonl", f"data.path={tmp_path}/chats.jsonl"]
    for data in (text, jsonl):
        with pytest.raises(ConfigError) as err:
            compose([f"run.init_from={path}", *data])
        assert str(err.value).startswith(f"data.tokenizer: run.init_from={path} holds no ")
    line = _cli_error(path, "data.tokenizer", tmp_path, *text)
    assert "Fix: set data.tokenizer to the model's tokenizer.json or tokenizer.model" in line
    given = compose([f"run.init_from={path}", *text, "data.tokenizer=byte", "run.seq_len=16"])
    assert given.data.tokenizer == "byte"
