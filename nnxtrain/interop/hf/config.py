"""config.json <-> ModelConfig: what nnxtrain's decoder can represent of a Hugging Face Llama.

    model_cfg = to_model_config(read_config(path), path, param_dtype="float32")
    hf_dict = from_model_config(model_cfg, dtype="bfloat16")

Reads both forms of config.json: checkpoints on the Hub carry `rope_theta` and
`rope_scaling` at the top level, transformers 5 writes them inside `rope_parameters`
(with `rope_type`). Writes the top-level form, which every transformers version reads.
Anything the decoder cannot represent (biases, other rope types, MoE, a sliding window,
another model_type) is a one-line `UserError` naming the config.json key.
"""

import json
import os
from typing import Any

from nnxtrain.config.schema import DTYPES, ModelConfig
from nnxtrain.errors import UserError, first_line

MODEL_TYPES = ("llama", "mistral")
# Keys that mean a mixture of experts when set (Mixtral, Qwen-MoE, DeepSeek, ...).
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")
ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _bad(where: str, key: str, problem: str, fix: str) -> UserError:
    return UserError(f"{where}: config.json key {key!r} {problem}. Fix: {fix}.")


def read_config(path: str) -> dict[str, Any]:
    """The parsed config.json of an HF model directory."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        what = "is not a directory" if not os.path.isdir(path) else "has no config.json"
        raise UserError(
            f"{path} {what}. Fix: give a Hugging Face model directory (config.json and "
            "model.safetensors, as save_pretrained writes it)."
        )
    try:
        with open(file) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{file} is unreadable ({first_line(e)}). Fix: repair it.") from e
    if not isinstance(data, dict):
        raise UserError(f"{file} does not hold a JSON object. Fix: repair it.")
    return data


def _rope(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """theta and scaling fields from either form; `rope_parameters` wins when present."""
    params = hf.get("rope_parameters")
    key = "rope_parameters"
    if params is None:
        params = dict(hf.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
        key = "rope_scaling"
    if not isinstance(params, dict):
        raise _bad(where, key, f"is {params!r}, not an object", "repair config.json")
    kind = params.get("rope_type", params.get("type", "default"))
    out: dict[str, Any] = {"rope_theta": float(params.get("rope_theta", 10000.0))}
    if kind == "default":
        out["rope_scaling"] = "none"
    elif kind == "linear":
        out.update(rope_scaling="linear", rope_factor=float(_need(params, "factor", key, where)))
    elif kind == "llama3":
        vals = [_need(params, k, key, where) for k in ROPE_KEYS]
        out.update(
            rope_scaling="llama3",
            rope_factor=float(vals[0]),
            rope_low_freq_factor=float(vals[1]),
            rope_high_freq_factor=float(vals[2]),
            rope_original_max_len=int(vals[3]),
        )
    else:
        raise _bad(
            where,
            f"{key}.{'rope_type' if 'rope_type' in params else 'type'}",
            f"is {kind!r}, which nnxtrain does not implement",
            "use a checkpoint with rope_type default, linear or llama3",
        )
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise _bad(where, "partial_rotary_factor", f"is {partial}", "only 1.0 is supported")
    return out


def _need(d: dict[str, Any], key: str, parent: str, where: str) -> Any:
    if d.get(key) is None:
        raise _bad(where, f"{parent}.{key}" if parent else key, "is missing", "add it")
    return d[key]


def _check_supported(hf: dict[str, Any], where: str) -> None:
    kind = hf.get("model_type")
    if kind not in MODEL_TYPES:
        raise _bad(
            where,
            "model_type",
            f"is {kind!r}",
            f"nnxtrain reads {' and '.join(MODEL_TYPES)} checkpoints",
        )
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise _bad(
                where,
                key,
                "is true: nnxtrain's decoder has no biases",
                "use a model without biases",
            )
    for key in MOE_KEYS:
        if hf.get(key):
            raise _bad(
                where, key, f"is {hf[key]}: a mixture of experts", "use a dense (non-MoE) model"
            )
    if hf.get("sliding_window") is not None or hf.get("use_sliding_window"):
        key = "sliding_window" if hf.get("sliding_window") is not None else "use_sliding_window"
        raise _bad(
            where,
            key,
            f"is {hf[key]}: sliding-window attention is not implemented",
            "use a checkpoint with sliding_window null",
        )
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise _bad(where, "hidden_act", f"is {act!r}", "only silu (SwiGLU) is supported")


def model_name(where: str) -> str:
    """The label of the model in directory `where`: the path as given ("tiny/model",
    "hf/TinyLlama"), since the folder's own name is often just "model"; the folder's name
    for "." or ".."."""
    name = os.path.normpath(where)
    return os.path.basename(os.path.abspath(where)) if name in (".", "..") else name


def to_model_config(hf: dict[str, Any], where: str, *, param_dtype: str) -> ModelConfig:
    """The ModelConfig of config.json `hf` (read from `where`, named in errors)."""
    _check_supported(hf, where)
    ints = {}
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"):
        ints[key] = int(_need(hf, key, "", where))
    heads = int(_need(hf, "num_attention_heads", "", where))
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise _bad(
            where,
            "num_key_value_heads",
            f"{kv_heads} does not divide num_attention_heads {heads}",
            "repair config.json",
        )
    head_dim = hf.get("head_dim") or ints["hidden_size"] // heads
    if head_dim % 2:
        raise _bad(where, "head_dim", f"is odd ({head_dim})", "rotary embeddings need even")
    return ModelConfig(
        name=model_name(where),
        vocab_size=ints["vocab_size"],
        emb_dim=ints["hidden_size"],
        num_layers=ints["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(head_dim),
        mlp_dim=ints["intermediate_size"],
        max_len=int(hf.get("max_position_embeddings", 2048)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        param_dtype=param_dtype,
        init_std=float(hf.get("initializer_range", 0.02)),
        **_rope(hf, where),
    )


def from_model_config(
    cfg: ModelConfig, *, dtype: str, bos_token_id: Any = None, eos_token_id: Any = None
) -> dict[str, Any]:
    """config.json of a `LlamaForCausalLM` with the shape and numerics of `cfg`."""
    assert dtype in DTYPES, dtype
    scaling: dict[str, Any] | None = None
    if cfg.rope_scaling == "linear":
        scaling = {"rope_type": "linear", "factor": cfg.rope_factor}
    elif cfg.rope_scaling == "llama3":
        scaling = {
            "rope_type": "llama3",
            "factor": cfg.rope_factor,
            "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_len,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.emb_dim,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": scaling,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": dtype,
        "use_cache": True,
    }
