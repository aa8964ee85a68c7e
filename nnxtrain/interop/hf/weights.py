"""The weight map between Hugging Face Llama tensors and nnxtrain's parameters, and the
safetensors files they live in.

HF stores every projection as torch's `Linear` does, `[out_features, in_features]`;
nnxtrain stores `[in..., out...]` with heads split out (`wq` is `[embed, heads, head_dim]`),
and stacks the layers on a leading axis. So a tensor moves by a transpose and a reshape,
nothing else: both use the rotate-half rotary layout, so q and k need no permutation.

    hf_dims(w, cfg)                           # an HF tensor's shape, from config.json's keys
    write_shards(path, tensors, max_bytes)    # model.safetensors or shards + index

Reading the files is `nnxtrain.interop.hf.reader`.
"""

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy, which safetensors needs
import numpy as np
from safetensors.numpy import save_file

from nnxtrain.config import ModelConfig, expert_mlp_dim, layer_plan
from nnxtrain.config.moe import DENSE

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


@dataclass(frozen=True)
class Weight:
    """One HF tensor name (per layer: `{i}` is the layer) and the parameter it fills."""

    hf: str
    # nnxtrain's parameter path; under ("layers",) or ("dense_layers",) it is stacked
    path: tuple[str, ...]
    n_in: int  # 0: the same layout; k: HF's [out, in] transposed, nnxtrain's first k dims in
    shape_keys: str  # the config.json keys that give each dimension of the HF shape
    needs: str = ""  # the ModelConfig switch it needs (qkv_bias, ...); "!x": needs x off

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf

    @property
    def per_expert(self) -> bool:  # one tensor per layer and expert (`{j}`), stacked [L, E]
        return "{j}" in self.hf


_ATTN_Q = "num_attention_heads*head_dim, hidden_size"
_ATTN_KV = "num_key_value_heads*head_dim, hidden_size"
_BIAS_Q, _BIAS_KV = "num_attention_heads*head_dim", "num_key_value_heads*head_dim"
_QWEN_MOE = "gate_proj up_proj down_proj"
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
        "!experts",
    ),
    Weight(
        "model.layers.{i}.mlp.up_proj.weight",
        ("layers", "mlp", "w_up"),
        1,
        "intermediate_size, hidden_size",
        "!experts",
    ),
    Weight(
        "model.layers.{i}.mlp.down_proj.weight",
        ("layers", "mlp", "w_down"),
        1,
        "hidden_size, intermediate_size",
        "!experts",
    ),
    # A mixture of experts (model/moe.py): the router, and each expert's SwiGLU per expert
    # in HF, stacked [layers, experts, ...] in nnxtrain. Mixtral's names, or Qwen3-MoE's.
    *(
        Weight(f"model.layers.{{i}}.{block}.{hf}.weight", ("layers", "mlp", ours), 1, dims, kind)
        for kind, block, experts, inner, names in (
            ("mixtral", "block_sparse_moe", "num_local_experts", "intermediate_size", "w1 w3 w2"),
            ("qwen3_moe", "mlp", "num_experts", "moe_intermediate_size", _QWEN_MOE),
        )
        for hf, ours, dims in zip(
            ("gate", *(f"experts.{{j}}.{n}" for n in names.split())),
            ("router", "w_gate", "w_up", "w_down"),
            (
                f"{experts}, hidden_size",
                f"{inner}, hidden_size",
                f"{inner}, hidden_size",
                f"hidden_size, {inner}",
            ),
            strict=True,
        )
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
        "!sandwich_norms",
    ),
    # Gemma's four norms: its post_attention_layernorm is the attention output's norm
    *(
        Weight(
            f"model.layers.{{i}}.{hf}.weight",
            ("layers", ours, "scale"),
            0,
            "hidden_size",
            "sandwich_norms",
        )
        for hf, ours in (
            ("post_attention_layernorm", "attn_post_norm"),
            ("pre_feedforward_layernorm", "mlp_norm"),
            ("post_feedforward_layernorm", "mlp_post_norm"),
        )
    ),
    *(
        Weight(
            f"model.layers.{{i}}.self_attn.{x}_proj.bias",
            ("layers", "attn", f"b{x}"),
            0,
            dims,
            "qkv_bias",
        )
        for x, dims in (("q", _BIAS_Q), ("k", _BIAS_KV), ("v", _BIAS_KV))
    ),
    *(
        Weight(
            f"model.layers.{{i}}.self_attn.{x}_norm.weight",
            ("layers", "attn", f"{x}_norm", "scale"),
            0,
            "head_dim",
            "qk_norm",
        )
        for x in ("q", "k")
    ),
    Weight("model.norm.weight", ("final_norm", "scale"), 0, "hidden_size"),
    Weight("lm_head.weight", ("lm_head",), 1, "vocab_size, hidden_size"),
)


def _on(cfg: ModelConfig, switch: str) -> bool:
    """Whether a `Weight.needs` switch is on: a ModelConfig field, or a mixture of experts
    (`experts`) written as Qwen3-MoE (with Qwen3's q/k norms) or as Mixtral."""
    moe = bool(cfg.moe.experts)
    kinds = {"experts": moe, "qwen3_moe": moe and cfg.qk_norm, "mixtral": moe and not cfg.qk_norm}
    return kinds[switch] if switch in kinds else bool(getattr(cfg, switch))


def _wanted(w: Weight, cfg: ModelConfig) -> bool:
    if cfg.tie_embeddings and w.path == ("lm_head",):
        return False
    return not w.needs or _on(cfg, w.needs.lstrip("!")) != w.needs.startswith("!")


def weights_of(cfg: ModelConfig) -> list[Weight]:
    """The weights of a model with this config (a tied model has no lm_head; a bias or q/k
    norm only with its switch on; experts in place of the MLP with model.moe.experts).

    A mixture of experts with dense layers (`layer_plan`) has each per-layer weight of a
    dense layer under `dense_layers`: its attention and norms, and the MLP's rows."""
    mine = [w for w in WEIGHTS if _wanted(w, cfg)]
    if DENSE not in {stack for stack, _ in layer_plan(cfg)}:
        return mine
    dense_cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, experts=0))
    dense = [
        dataclasses.replace(w, path=(DENSE, *w.path[1:]))
        for w in WEIGHTS
        if w.per_layer and _wanted(w, dense_cfg)
    ]
    return mine + dense


def hf_slots(w: Weight, cfg: ModelConfig) -> list[tuple[tuple[int, ...], str]]:
    """(the index into nnxtrain's stacked parameter, the HF tensor name) of each tensor of
    `w`: one per layer of its stack (`layer_plan`), per such layer and expert, or just one
    (index ())."""
    if not w.per_layer:
        return [((), w.hf)]
    mine = [(i, j) for i, (stack, j) in enumerate(layer_plan(cfg)) if stack == w.path[0]]
    if w.per_expert:
        experts = range(cfg.moe.experts)
        return [((j, e), w.hf.format(i=i, j=e)) for i, j in mine for e in experts]
    return [((j,), w.hf.format(i=i)) for i, j in mine]


def hf_names(w: Weight, cfg: ModelConfig) -> list[str]:
    """The HF tensor names of `w` (see `hf_slots`)."""
    return [name for _, name in hf_slots(w, cfg)]


def hf_dims(w: Weight, cfg: ModelConfig) -> tuple[tuple[int, str], ...]:
    """The HF shape of one tensor of `w`, each dimension with the config.json keys that
    give it (`shape_keys`), computed from `cfg` alone: nothing is built."""
    sizes = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.emb_dim,
        "intermediate_size": cfg.mlp_dim,
        "num_attention_heads*head_dim": cfg.num_heads * cfg.head_dim,
        "num_key_value_heads*head_dim": cfg.num_kv_heads * cfg.head_dim,
        "head_dim": cfg.head_dim,
        "num_local_experts": cfg.moe.experts,
        "num_experts": cfg.moe.experts,
        "moe_intermediate_size": expert_mlp_dim(cfg),
    }
    return tuple((sizes[k], k) for k in w.shape_keys.split(", "))


def hf_shape(w: Weight, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF shape of one tensor of `w`, from nnxtrain's shape of it (one layer's)."""
    if not w.n_in:  # a bias [heads, head_dim] is one flat vector in HF
        return (math.prod(shape),) if "," not in w.shape_keys else shape
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
        return a.reshape(-1) if "," not in w.shape_keys else a
    return a.reshape(math.prod(a.shape[: w.n_in]), -1).T


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
