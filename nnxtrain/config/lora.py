"""The checks of `model.lora.*`, and its targets as a tuple of Hugging Face projection names.

targets(cfg.model.lora)     # ("q_proj", "v_proj") or all seven for "all-linear"
"""

import math

from nnxtrain.config.schema import DTYPES, LORA_TARGETS, LoraConfig
from nnxtrain.errors import ConfigError

ALL_LINEAR = "all-linear"  # PEFT's own shorthand for every linear layer but the output head


def targets(lora: LoraConfig) -> tuple[str, ...]:
    """The adapted projections in LORA_TARGETS' order (checked: see `validate_lora`)."""
    value = lora.targets
    names = [value] if isinstance(value, str) else [str(v) for v in value]
    if ALL_LINEAR in names:
        return LORA_TARGETS
    return tuple(t for t in LORA_TARGETS if t in names)


def validate_lora(lora: LoraConfig) -> LoraConfig:
    """`model.lora`'s checks, each a one-line ConfigError naming its key; `lora` when valid."""
    if lora.rank < 0:
        raise ConfigError(
            "model.lora.rank", f"must be >= 0, got {lora.rank}", "use e.g. 16 (0 turns LoRA off)"
        )
    if not (math.isfinite(lora.alpha) and lora.alpha > 0):
        raise ConfigError("model.lora.alpha", f"must be > 0, got {lora.alpha}", "use e.g. 16")
    if not (math.isfinite(lora.dropout) and 0 <= lora.dropout < 1):
        raise ConfigError(
            "model.lora.dropout", f"must be in [0, 1), got {lora.dropout}", "use e.g. 0.05"
        )
    value = lora.targets
    names = [value] if isinstance(value, str) else list(value or [])
    allowed = (*LORA_TARGETS, ALL_LINEAR)
    if not names:
        raise ConfigError("model.lora.targets", "names no projection", f"use {ALL_LINEAR}")
    for name in names:
        if name not in allowed:
            raise ConfigError(
                "model.lora.targets",
                f"unknown target module {name!r}",
                f"use {ALL_LINEAR} or a list of {', '.join(LORA_TARGETS)}",
            )
    if lora.base_dtype not in ("", *DTYPES):
        raise ConfigError(
            "model.lora.base_dtype",
            f"unknown value {lora.base_dtype!r}",
            f'use "" (model.param_dtype) or one of {", ".join(DTYPES)}',
        )
    if lora.rank == 0 and (lora.base_dtype or lora.train_embeddings):
        key = "model.lora.base_dtype" if lora.base_dtype else "model.lora.train_embeddings"
        raise ConfigError(key, "applies to LoRA only (model.lora.rank is 0)", "set model.lora.rank")
    return lora
