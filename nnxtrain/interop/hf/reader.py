"""Reading the safetensors files of a Hugging Face directory, and checking them against
config.json before anything is built or read.

    reader = Reader(path)         # model.safetensors, or the shards the index names
    reader.check(cfg, ignore)     # names, shapes and dtypes against config.json: one line
    t = reader.read("model.norm.weight")   # one tensor, as numpy

A downloaded directory is untrusted input: the index may name any file. Every shard name
must be a plain file name in the directory (no `..`, no absolute path, no subfolder),
checked before any file is opened. Where a name leads is not checked: a Hub cache
snapshot holds its files as symlinks into ../../blobs, and those load.

`check` compares config.json with the headers alone, so absurd sizes (`hidden_size: 1e9`,
`num_hidden_layers: 1e7`, `vocab_size: 1e12`) are one line naming the key within
milliseconds, not a model built (or a step compiled) first: the layer count first (the
names of 1e7 layers are never made), then one dimension at a time, naming the key that
gives it. A tensor the model reads must hold floats (safetensors validates that each
header's sizes fit its file, so a header cannot claim more than the file holds).
"""

import json
import os
import re
from collections.abc import Set
from operator import attrgetter
from typing import Any

import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy, which safetensors needs
import numpy as np
from safetensors import safe_open

from nnxtrain.config import ModelConfig
from nnxtrain.errors import UserError, first_line
from nnxtrain.interop.hf.keys import shown
from nnxtrain.interop.hf.weights import Weight, hf_dims, hf_names, weights_of

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Buffers some older checkpoints carry; recomputed from config.json, never read.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# safetensors' float dtypes: the parameters' dtype when kept as stored (float64: float32)
FLOATS = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float32"}
_TYPE_NAMES = {"I8": "int8", "U8": "uint8", "I16": "int16", "I32": "int32", "I64": "int64"}
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
# Checked first, each the first tensor to depend on a new key: a mismatch names that key.
_FIRST = ("model.norm.weight", "model.embed_tokens.weight", "model.layers.{i}.mlp.gate_proj.weight")
# config.json key -> the ModelConfig field it became
_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "emb_dim",
    "intermediate_size": "mlp_dim",
    "num_attention_heads": "num_heads",
    "num_key_value_heads": "num_kv_heads",
    "head_dim": "head_dim",
    "num_local_experts": "moe.experts",
    "num_experts": "moe.experts",
    "moe_intermediate_size": "moe.mlp_dim",
}


def _open(file: str) -> Any:  # safetensors gives its handle no public type
    try:
        return safe_open(file, framework="numpy")
    except Exception as e:
        raise UserError(
            f"{file} is not a readable safetensors file ({first_line(e)}). "
            "Fix: download or write it again."
        ) from e


def _shard_files(path: str, index: str) -> dict[str, str]:
    """Tensor name -> file, from the index; every file name checked before any is opened."""
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        items = list(weight_map.items())
    except (OSError, ValueError, RecursionError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{index} is unreadable ({first_line(e)}). Fix: repair it.") from e
    for name, file in items:
        plain = isinstance(file, str) and file not in ("", ".", "..")
        if not (plain and os.path.basename(file) == file and "\\" not in file and "\0" not in file):
            raise UserError(
                f"{index} puts tensor {shown(name)} in {shown(file, 300)}, which is not a file "
                f"name inside {path}. Fix: a shard must be a file beside the index "
                "(download the model again from a source you trust)."
            )
    return {str(name): os.path.join(path, file) for name, file in items}


class Reader:
    """The tensors of an HF model directory: `model.safetensors`, or the shards that
    `model.safetensors.index.json` names. Reads headers at once, tensors one at a time."""

    def __init__(self, path: str):
        index = os.path.join(path, INDEX)
        if os.path.isfile(index):
            files = _shard_files(path, index)
            for file in sorted(set(files.values())):
                if not os.path.isfile(file):
                    raise UserError(
                        f"{file} is missing: {INDEX} puts weights in it. "
                        "Fix: download the missing shard."
                    )
        elif os.path.isfile(os.path.join(path, SINGLE)):
            file = os.path.join(path, SINGLE)
            with _open(file) as f:
                files = dict.fromkeys(f.keys(), file)
        else:
            raise UserError(
                f"{path} has neither {SINGLE} nor {INDEX}. Fix: give a directory with "
                "safetensors weights (convert .bin weights with transformers first)."
            )
        self.path, self.files = path, files
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for file in sorted(set(files.values())):
            with _open(file) as f:
                for name in f.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                    if files.get(name) == file:
                        s = f.get_slice(name)
                        self.shapes[name] = tuple(s.get_shape())
                        self.dtypes[name] = str(s.get_dtype())
        lost = [n for n in files if n not in self.shapes]
        if lost:
            raise UserError(
                f"{files[lost[0]]} lacks tensor {lost[0]} that {INDEX} puts there. "
                "Fix: download that shard again."
            )

    def dtype(self, name: str) -> str:
        """The parameters' dtype for a stored tensor's (float32 for float64)."""
        return FLOATS.get(self.dtypes.get(name, ""), "float32")

    def check(self, cfg: ModelConfig, ignore: Set[str] = frozenset()) -> None:
        """The files hold every tensor of a model of `cfg` (config.json's), in its shape and
        a float dtype, and nothing the model has no place for (`ignore` and old rotary
        buffers aside): one-line errors naming the config.json key, before any read."""
        self._check_layers(cfg.num_layers)
        weights = weights_of(cfg)
        first = [w for name in _FIRST for w in weights if w.hf == name]
        expected: set[str] = set()
        for w in [*first, *(w for w in weights if w not in first)]:
            for name in hf_names(w, cfg):
                self._check_tensor(name, w, cfg)
                expected.add(name)
        unknown = [
            n
            for n in self.shapes
            if n not in expected and n not in ignore and not n.endswith(IGNORED_SUFFIXES)
        ]
        if unknown:
            more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            raise UserError(
                f"{self.files[unknown[0]]}: tensor {unknown[0]}{more} has no place in "
                "nnxtrain's Llama. Fix: use a checkpoint of a supported model "
                "(docs/interop.md)."
            )

    def _check_layers(self, num_layers: int) -> None:
        """config.json's num_hidden_layers against the layers the names hold."""
        present = sorted({int(m.group(1)) for n in self.shapes if (m := _LAYER.match(n))})
        gap = next((i for i, layer in enumerate(present) if i != layer), len(present))
        if gap < num_layers:
            problem = f"hold no tensor of layer {gap} (model.layers.{gap}.*)"
        elif present and present[-1] >= num_layers:
            problem = f"hold layers up to {present[-1]} (model.layers.{present[-1]}.*)"
        else:
            return
        raise UserError(
            f"{self.path}: config.json key 'num_hidden_layers' is {num_layers}, but the "
            f"safetensors files {problem}. Fix: use the config.json that belongs to these "
            "weights, or download the missing shards."
        )

    def _check_tensor(self, name: str, w: Weight, cfg: ModelConfig) -> None:
        if name not in self.shapes:
            raise UserError(
                f"{self.path}: tensor {name} is missing from the safetensors files. "
                "Fix: give a complete Llama checkpoint."
            )
        dims, shape = hf_dims(w, cfg), self.shapes[name]
        want = [size for size, _ in dims]
        if list(shape) != want:
            keys = next((k for (size, k), got in zip(dims, shape, strict=False) if size != got), "")
            keys = keys or dims[0][1]  # a different number of dimensions
            says = " * ".join(
                f"{k!r} ({shown(attrgetter(_FIELDS[k.strip()])(cfg))})" for k in keys.split("*")
            )
            raise UserError(
                f"{self.files[name]}: tensor {name} has shape {list(shape)}, but config.json "
                f"key{'s' if '*' in keys else ''} {says} make{'' if '*' in keys else 's'} it "
                f"{want}. Fix: use the config.json that belongs to these weights."
            )
        stored = self.dtypes[name]
        if stored not in FLOATS:
            kind = _TYPE_NAMES.get(stored, stored.lower())
            raise UserError(
                f"{self.files[name]}: tensor {name} holds {kind}, not floats. Fix: use a "
                "checkpoint with float32, float16 or bfloat16 weights (nnxtrain reads no "
                "quantized or integer weights)."
            )

    def read(self, name: str) -> np.ndarray:
        """One tensor, copied out of its file (the file is mapped only meanwhile)."""
        with _open(self.files[name]) as f:
            return f.get_tensor(name)
