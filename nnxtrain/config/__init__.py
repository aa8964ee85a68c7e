"""Typed run configuration: one frozen dataclass per Hydra config group, and their checks.

    from nnxtrain.config import compose
    cfg = compose(["model=small", "run.steps=50"])    # as the CLI composes, without running

- `schema`: the frozen dataclasses, the single source of truth for every key a run
  accepts, each field with its one-line help;
- `loading`: Hydra composition into those classes (`compose`, `from_omegaconf`);
- `checks`: `validate()`, the checks that need no device and no file (`validate_model`,
  the model group's alone, also runs on every Hugging Face config.json read);
- `lora`: `model.lora`'s checks and its targets (`lora_targets`);
- `dpo`: the checks of the `dpo` group and of data=preference;
- `moe`: `model.moe`'s checks, the experts' width (`expert_mlp_dim`) and which stack
  holds each layer (`layer_plan`);
- `reference`: docs/config.md's key tables, written from the schemas.
"""

from nnxtrain.config.checks import fit_remats, validate, validate_model
from nnxtrain.config.loading import compose, from_dict, from_omegaconf, register_schemas
from nnxtrain.config.lora import targets as lora_targets
from nnxtrain.config.moe import expert_mlp_dim, layer_plan, sparse_layers
from nnxtrain.config.schema import (
    ATTENTION_IMPLS,
    DATA_KINDS,
    DTYPES,
    GROUPS,
    LORA_TARGETS,
    REMAT_POLICIES,
    ROPE_SCALINGS,
    TOKEN_DTYPES,
    Config,
    DataConfig,
    DpoConfig,
    GrpoConfig,
    LoraConfig,
    MeshConfig,
    ModelConfig,
    MoeConfig,
    OptimConfig,
    RunConfig,
    setting,
)

__all__ = [
    "ATTENTION_IMPLS",
    "DATA_KINDS",
    "DTYPES",
    "GROUPS",
    "LORA_TARGETS",
    "REMAT_POLICIES",
    "ROPE_SCALINGS",
    "TOKEN_DTYPES",
    "Config",
    "DataConfig",
    "DpoConfig",
    "GrpoConfig",
    "LoraConfig",
    "MeshConfig",
    "ModelConfig",
    "MoeConfig",
    "OptimConfig",
    "RunConfig",
    "compose",
    "expert_mlp_dim",
    "fit_remats",
    "from_dict",
    "from_omegaconf",
    "layer_plan",
    "lora_targets",
    "register_schemas",
    "setting",
    "sparse_layers",
    "validate",
    "validate_model",
]
