"""Mixtral and Qwen3-MoE config.json <-> the decoder's mixture of experts (`model.moe`):
what `config` reads and writes beyond Llama's keys for `model_type: mixtral` and
`qwen3_moe`. Their tensors are `weights.WEIGHTS`' rows that need `mixtral` / `qwen3_moe`:
the router `gate` and each expert's three projections, one tensor per expert in HF
(`experts.{j}`), stacked on an `expert` axis in nnxtrain.

    fields, origin = read(keys)      # ModelConfig fields, and the key each came from
    out |= write(cfg)                # the MoE keys of an export's config.json

Mixtral: `num_local_experts` experts of `intermediate_size` features, top
`num_experts_per_tok`, weights always renormalised, Mistral's window on every layer.
Qwen3-MoE: `num_experts` (transformers 5 writes it as `num_local_experts`) of
`moe_intermediate_size`, `norm_topk_prob`, Qwen3's q/k norms, and dense layers of
`intermediate_size` where `mlp_only_layers` and `decoder_sparse_step` say (the decoder's
second stack, `dense_layers`: config/moe.py). Both: `router_aux_loss_coef`.
"""

from typing import Any

from nnxtrain.config import ModelConfig, MoeConfig, expert_mlp_dim, sparse_layers
from nnxtrain.errors import UserError
from nnxtrain.interop.hf.keys import Keys, bad

FAMILIES = ("mixtral", "qwen3_moe")


def _experts_key(keys: Keys) -> str:
    """The key that gives the experts: transformers reads num_experts and
    num_local_experts alike (an alias); the family's own name first, else the other."""
    own, other = ("num_experts", "num_local_experts")[:: 1 if keys.family == "qwen3_moe" else -1]
    return other if other in keys.hf and own not in keys.hf else own


def read(keys: Keys) -> tuple[dict[str, Any], dict[str, str]]:
    """(the ModelConfig fields of a Mixtral or Qwen3-MoE config.json beyond Llama's, the
    config.json key of each `moe.*` field)."""
    qwen = keys.family == "qwen3_moe"
    experts_key = _experts_key(keys)
    experts = keys.get(experts_key, int)
    # Their indices and step are checked by validate_moe (config/moe.py), as every
    # `model.*` field of a config.json is, naming the config.json key (`origin`).
    dense = tuple(keys.get("mlp_only_layers", list) or ()) if qwen else ()
    step = keys.get("decoder_sparse_step", int) if qwen else 1
    moe = MoeConfig(
        experts=experts,
        top_k=keys.get("num_experts_per_tok", int),
        mlp_dim=keys.get("moe_intermediate_size", int) if qwen else 0,
        norm_topk_prob=keys.get("norm_topk_prob", bool) if qwen else True,
        aux_loss_coef=keys.get("router_aux_loss_coef", float),
        mlp_only_layers=dense,
        decoder_sparse_step=step,
    )
    origin = {
        "moe.experts": experts_key,
        "moe.top_k": "num_experts_per_tok",
        "moe.mlp_dim": "moe_intermediate_size" if qwen else "intermediate_size",
        "moe.aux_loss_coef": "router_aux_loss_coef",
        "moe.mlp_only_layers": "mlp_only_layers",
        "moe.decoder_sparse_step": "decoder_sparse_step",
    }
    if not qwen and keys.get("router_jitter_noise", float):
        raise bad(
            keys.where,
            "router_jitter_noise",
            "is not 0: nnxtrain's router has no jitter",
            "set it to 0.0",
        )
    return {"moe": moe}, origin


def write(cfg: ModelConfig) -> dict[str, Any]:
    """The MoE keys of config.json for `cfg` (a model with experts)."""
    moe = cfg.moe
    common = {
        "num_experts_per_tok": moe.top_k,
        "router_aux_loss_coef": moe.aux_loss_coef,
        "output_router_logits": False,
    }
    if cfg.qk_norm:  # Qwen3-MoE
        return common | {
            "num_experts": moe.experts,
            "moe_intermediate_size": expert_mlp_dim(cfg),
            "norm_topk_prob": moe.norm_topk_prob,
            "decoder_sparse_step": moe.decoder_sparse_step,
            "mlp_only_layers": list(moe.mlp_only_layers),
        }
    if not all(sparse_layers(cfg)):
        raise UserError(
            "model.moe.mlp_only_layers / decoder_sparse_step give the model dense layers, "
            "which Mixtral (the family of an MoE without q/k norms) has not. Fix: set "
            "model.qk_norm=true to export as Qwen3-MoE, or give every layer experts."
        )
    if not moe.norm_topk_prob:
        raise UserError(
            "model.moe.norm_topk_prob is false, and Mixtral (the family of an MoE without "
            "q/k norms) always renormalises its top-k weights. Fix: set "
            "model.moe.norm_topk_prob=true, or model.qk_norm=true to export as Qwen3-MoE."
        )
    return common | {
        "num_local_experts": moe.experts,
        "intermediate_size": expert_mlp_dim(cfg),
        "router_jitter_noise": 0.0,
    }
