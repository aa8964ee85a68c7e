"""The checks of `model.moe.*`, and the expert width a model uses.

validate_moe(cfg.model)          # one-line ConfigError naming the key, or the model
expert_mlp_dim(cfg.model)        # model.moe.mlp_dim, or model.mlp_dim when it is 0
"""

import math

from nnxtrain.config.schema import MOE_IMPLS, Config, ModelConfig
from nnxtrain.errors import ConfigError


def expert_mlp_dim(m: ModelConfig) -> int:
    """The hidden features of each expert."""
    return m.moe.mlp_dim or m.mlp_dim


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
