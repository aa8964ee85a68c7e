"""Gemma 3 (text) and Gemma 2 config.json <-> the decoder's Gemma switches: what `config`
reads and writes beyond Llama's keys for `model_type: gemma3_text` and `gemma2`.

    fields, origin = read(keys, max_len)     # ModelConfig fields, and the key each came from
    out |= write(cfg)                        # Gemma's keys of an export's config.json

Gemma 3 computes RMSNorm as x * (1 + w), scales embeddings by sqrt(hidden_size), gates its
MLP with gelu_pytorch_tanh, norms the output of attention and of the MLP too, norms q and
k over head_dim, scales queries by query_pre_attn_scalar ** -0.5, and has sliding-window
layers (window `sliding_window`, rotary base `rope_local_base_freq`, unscaled) between
global ones (every `sliding_window_pattern`-th; base `rope_theta`, with its scaling).
`final_logit_softcapping` caps the logits. Gemma 2 is the same less the q/k norms, with
one rotary base, every other layer global, and `attn_logit_softcapping` applied (Gemma 3's
code in transformers reads that key and never applies it, so neither does nnxtrain).
"""

from typing import Any

from nnxtrain.config.schema import ModelConfig
from nnxtrain.interop.hf.keys import Keys, bad, shown, typed

FAMILIES = ("gemma3_text", "gemma2")
FULL, SLIDING = "full_attention", "sliding_attention"


def _pattern(n: int, every: int) -> list[str]:
    """transformers' layer_types: every `every`-th layer global, the others sliding."""
    return [SLIDING if (i + 1) % every else FULL for i in range(n)]


def read(keys: Keys, num_layers: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """(the rotary fields `config._rope` reads, from the global layers' parameters; the other
    Gemma fields; the config.json key of each field)."""
    hf, where = keys.hf, keys.where
    act = keys.get("hidden_activation", str)
    if act != "gelu_pytorch_tanh":
        raise bad(where, "hidden_activation", f"is {shown(act)}", "use gelu_pytorch_tanh")
    if keys.get("use_bidirectional_attention", bool, False):  # EmbeddingGemma's encoder
        raise bad(
            where,
            "use_bidirectional_attention",
            "is true: an encoder, and nnxtrain's decoder is causal",
            "use a causal (generative) Gemma",
        )
    params = hf.get("rope_parameters")
    gemma2 = keys.family == "gemma2"
    if gemma2:  # one rotary base for every layer: config._rope reads it as Llama's
        rope: dict[str, Any] = {}
        local_theta, local_kind = 0.0, "default"
    elif isinstance(params, dict) and (FULL in params or SLIDING in params):
        glob = typed(params.get(FULL) or {}, dict, f"rope_parameters.{FULL}", where)
        local = typed(params.get(SLIDING) or {}, dict, f"rope_parameters.{SLIDING}", where)
        rope = {"rope_parameters": glob, "rope_scaling": None}
        local_theta = local.get("rope_theta", keys.get("rope_local_base_freq", float))
        local_kind = local.get("rope_type", "default")
    else:  # the Hub's form: rope_theta and rope_scaling (global), rope_local_base_freq
        rope = {"rope_parameters": None, "rope_scaling": hf.get("rope_scaling")}
        local_theta, local_kind = keys.get("rope_local_base_freq", float), "default"
    if local_kind != "default":
        raise bad(
            where, f"rope_parameters.{SLIDING}.rope_type", f"is {shown(local_kind)}", "use default"
        )
    window = keys.get("sliding_window", int) or 0
    every = (
        2
        if gemma2
        else typed(hf.get("sliding_window_pattern", 6), int, "sliding_window_pattern", where)
    )
    types = hf.get("layer_types")
    if types is None:
        types = _pattern(num_layers, every) if every > 0 else [FULL] * num_layers
    if not isinstance(types, list) or len(types) != num_layers or not set(types) <= {FULL, SLIDING}:
        raise bad(
            where,
            "layer_types",
            f"is {shown(types)}",
            f"give one of {FULL!r}, {SLIDING!r} per layer ({num_layers})",
        )
    if FULL in types:
        every = types.index(FULL) + 1
    if types != _pattern(num_layers, every) and types != [SLIDING] * num_layers:
        raise bad(
            where,
            "layer_types",
            f"is {shown(types)}, not every Nth layer global",
            "use a checkpoint whose global layers recur at a fixed interval",
        )
    all_local = FULL not in types
    scalar = keys.get("query_pre_attn_scalar", float)
    fields = {
        "rope_local_theta": 0.0
        if gemma2
        else typed(local_theta, float, "rope_local_base_freq", where),
        "sliding_window": window if SLIDING in types else 0,
        "global_every": 0 if all_local or SLIDING not in types else every,
        "norm_offset": 1.0,
        "embed_scale": True,
        "activation": "gelu_tanh",
        "sandwich_norms": True,
        "qk_norm": not gemma2,
        "attn_scale": scalar**-0.5 if scalar and scalar > 0 else 0.0,
        # transformers' Gemma 3 reads attn_logit_softcapping and never applies it; Gemma 2
        # does: so only Gemma 2's scores are capped
        "attn_softcap": (keys.get("attn_logit_softcapping", float) or 0.0) if gemma2 else 0.0,
        "final_softcap": keys.get("final_logit_softcapping", float) or 0.0,
    }
    if scalar is None or scalar <= 0:
        raise bad(where, "query_pre_attn_scalar", f"is {scalar}", "give a positive number")
    origin = {
        "sliding_window": "sliding_window",
        "attn_softcap": "attn_logit_softcapping",
        "final_softcap": "final_logit_softcapping",
        "rope_local_theta": "rope_local_base_freq",
    }
    return rope, fields, origin


def write(cfg: ModelConfig) -> dict[str, Any]:
    """The Gemma 3 keys of config.json for `cfg` (a model with Gemma's switches)."""
    n, every = cfg.num_layers, cfg.global_every
    types = [SLIDING] * n if every == 0 else _pattern(n, every)
    types = types if cfg.sliding_window else [FULL] * n
    gemma2 = not cfg.qk_norm
    out = {
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": round(cfg.attn_scale**-2) if cfg.attn_scale else cfg.head_dim,
        "sliding_window": cfg.sliding_window or None,
        "layer_types": types,
        "rope_local_base_freq": cfg.rope_local_theta or cfg.rope_theta,
        "attn_logit_softcapping": (cfg.attn_softcap or None) if gemma2 else None,
        "final_logit_softcapping": cfg.final_softcap or None,
    }
    if gemma2:
        del out["rope_local_base_freq"]
    return out
