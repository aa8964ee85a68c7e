"""The weight map between Hugging Face Llama tensors and nnxtrain's parameters, and the
safetensors files they live in.

HF stores every projection as torch's `Linear` does, `[out_features, in_features]`;
nnxtrain stores `[in..., out...]` with heads split out (`wq` is `[embed, heads, head_dim]`),
and stacks the layers on a leading axis. So a tensor moves by a transpose and a reshape,
nothing else: both use the rotate-half rotary layout, so q and k need no permutation.

    reader = Reader(path)                     # model.safetensors, or shards + index
    reader.check(expected_shapes, why)        # one-line errors before anything is read
    t = reader.read("model.norm.weight")      # one tensor, as numpy
    write_shards(path, tensors, max_bytes)    # model.safetensors or shards + index
"""

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy, which safetensors needs
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from nnxtrain.config import ModelConfig
from nnxtrain.errors import UserError, first_line

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Buffers some older checkpoints carry; recomputed from config.json, never read.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


@dataclass(frozen=True)
class Weight:
    """One HF tensor name (per layer: `{i}` is the layer) and the parameter it fills."""

    hf: str
    path: tuple[str, ...]  # nnxtrain's parameter path; under ("layers",) it is stacked
    n_in: int  # 0: the same layout; k: HF's [out, in] transposed, nnxtrain's first k dims in
    shape_keys: str  # the config.json keys that give the HF shape (for error messages)

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf


_ATTN_Q = "num_attention_heads*head_dim, hidden_size"
_ATTN_KV = "num_key_value_heads*head_dim, hidden_size"
WEIGHTS = (
    Weight("model.embed_tokens.weight", ("embed",), 0, "vocab_size, hidden_size"),
    Weight("model.layers.{i}.self_attn.q_proj.weight", ("layers", "attn", "wq"), 1, _ATTN_Q),
    Weight("model.layers.{i}.self_attn.k_proj.weight", ("layers", "attn", "wk"), 1, _ATTN_KV),
    Weight("model.layers.{i}.self_attn.v_proj.weight", ("layers", "attn", "wv"), 1, _ATTN_KV),
    Weight(
        "model.layers.{i}.self_attn.o_proj.weight",
        ("layers", "attn", "wo"),
        2,
        "hidden_size, num_attention_heads*head_dim",
    ),
    Weight(
        "model.layers.{i}.mlp.gate_proj.weight",
        ("layers", "mlp", "w_gate"),
        1,
        "intermediate_size, hidden_size",
    ),
    Weight(
        "model.layers.{i}.mlp.up_proj.weight",
        ("layers", "mlp", "w_up"),
        1,
        "intermediate_size, hidden_size",
    ),
    Weight(
        "model.layers.{i}.mlp.down_proj.weight",
        ("layers", "mlp", "w_down"),
        1,
        "hidden_size, intermediate_size",
    ),
    Weight(
        "model.layers.{i}.input_layernorm.weight",
        ("layers", "attn_norm", "scale"),
        0,
        "hidden_size",
    ),
    Weight(
        "model.layers.{i}.post_attention_layernorm.weight",
        ("layers", "mlp_norm", "scale"),
        0,
        "hidden_size",
    ),
    Weight("model.norm.weight", ("final_norm", "scale"), 0, "hidden_size"),
    Weight("lm_head.weight", ("lm_head",), 1, "vocab_size, hidden_size"),
)


def weights_of(cfg: ModelConfig) -> list[Weight]:
    """The weights of a model with this config (a tied model has no lm_head)."""
    return [w for w in WEIGHTS if not (cfg.tie_embeddings and w.path == ("lm_head",))]


def hf_names(w: Weight, num_layers: int) -> list[str]:
    """The HF tensor names of `w`: one per layer, or just one."""
    return [w.hf.format(i=i) for i in range(num_layers)] if w.per_layer else [w.hf]


def hf_shape(w: Weight, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF shape of one tensor of `w`, from nnxtrain's shape of it (one layer's)."""
    if not w.n_in:
        return shape
    return (math.prod(shape[w.n_in :]), math.prod(shape[: w.n_in]))


def put_nnx(dst: np.ndarray, t: np.ndarray, w: Weight) -> None:
    """Writes HF tensor `t` into `dst`: one layer of the parameter in nnxtrain's layout
    (contiguous), cast to its dtype. The transpose goes in blocks of 64 rows: numpy's
    plain strided copy of a large transpose misses the cache on every element (about
    twice as slow, measured on the llama1b shapes)."""
    if not w.n_in:
        dst[...] = t.reshape(dst.shape)
        return
    flat = dst.reshape(math.prod(dst.shape[: w.n_in]), -1)  # [in, out], a view of dst
    for r in range(0, t.shape[0], 64):
        flat[:, r : r + 64] = t[r : r + 64].T


def to_hf(a: np.ndarray, w: Weight) -> np.ndarray:
    """nnxtrain's layout of one layer -> HF tensor."""
    if not w.n_in:
        return a
    return a.reshape(math.prod(a.shape[: w.n_in]), -1).T


def _open(file: str) -> Any:  # safetensors gives its handle no public type
    try:
        return safe_open(file, framework="numpy")
    except Exception as e:
        raise UserError(
            f"{file} is not a readable safetensors file ({first_line(e)}). "
            "Fix: download or write it again."
        ) from e


class Reader:
    """The tensors of an HF model directory: `model.safetensors`, or the shards that
    `model.safetensors.index.json` names. Reads headers at once, tensors one at a time."""

    def __init__(self, path: str):
        index = os.path.join(path, INDEX)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
                files = {name: os.path.join(path, file) for name, file in weight_map.items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise UserError(f"{index} is unreadable ({first_line(e)}). Fix: repair it.") from e
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
        """The numpy name of a stored tensor's dtype (float32 for any other)."""
        return DTYPE_NAMES.get(self.dtypes.get(name, ""), "float32")

    def check(self, expected: Mapping[str, tuple[tuple[int, ...], str]], ignore: set[str]) -> None:
        """Every expected tensor is there with its shape (name -> (shape, config.json keys
        that give it)), and nothing unknown is: one-line errors before any read."""
        for name, (shape, keys) in expected.items():
            if name not in self.shapes:
                raise UserError(
                    f"{self.path}: tensor {name} is missing from the safetensors files. "
                    "Fix: give a complete Llama checkpoint."
                )
            if self.shapes[name] != shape:
                raise UserError(
                    f"{self.files[name]}: tensor {name} has shape {list(self.shapes[name])} "
                    f"but config.json ({keys}) makes it {list(shape)}. "
                    "Fix: use the config.json that belongs to these weights."
                )
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

    def read(self, name: str) -> np.ndarray:
        """One tensor, copied out of its file (the file is mapped only meanwhile)."""
        with _open(self.files[name]) as f:
            return f.get_tensor(name)


Producer = Callable[[], np.ndarray]


def new_file_mode() -> int:
    """The mode open() gives a new file: 0o666 less the process's umask."""
    # The umask can only be read by setting it: set a stricter one for that instant, so a
    # file another thread creates meanwhile is at worst private, never more open.
    umask = os.umask(0o077)
    os.umask(umask)
    return 0o666 & ~umask


def write_shards(
    path: str, tensors: Iterable[tuple[str, tuple[int, ...], np.dtype, Producer]], max_bytes: int
) -> list[str]:
    """Writes (name, shape, dtype, producer) tensors to `model.safetensors`, or to shards of
    at most `max_bytes` (a larger tensor gets its own) with an index, as transformers does;
    only one shard's arrays exist at a time. Returns the files written."""
    shards: list[list[tuple[str, Producer]]] = [[]]
    size, total, weight_map = 0, 0, {}
    for name, shape, dtype, produce in tensors:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, produce))
        size, total = size + nbytes, total + nbytes
    n = len(shards)
    names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for file, shard in zip(names, shards, strict=True):
        arrays = {name: np.ascontiguousarray(produce()) for name, produce in shard}
        save_file(arrays, os.path.join(path, file), metadata={"format": "pt"})
        # safetensors writes a private temporary file (mode 0600) and renames it: give the
        # model the mode of any file the user writes, as transformers' own files have.
        os.chmod(os.path.join(path, file), new_file_mode())
        weight_map.update(dict.fromkeys(arrays, file))
        del arrays
    if n > 1:
        with open(os.path.join(path, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        names.append(INDEX)
    return names
