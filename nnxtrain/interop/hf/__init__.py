"""Hugging Face Llama checkpoints in and out: `load` an HF directory as a `Transformer`,
`save` a `Transformer` as a directory that transformers loads.

    model = nnxtrain.hf.load("TinyLlama-1.1B")                   # weights in their stored dtype
    model = nnxtrain.hf.load(path, param_dtype="float32", mesh=mesh)   # straight into shards
    logits = model(tokens)
    nnxtrain.hf.save(model, "out", tokenizer_dir="TinyLlama-1.1B", dtype="bfloat16")

`config` maps config.json to and from `ModelConfig` (and refuses what the decoder cannot
represent; `keys` types each key and gives transformers' defaults), `weights` maps tensor
names and layouts and writes safetensors, `reader` reads them and checks them against
config.json. `open_model(path)` runs every check that needs no tensor's data, before
anything is built: `load` and `run.init_from` both start with it. Reading needs only
`safetensors` and numpy: importing this never imports torch or transformers.
docs/interop.md is the manual (the weight map, what is supported, what errors).
"""

import dataclasses
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, Sharding, SingleDeviceSharding

from nnxtrain.config import DTYPES, ModelConfig
from nnxtrain.errors import UserError
from nnxtrain.interop.hf.config import from_model_config, read_config, to_model_config
from nnxtrain.interop.hf.reader import Reader
from nnxtrain.interop.hf.weights import (
    Weight,
    hf_shape,
    hf_slots,
    put_nnx,
    to_hf,
    weights_of,
    write_shards,
)
from nnxtrain.model import Transformer
from nnxtrain.parallel.sharding import DEFAULT_RULES, state_shardings

__all__ = ["TOKENIZER_FILES", "load", "save"]

INDEX_SUFFIX = ".safetensors.index.json"
MAX_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size, "5GB"
# What a tokenizer directory may hold that transformers' AutoTokenizer reads.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
Rules = Mapping[str, tuple[str, ...] | None]


def load(
    path: str,
    *,
    param_dtype: str | None = None,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
) -> Transformer:
    """The `Transformer` stored in HF directory `path` (config.json and safetensors).

    `param_dtype`: the parameters' dtype (None: as stored). With a `mesh`, each parameter
    lands directly in its shards, laid out by the logical-axis `rules` (default: nnxtrain's
    `DEFAULT_RULES`); without one, on JAX's default device. Tensors are read one at a time,
    so host memory holds one parameter beyond the model. Bad input is a `UserError`.
    """
    if param_dtype is not None and param_dtype not in DTYPES:
        raise UserError(f"param_dtype={param_dtype!r} is unknown. Fix: use one of {DTYPES}.")
    cfg, reader = open_model(path)
    dtype = param_dtype or reader.dtype("model.embed_tokens.weight")
    cfg = dataclasses.replace(cfg, param_dtype=dtype)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    flat = dict(nnx.to_flat_state(state))
    shardings: dict[Any, Sharding]
    if mesh is None:
        shardings = dict.fromkeys(flat, SingleDeviceSharding(jax.devices()[0]))
    else:
        placed = state_shardings(state, mesh, DEFAULT_RULES if rules is None else rules)
        shardings = {p: v.get_value() for p, v in nnx.to_flat_state(placed)}
    # The largest parameters first: host memory peaks while one is assembled, and this
    # way that happens while few others are resident yet.
    order = sorted(weights_of(cfg), key=lambda w: -flat[w.path].get_value().size)
    values: dict[Any, jax.Array] = {}
    for w in order:
        host = _assemble(reader, w, flat[w.path].get_value().shape, dtype, cfg)
        values[w.path] = _place(host, shardings[w.path])
        del host
    for p, var in flat.items():
        var.set_value(values[p])
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def open_model(path: str) -> tuple[ModelConfig, Reader]:
    """The model of HF directory `path` (its ModelConfig, parameters float32) and the
    reader of its weights, after every check that reads no tensor's data: config.json's
    keys, types, defaults and ranges; the index's shard names (inside `path`); the
    headers' names, shapes and dtypes against config.json. Quick whatever config.json
    claims: nothing is built. Bad input is a one-line `UserError`."""
    cfg = to_model_config(read_config(path), path, param_dtype="float32")
    reader = Reader(path)
    reader.check(cfg, ignore={"lm_head.weight"} if cfg.tie_embeddings else set())
    return cfg, reader


def _place(host: np.ndarray, sharding: Sharding) -> jax.Array:
    """The array with each device's shard cut from `host` (only addressable ones)."""
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def _assemble(
    reader: Reader, w: Weight, shape: tuple[int, ...], dtype: str, cfg: ModelConfig
) -> np.ndarray:
    """One parameter in nnxtrain's layout and `dtype`, read tensor by tensor."""
    host = np.empty(shape, np.dtype(jax.numpy.dtype(dtype)))
    for index, name in hf_slots(w, cfg):
        put_nnx(host[index], reader.read(name), w)
    return host


def save(
    model: Transformer,
    path: str,
    *,
    tokenizer_dir: str | None = None,
    dtype: str | None = None,
    bos_token_id: Any = None,
    eos_token_id: Any = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> list[str]:
    """Writes `model` as a Hugging Face directory at `path` (`LlamaForCausalLM`, or the
    family its switches make it: `families.family_of`); returns the files written.

    config.json and generation_config.json; the weights in `dtype` (None: the parameters'
    own) as `model.safetensors`, or as shards of at most `max_shard_bytes` with
    `model.safetensors.index.json`; a tied model has no `lm_head.weight`. The tokenizer
    files of `tokenizer_dir` (a directory, or one tokenizer.json / tokenizer.model file)
    are copied. Refuses a directory that already holds a model (nothing is overwritten).
    """
    cfg = model.cfg
    dtype = dtype or cfg.param_dtype
    if dtype not in DTYPES:
        raise UserError(f"dtype={dtype!r} is unknown. Fix: use one of {DTYPES}.")
    tokenizer_files = _tokenizer_files(tokenizer_dir) if tokenizer_dir else []
    # before anything is written: a model no family has is refused with nothing on disk
    config = from_model_config(
        cfg, dtype=dtype, bos_token_id=bos_token_id, eos_token_id=eos_token_id
    )
    if os.path.isdir(path) and any(
        n == "config.json" or n.endswith((".safetensors", INDEX_SUFFIX)) for n in os.listdir(path)
    ):
        raise UserError(f"{path} already holds a model. Fix: save to a new or empty directory.")
    os.makedirs(path, exist_ok=True)
    out = np.dtype(jax.numpy.dtype(dtype))
    params = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}

    def tensors() -> Iterator[tuple[str, tuple[int, ...], np.dtype, Any]]:
        for w in weights_of(cfg):
            value = params[w.path]
            for index, name in hf_slots(w, cfg):
                one = value.shape[len(index) :]
                yield name, hf_shape(w, one), out, lambda w=w, v=value, i=index: _host(v, i, w, out)

    files = write_shards(path, tensors(), max_shard_bytes)
    generation = {
        "_from_model_config": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
    }
    for name, obj in (("config.json", config), ("generation_config.json", generation)):
        with open(os.path.join(path, name), "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        files.append(name)
    for src in tokenizer_files:
        name = _tokenizer_name(src)
        shutil.copyfile(src, os.path.join(path, name))
        files.append(name)
    return files


def _host(value: jax.Array, index: tuple[int, ...], w: Weight, dtype: np.dtype) -> np.ndarray:
    """One HF tensor on the host: `index` (layer, expert) of a stacked parameter, in HF's
    layout."""
    a = np.asarray(value[index])
    return to_hf(a, w).astype(dtype, copy=False)


def _tokenizer_name(src: str) -> str:
    base = os.path.basename(src)
    if base in TOKENIZER_FILES:
        return base
    return "tokenizer.model" if base.endswith(".model") else "tokenizer.json"


def _tokenizer_files(src: str) -> list[str]:
    """The tokenizer files to copy from a directory, or the one file given."""
    if os.path.isfile(src):
        if not src.endswith((".json", ".model")):
            raise UserError(
                f"tokenizer {src} is neither a tokenizer.json nor a SentencePiece .model. "
                "Fix: give one of those, or a directory holding them."
            )
        return [src]
    if not os.path.isdir(src):
        raise UserError(f"tokenizer_dir {src} does not exist. Fix: give a directory or file.")
    found = [os.path.join(src, n) for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
    if not found:
        raise UserError(
            f"tokenizer_dir {src} holds none of {', '.join(TOKENIZER_FILES[:2])}. "
            "Fix: give the directory of the tokenizer the model was trained with."
        )
    return found
