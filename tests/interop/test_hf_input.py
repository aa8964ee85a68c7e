"""Bad Hugging Face directories are one-line errors naming the config.json key or the file;
and importing nnxtrain (hf included) never imports torch or transformers.

The directories are written by nnxtrain.interop.hf.save from a tiny model, then spoiled: these
tests need neither torch nor transformers. The hostile ones (issue 24) are in
test_hf_untrusted.py, which uses this file's helpers.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, cli_env
from flax import nnx
from safetensors.numpy import load_file, save_file

import nnxtrain.interop.hf as hf
from nnxtrain import compose
from nnxtrain.errors import UserError
from nnxtrain.model import Transformer
from nnxtrain.parallel.mesh import build_mesh
from nnxtrain.train.accounting import step_flops
from nnxtrain.train.report import header


@pytest.fixture(scope="module")
def model() -> Transformer:
    return Transformer(TINY, rngs=nnx.Rngs(0))


def _saved(model: Transformer, path: Path, **kwargs) -> Path:
    hf.save(model, str(path), **kwargs)
    return path


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _error(path: Path) -> str:
    with pytest.raises(UserError) as err:
        hf.load(str(path))
    message = str(err.value)
    assert "\n" not in message and "Fix:" in message, message
    return message


# id -> (config.json changes, the key the error must name)
UNSUPPORTED = {
    "attention-bias": ({"attention_bias": True}, "'attention_bias'"),
    "mlp-bias": ({"mlp_bias": True}, "'mlp_bias'"),
    "rope-yarn": (
        {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
        "'rope_scaling.rope_type'",
    ),
    "rope-dynamic-v5-form": (
        {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
        "'rope_parameters.rope_type'",
    ),
    "rope-llama3-incomplete": (
        {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
        "'rope_scaling.low_freq_factor'",
    ),
    "moe": ({"num_local_experts": 8, "num_experts_per_tok": 2}, "'num_local_experts'"),
    # Mistral's window runs (issue 26); Qwen's layered windows (max_window_layers) do not
    "sliding-window": ({"model_type": "qwen2", "use_sliding_window": True}, "'sliding_window'"),
    "model-type": ({"model_type": "gpt2"}, "'model_type'"),
    "activation": ({"hidden_act": "gelu"}, "'hidden_act'"),
    "missing-key": ({"hidden_size": None}, "'hidden_size'"),
    "quantized": (
        {"quantization_config": {"quant_method": "bitsandbytes"}},
        "'quantization_config'",
    ),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_unsupported_config_names_the_key(model, tmp_path, case):
    changes, key = UNSUPPORTED[case]
    path = _saved(model, tmp_path)
    _edit_config(path, **changes)
    message = _error(path)
    assert f"config.json key {key}" in message and str(path) in message


def test_mistral_without_a_sliding_window_loads(model, tmp_path):
    path = _saved(model, tmp_path)
    _edit_config(path, model_type="mistral", sliding_window=None)
    assert hf.load(str(path)).cfg.num_kv_heads == TINY.num_kv_heads


def test_a_missing_shard_is_named(model, tmp_path):
    path = _saved(model, tmp_path, max_shard_bytes=2000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    os.remove(path / shard)
    message = _error(path)
    assert shard in message and "is missing" in message


def test_a_shape_mismatch_names_the_tensor_and_the_keys(model, tmp_path):
    path = _saved(model, tmp_path)
    _edit_config(path, intermediate_size=TINY.mlp_dim * 2)
    message = _error(path)
    assert "mlp.gate_proj.weight" in message and "intermediate_size" in message
    assert f"[{TINY.mlp_dim}, {TINY.emb_dim}]" in message


def test_a_missing_tensor_and_a_missing_directory(model, tmp_path):
    assert "is not a directory" in _error(tmp_path / "nope")
    assert "has no config.json" in _error(tmp_path)
    path = _saved(model, tmp_path / "m")
    _edit_config(path, num_hidden_layers=TINY.num_layers + 1)
    assert f"model.layers.{TINY.num_layers}." in _error(path)


def test_an_unknown_tensor_is_named(model, tmp_path):
    path = _saved(model, tmp_path)
    weights = load_file(str(path / "model.safetensors"))
    weights["model.layers.0.self_attn.q_proj.bias"] = np.zeros(TINY.emb_dim, np.float32)
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    assert "model.layers.0.self_attn.q_proj.bias has no place" in _error(path)


def test_save_never_overwrites_a_model(model, tmp_path):
    path = _saved(model, tmp_path)
    before = (path / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="already holds a model"):
        hf.save(Transformer(TINY, rngs=nnx.Rngs(1)), str(path))
    assert (path / "model.safetensors").read_bytes() == before


def test_saved_files_get_the_mode_of_any_new_file(model, tmp_path):
    """safetensors writes a private temporary file and renames it: the model was 0600."""
    (tmp_path / "reference").write_text("")  # the mode open() gives here (0o666 - umask)
    expected = (tmp_path / "reference").stat().st_mode & 0o777
    assert expected != 0o600, "the test needs a umask that leaves files readable by others"
    single = _saved(model, tmp_path / "single")
    sharded = _saved(model, tmp_path / "sharded", max_shard_bytes=4096)
    files = [*single.iterdir(), *sharded.iterdir()]
    assert len([f for f in files if f.suffix == ".safetensors"]) > 2
    assert {f.name: f.stat().st_mode & 0o777 for f in files} == dict.fromkeys(
        (f.name for f in files), expected
    )


def test_a_model_is_named_by_its_path_as_given(model, tmp_path, monkeypatch):
    """A Hugging Face folder is often just `model`: the header read "model model"."""
    _saved(model, tmp_path / "tiny" / "model")
    monkeypatch.chdir(tmp_path)
    cfg = compose(["run.init_from=tiny/model/", "mesh=single", "run.seq_len=16"])
    mesh = build_mesh(cfg.mesh)
    flops = step_flops(cfg.model, cfg.run.batch_size, cfg.run.seq_len, mesh.size)
    first = header(cfg, mesh, flops, 0, None).splitlines()[0]
    assert first.startswith("nnxtrain: model tiny/model | mesh "), first
    monkeypatch.chdir(tmp_path / "tiny" / "model")
    assert hf.load(".").cfg.name == "model"  # "." names the folder


def test_importing_nnxtrain_does_not_import_torch_or_transformers():
    code = (
        "import sys, nnxtrain, nnxtrain.interop.hf, nnxtrain.cli.export; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
