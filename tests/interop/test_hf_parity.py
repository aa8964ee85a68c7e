"""nnxtrain.interop.hf against transformers: float32 logits within 1e-4 of transformers' for every
supported variant, bitwise round trips, and exports transformers loads without a warning.

Run with `-s` to see the max abs diff of each case (the closing note's parity figures).
"""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_models import LLAMA3, TOLERANCE, hf_logits, hf_model, make_hf, tensors, tokens

import nnxtrain.interop.hf as hf
from nnxtrain.config import ModelConfig
from nnxtrain.model import Transformer

# name -> (make_hf arguments, sequence length). Rotary cases run past the 64 positions of
# LLAMA3's original_max_position_embeddings, where llama3 scaling changes the angles.
CASES = {
    "gqa-kv1": ({"num_key_value_heads": 1}, 24),
    "gqa-kv2": ({}, 24),
    "mha-kv4": ({"num_key_value_heads": 4}, 24),
    "tied": ({"tie_word_embeddings": True}, 24),
    "rope-theta-500000": ({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}, 100),
    "rope-llama3": ({"rope_parameters": LLAMA3}, 100),
    "rope-linear": (
        {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}},
        100,
    ),
    "head-dim-32": ({"head_dim": 32}, 24),
    "sharded-index": ({"max_shard_size": "40KB"}, 24),
    "bf16-as-float32": ({"dtype": torch.bfloat16}, 24),
    "mistral": ({"kind": "mistral", "sliding_window": None, "num_key_value_heads": 1}, 24),
}


def _hub_form(path: Path) -> None:
    """Rewrites config.json as checkpoints on the Hub carry it (written by transformers 4):
    rope_theta and rope_scaling at the top level, no rope_parameters."""
    cfg = json.loads((path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope
    (path / "config.json").write_text(json.dumps(cfg))


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - b)))


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_equal_transformers(tmp_path, case):
    kwargs, length = CASES[case]
    path = make_hf(tmp_path / case, **kwargs)
    toks = tokens(length)
    model = hf.load(str(path), param_dtype="float32")
    assert model.cfg.param_dtype == "float32" and model.cfg.max_len == 128
    diff = _diff(model(jnp.asarray(toks)), hf_logits(path, toks))
    print(f"parity {case}: max abs diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_logits_equal_transformers_for_a_hub_style_config(tmp_path):
    path = make_hf(tmp_path / "hub", rope_parameters=LLAMA3)
    _hub_form(path)
    toks = tokens(100)
    model = hf.load(str(path))
    assert (model.cfg.rope_scaling, model.cfg.rope_original_max_len) == ("llama3", 64)
    diff = _diff(model(jnp.asarray(toks)), hf_logits(path, toks))
    print(f"parity rope-llama3 (hub config form): max abs diff {diff:.2e}")
    assert diff <= TOLERANCE


@pytest.mark.parametrize(
    "case", ["gqa-kv2", "tied", "rope-llama3", "head-dim-32", "bf16-as-float32", "sharded-index"]
)
def test_round_trip_is_bitwise(tmp_path, case):
    kwargs, _ = CASES[case]
    src = make_hf(tmp_path / "src", **kwargs)
    model = hf.load(str(src))  # the stored dtype: bfloat16 stays bfloat16
    hf.save(model, str(tmp_path / "out"))
    before, after = tensors(src), tensors(tmp_path / "out")
    assert sorted(before) == sorted(after)
    for name, t in before.items():
        assert after[name].dtype == t.dtype and after[name].shape == t.shape, name
        assert after[name].tobytes() == t.tobytes(), name
    a, b = hf_model(src)[0].config, hf_model(tmp_path / "out")[0].config
    for key in ("head_dim", "num_key_value_heads", "tie_word_embeddings", "rope_parameters"):
        assert getattr(a, key) == getattr(b, key), key


def _random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """An nnxtrain model whose weights are all random, norm scales included."""
    model = Transformer(cfg, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    for path, var in flat:
        shape = var.get_value().shape
        value = rng.uniform(0.5, 1.5, shape) if path[-1] == "scale" else rng.normal(0, 0.15, shape)
        var.set_value(jnp.asarray(value, jnp.float32))
    nnx.update(model, nnx.from_flat_state(flat))
    return model


EXPORTS = {
    "llama3-kv1-tied": ModelConfig(
        vocab_size=96,
        emb_dim=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=1,
        head_dim=16,
        mlp_dim=80,
        max_len=128,
        rope_theta=5e5,
        rope_scaling="llama3",
        rope_original_max_len=32,
        tie_embeddings=True,
        dtype="float32",
    ),
    "linear-head-dim-24-untied": ModelConfig(
        vocab_size=96,
        emb_dim=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=24,
        mlp_dim=80,
        max_len=128,
        rope_scaling="linear",
        rope_factor=2.0,
        dtype="float32",
    ),
}


@pytest.mark.parametrize("case", sorted(EXPORTS))
def test_export_loads_in_transformers_with_equal_logits(tmp_path, case):
    cfg = EXPORTS[case]
    model = _random_model(cfg)
    files = hf.save(model, str(tmp_path), max_shard_bytes=100_000)
    assert "model.safetensors.index.json" in files  # several shards
    assert ("lm_head.weight" in tensors(tmp_path)) != cfg.tie_embeddings
    reference, info = hf_model(tmp_path)
    assert all(not v for v in info.values()), info  # nothing missing, unexpected, mismatched
    toks = tokens(100, vocab=cfg.vocab_size)
    with torch.no_grad():
        theirs = reference(torch.tensor(toks, dtype=torch.long)).logits.numpy()
    diff = _diff(model(jnp.asarray(toks)), theirs)
    print(f"parity export {case}: max abs diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_bfloat16_export_is_read_as_bfloat16(tmp_path):
    model = _random_model(EXPORTS["llama3-kv1-tied"])
    hf.save(model, str(tmp_path), dtype="bfloat16")
    stored = tensors(tmp_path)
    assert {t.dtype.name for t in stored.values()} == {"bfloat16"}
    embed = np.asarray(model.embed[...]).astype(stored["model.embed_tokens.weight"].dtype)
    assert stored["model.embed_tokens.weight"].tobytes() == embed.tobytes()
    _, info = hf_model(tmp_path)
    assert all(not v for v in info.values()), info
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
