"""config.json <-> ModelConfig: what nnxtrain's decoder can represent of a Hugging Face model
of a supported family (`families`: Llama, Mistral, Qwen2/2.5, Qwen3, Gemma 2 and 3).

    model_cfg = to_model_config(read_config(path), path, param_dtype="float32")
    hf_dict = from_model_config(model_cfg, dtype="bfloat16")

Reads both forms of config.json: checkpoints on the Hub carry `rope_theta` and
`rope_scaling` at the top level, transformers 5 writes them inside `rope_parameters`
(with `rope_type`). Writes the top-level form, which every transformers version reads.
Each key is read with its JSON type and, when absent, transformers' default for the model_type
(`keys`); the model group's checks of the CLI (`nnxtrain.config.validate_model`) run on the
result. Anything the decoder cannot represent (biases, other rope types, MoE, a sliding
window, quantized weights, another model_type) and any value of the wrong type or range is
a one-line `UserError` naming the config.json key.
"""

import dataclasses
import json
import os
from typing import Any

from nnxtrain.config.checks import validate_model
from nnxtrain.config.schema import DTYPES, ModelConfig
from nnxtrain.errors import ConfigError, UserError, first_line
from nnxtrain.interop.hf import gemma, moe
from nnxtrain.interop.hf.families import FAMILIES, Family, family_of
from nnxtrain.interop.hf.keys import Keys, bad, shown, typed

MODEL_TYPES = tuple(FAMILIES)
# Keys that mean a mixture of experts when set (Mixtral, Qwen-MoE, DeepSeek, ...).
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")
SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor")  # linear: the first
# ModelConfig field -> the config.json key it comes from (the rotary ones: see _rope)
HF_KEYS = {
    "vocab_size": "vocab_size",
    "emb_dim": "hidden_size",
    "mlp_dim": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "max_len": "max_position_embeddings",
    "norm_eps": "rms_norm_eps",
    "tie_embeddings": "tie_word_embeddings",
    "init_std": "initializer_range",
}


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
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"{file} is unreadable ({first_line(e)}). Fix: repair it.") from e
    if not isinstance(data, dict):
        raise UserError(f"{file} does not hold a JSON object. Fix: repair it.")
    return data


def _rope(keys: Keys, max_len: int) -> tuple[dict[str, Any], dict[str, str]]:
    """The rotary fields of ModelConfig, and the config.json key each came from. As
    transformers reads them: `rope_scaling` (the Hub's form) when set, else
    `rope_parameters` (transformers 5's); in it `rope_type` (or the older `type`, default
    "default"), `rope_theta` (else the top-level one, else 10000) and the scaling fields;
    llama3's `original_max_position_embeddings` defaults to `max_position_embeddings`."""
    where, hf = keys.where, keys.hf
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    raw = hf.get(key)
    params: dict[str, Any] = {} if raw is None else typed(raw, dict, key, where)
    origin = {"rope_theta": f"{key}.rope_theta" if "rope_theta" in params else "rope_theta"}

    def get(name: str, kind: type, default: Any = None) -> Any:
        value = params.get(name)
        return default if value is None else typed(value, kind, f"{key}.{name}", where)

    theta = get("rope_theta", float, None)
    out: dict[str, Any] = {"rope_theta": keys.get("rope_theta", float) if theta is None else theta}
    kind_key = "rope_type" if "rope_type" in params else "type"
    kind = get(kind_key, str, "default")
    if kind == "default":
        out["rope_scaling"] = "none"
    elif kind in ("linear", "llama3"):
        fields = SCALING_KEYS if kind == "llama3" else SCALING_KEYS[:1]
        names = ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor")
        for name, field in zip(fields, names, strict=False):
            if params.get(name) is None:
                raise bad(where, f"{key}.{name}", "is missing", "add it")
            out[field], origin[field] = get(name, float), f"{key}.{name}"
        out["rope_scaling"] = kind
        if kind == "llama3":
            name = "original_max_position_embeddings"
            out["rope_original_max_len"] = get(name, int, max_len)
            origin["rope_original_max_len"] = (
                f"{key}.{name}" if name in params else HF_KEYS["max_len"]
            )
    else:
        raise bad(
            where,
            f"{key}.{kind_key}",
            f"is {shown(kind)}, which nnxtrain does not implement",
            "use a checkpoint with rope_type default, linear or llama3",
        )
    partial = get("partial_rotary_factor", float, None)
    if partial is None:
        partial = hf.get("partial_rotary_factor")
        partial = 1.0 if partial is None else typed(partial, float, "partial_rotary_factor", where)
    if partial != 1.0:
        raise bad(where, "partial_rotary_factor", f"is {partial}", "only 1.0 is supported")
    return out, origin


def _check_supported(hf: dict[str, Any], where: str) -> Keys:
    """Refuses what the decoder cannot represent; returns the typed reader of `hf`."""
    kind = hf.get("model_type")
    if kind not in MODEL_TYPES:
        raise bad(
            where,
            "model_type",
            f"is {shown(kind)}",
            f"nnxtrain reads {', '.join(MODEL_TYPES[:-1])} and {MODEL_TYPES[-1]} checkpoints",
        )
    keys = Keys(hf, where, str(kind))
    quantized = hf.get("quantization_config")
    if quantized is not None:
        method = quantized.get("quant_method") if isinstance(quantized, dict) else None
        raise bad(
            where,
            "quantization_config",
            f"is set{f' (quant_method {shown(method)})' if method else ''}: the weights are "
            "quantized, and nnxtrain reads float weights only",
            "use the unquantized checkpoint (float32, float16 or bfloat16 safetensors)",
        )
    family = FAMILIES[kind]
    for key in family.bias_keys:
        if keys.get(key, bool, False):
            what = "o_proj bias" if family.switches.get("qk_norm") else "biases"
            raise bad(
                where,
                key,
                f"is true: nnxtrain's decoder has no {what}",
                "use a model without biases",
            )
    for key in () if kind in moe.FAMILIES else MOE_KEYS:
        if hf.get(key):
            raise bad(
                where,
                key,
                f"is {shown(hf[key])}: a mixture of experts",
                "use a dense (non-MoE) model",
            )
    if kind in gemma.FAMILIES:  # its window and activation: `gemma.read`
        return keys
    use_window = keys.get("use_sliding_window", bool, False)
    # Qwen's sliding_window means nothing unless use_sliding_window turns it on; Mistral's
    # applies to every layer, which the decoder runs (`model.sliding_window`).
    gated = family.window_gate and not use_window
    every_layer = kind in ("mistral", "mixtral")
    window = None if gated or every_layer else keys.get("sliding_window", int)
    if window is not None or (use_window and family.window_gate):
        key = "sliding_window" if window is not None else "use_sliding_window"
        absent = f" (absent, which means 4096 for {kind})" if key not in hf else ""
        raise bad(
            where,
            key,
            f"is {window if window is not None else 'true'}{absent}: sliding-window attention "
            f"is implemented for mistral only",
            f"use a checkpoint with {family.window_gate or 'sliding_window'} "
            f"{'false' if family.window_gate else 'null'}",
        )
    act = keys.get("hidden_act", str)
    if act != "silu":
        raise bad(where, "hidden_act", f"is {shown(act)}", "only silu (SwiGLU) is supported")
    return keys


def model_name(where: str) -> str:
    """The label of the model in directory `where`: the path as given ("tiny/model",
    "hf/TinyLlama"), since the folder's own name is often just "model"; the folder's name
    for "." or ".."."""
    name = os.path.normpath(where)
    return os.path.basename(os.path.abspath(where)) if name in (".", "..") else name


def to_model_config(hf: dict[str, Any], where: str, *, param_dtype: str) -> ModelConfig:
    """The ModelConfig of config.json `hf` (read from `where`, named in errors): each key
    typed, absent ones as transformers defaults them for the model_type, and the model
    group's checks of `nnxtrain.config.validate_model` run, naming config.json's keys."""
    keys = _check_supported(hf, where)
    ints = {f: keys.get(HF_KEYS[f], int) for f in ("vocab_size", "emb_dim", "mlp_dim")}
    ints |= {f: keys.get(HF_KEYS[f], int) for f in ("num_layers", "num_heads", "max_len")}
    heads = ints["num_heads"]
    kv_heads = keys.get("num_key_value_heads", int)
    head_dim = keys.get("head_dim", int)
    if head_dim is None:  # transformers' hidden_size // num_attention_heads
        head_dim = ints["emb_dim"] // heads if heads > 0 else 0
    extra: dict[str, Any] = {}
    if keys.family in gemma.FAMILIES:
        rope_keys, extra, gemma_origin = gemma.read(keys, ints["num_layers"])
        rope, origin = _rope(Keys({**hf, **rope_keys}, where, keys.family), ints["max_len"])
        origin |= gemma_origin
    else:
        rope, origin = _rope(keys, ints["max_len"])
    if keys.family in moe.FAMILIES:
        extra, moe_origin = moe.read(keys)
        origin |= moe_origin
    cfg = ModelConfig(
        name=model_name(where),
        **ints,
        num_kv_heads=heads if kv_heads is None else kv_heads,
        head_dim=head_dim,
        norm_eps=keys.get("rms_norm_eps", float),
        tie_embeddings=keys.get("tie_word_embeddings", bool),
        param_dtype=param_dtype,
        init_std=keys.get("initializer_range", float),
        **rope,
        qkv_bias=FAMILIES[keys.family].switches.get("qkv_bias", False),
        qk_norm=FAMILIES[keys.family].switches.get("qk_norm", False),
        sliding_window=(keys.get("sliding_window", int) or 0)
        if keys.family in ("mistral", "mixtral")
        else 0,
    )
    try:
        return validate_model(dataclasses.replace(cfg, **extra))
    except ConfigError as e:
        field = e.key.removeprefix("model.")
        key = origin.get(field, HF_KEYS.get(field))
        if key is None:  # not from config.json (param_dtype)
            raise
        raise bad(where, key, e.problem, "repair config.json") from e


def from_model_config(
    cfg: ModelConfig, *, dtype: str, bos_token_id: Any = None, eos_token_id: Any = None
) -> dict[str, Any]:
    """config.json of the family `cfg`'s switches make it (`families.family_of`: Llama,
    Qwen2 or Qwen3) with the shape and numerics of `cfg`."""
    assert dtype in DTYPES, dtype
    family = family_of(cfg)
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
    out = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
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
        "sliding_window": cfg.sliding_window or None,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    out = _family_keys(out, family)
    if family.model_type in moe.FAMILIES:
        return out | moe.write(cfg)
    return out | gemma.write(cfg) if family.model_type in gemma.FAMILIES else out


def _family_keys(out: dict[str, Any], family: Family) -> dict[str, Any]:
    """Llama's config.json keys made `family`'s: its window switched off, and no bias key
    it does not read."""
    if family.window_gate:
        out |= {family.window_gate: False, "sliding_window": None}
    if family.model_type == "llama":
        del out["sliding_window"]
    if family.model_type in gemma.FAMILIES:
        del out["hidden_act"]
    for key in ("attention_bias", "mlp_bias"):
        if key not in family.bias_keys:
            del out[key]
    return out
