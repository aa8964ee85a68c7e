"""The checks of the `dpo` and `grpo` groups and of data=preference that need no file and
no device.

A bad value is one line naming the key and the fix (`nnxtrain.errors.ConfigError`).
"""

from nnxtrain.config.schema import DPO_LOSSES, Config
from nnxtrain.errors import ConfigError


def validate_grpo(cfg: Config) -> None:
    """Raises ConfigError on a bad grpo.* value (the reward targets load when GRPO starts)."""
    g = cfg.grpo
    if g.generations < 2:
        raise ConfigError(
            "grpo.generations", f"must be >= 2 (a group), got {g.generations}", "use e.g. 8"
        )
    if g.iterations < 1:
        raise ConfigError("grpo.iterations", f"must be >= 1, got {g.iterations}", "use 1")
    if g.max_new_tokens < 1:
        raise ConfigError("grpo.max_new_tokens", f"must be >= 1, got {g.max_new_tokens}", "use 16")
    if not g.temperature > 0:
        raise ConfigError("grpo.temperature", f"must be > 0, got {g.temperature}", "use 1.0")
    for key, value in (("grpo.epsilon_low", g.epsilon_low), ("grpo.epsilon_high", g.epsilon_high)):
        if not 0 < value < 1:
            raise ConfigError(key, f"must be in (0, 1), got {value}", "use 0.2")
    if g.beta < 0:
        raise ConfigError("grpo.beta", f"must be >= 0, got {g.beta}", "use 0 (no KL) or e.g. 0.04")
    for name, spec in g.rewards.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("_target_"), str):
            raise ConfigError(
                f"grpo.rewards.{name}",
                "needs a _target_ (module.function)",
                f"set grpo.rewards.{name}._target_=my_module.my_reward",
            )
        extra = set(spec) - {"_target_", "weight"}
        if extra or not isinstance(spec.get("weight", 1.0), int | float):
            raise ConfigError(
                f"grpo.rewards.{name}",
                f"takes _target_ and a numeric weight, got {sorted(spec)}",
                "give only _target_ and weight",
            )


def validate_dpo(cfg: Config) -> None:
    """Raises ConfigError on a bad dpo.* value, or a run data=preference cannot train."""
    p, d, r = cfg.dpo, cfg.data, cfg.run
    if p.loss_type not in DPO_LOSSES:
        raise ConfigError(
            "dpo.loss_type", f"unknown loss {p.loss_type!r}", f"use {' or '.join(DPO_LOSSES)}"
        )
    if not p.beta > 0:
        raise ConfigError("dpo.beta", f"must be > 0, got {p.beta}", "use e.g. 0.1")
    if not 0 <= p.label_smoothing < 0.5:
        raise ConfigError(
            "dpo.label_smoothing", f"must be in [0, 0.5), got {p.label_smoothing}", "use e.g. 0.1"
        )
    if p.label_smoothing and p.loss_type != "sigmoid":
        raise ConfigError(
            "dpo.label_smoothing",
            f"applies to dpo.loss_type=sigmoid only, not {p.loss_type}",
            "set dpo.label_smoothing=0",
        )
    for key, value in (
        ("data.max_prompt_len", d.max_prompt_len),
        ("data.max_completion_len", d.max_completion_len),
    ):
        if value < 0:
            raise ConfigError(key, f"must be >= 0, got {value}", f"set {key}=0 for no limit")
    if d.name != "preference":
        return
    if r.loss_chunk:
        raise ConfigError(
            "run.loss_chunk", "data=preference projects all positions at once", "set it to 0"
        )
    if r.fit:
        raise ConfigError(
            "run.fit", "the largest-batch search compiles SFT's step, not DPO's", "leave it empty"
        )
    if p.reference != "init" and cfg.model.lora.rank:
        raise ConfigError(
            "dpo.reference",
            "with LoRA the reference is the model with its adapters off",
            "set dpo.reference=init",
        )
