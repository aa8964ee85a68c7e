"""The checks of `model.moe.*`, and the expert width a model uses.

validate_moe(cfg.model)          # one-line ConfigError naming the key, or the model
expert_mlp_dim(cfg.model)        # model.moe.mlp_dim, or model.mlp_dim when it is 0
layer_plan(cfg.model)            # per layer: (its stack, its index in that stack)

A mixture of experts may keep a dense MLP in some layers (`mlp_only_layers`,
`decoder_sparse_step`, as Qwen3-MoE's config.json says). The decoder then holds two
stacks of layers, each scanned: `layers`, those with experts, and `dense_layers`, those
with the MLP; `layer_plan` says where each layer of the model lives.
"""

import math

from nnxtrain.config.schema import MOE_IMPLS, Config, ModelConfig
from nnxtrain.errors import ConfigError


def expert_mlp_dim(m: ModelConfig) -> int:
    """The hidden features of each expert."""
    return m.moe.mlp_dim or m.mlp_dim


SPARSE, DENSE = "layers", "dense_layers"  # the decoder's stacks (Transformer attributes)


def sparse_layers(m: ModelConfig) -> tuple[bool, ...]:
    """Per layer, whether it has experts, as transformers' Qwen3-MoE decides it."""
    moe = m.moe
    return tuple(
        bool(moe.experts)
        and i not in moe.mlp_only_layers
        and (i + 1) % max(moe.decoder_sparse_step, 1) == 0
        for i in range(m.num_layers)
    )


def layer_plan(m: ModelConfig) -> tuple[tuple[str, int], ...]:
    """Per layer of the model, in order: (the stack that holds it, its index there). One
    stack (`layers`) unless a mixture of experts keeps dense layers (`dense_layers`)."""
    sparse = sparse_layers(m)
    mixed = m.moe.experts and not all(sparse)
    plan, seen = [], {SPARSE: 0, DENSE: 0}
    for s in sparse:
        stack = DENSE if mixed and not s else SPARSE
        plan.append((stack, seen[stack]))
        seen[stack] += 1
    return tuple(plan)


def validate_moe(m: ModelConfig) -> ModelConfig:
    """`model.moe`'s checks, each a one-line ConfigError naming its key; `m` when valid."""
    moe = m.moe
    if moe.experts < 0 or moe.experts == 1:
        raise ConfigError(
            "model.moe.experts",
            f"must be 0 (a dense MLP) or at least 2, got {moe.experts}",
            "use e.g. 8 (or 0 for no mixture of experts)",
        )
    if moe.experts and not 1 <= moe.top_k <= moe.experts:
        raise ConfigError(
            "model.moe.top_k",
            f"must be between 1 and model.moe.experts ({moe.experts}), got {moe.top_k}",
            "use e.g. 2",
        )
    if moe.mlp_dim < 0:
        raise ConfigError(
            "model.moe.mlp_dim", f"must be >= 0, got {moe.mlp_dim}", "use 0 (model.mlp_dim) or more"
        )
    for key, value in [
        ("aux_loss_coef", moe.aux_loss_coef),
        ("z_loss_coef", moe.z_loss_coef),
        ("capacity_factor", moe.capacity_factor),
    ]:
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"model.moe.{key}", f"must be >= 0, got {value}", "use 0 or more")
    if moe.impl not in MOE_IMPLS:
        raise ConfigError(
            "model.moe.impl", f"unknown value {moe.impl!r}", f"use one of {', '.join(MOE_IMPLS)}"
        )
    # exactly int: a bool (or a float from YAML or JSON) is no layer index
    bad = [i for i in moe.mlp_only_layers if not (type(i) is int and 0 <= i < m.num_layers)]
    if bad:
        raise ConfigError(
            "model.moe.mlp_only_layers",
            f"holds {bad[0]!r}, not a layer index of model.num_layers={m.num_layers}",
            f"use layer indices from 0 to {m.num_layers - 1}",
        )
    if moe.decoder_sparse_step < 1:
        raise ConfigError(
            "model.moe.decoder_sparse_step",
            f"must be >= 1, got {moe.decoder_sparse_step}",
            "use 1 (experts in every layer) or more",
        )
    if moe.experts and not any(sparse_layers(m)):
        raise ConfigError(
            "model.moe.mlp_only_layers",
            "leaves no layer with experts (with model.moe.decoder_sparse_step)",
            "set model.moe.experts=0 for a dense model, or fewer dense layers",
        )
    if moe.experts and m.lora.rank:
        raise ConfigError(
            "model.lora.rank",
            "LoRA adapters on a mixture of experts are not implemented",
            "set model.lora.rank=0 (full fine-tune) for an MoE model",
        )
    return m


def validate_moe_mesh(cfg: Config) -> None:
    """What expert parallelism (mesh.expert) does not run: capacity mode."""
    if cfg.mesh.expert != 1 and cfg.model.moe.capacity_factor:
        raise ConfigError(
            "model.moe.capacity_factor",
            "capacity mode with expert parallelism (mesh.expert) is not implemented",
            "set model.moe.capacity_factor=0 (dropless) or mesh.expert=1",
        )
