"""Composing a run's config with Hydra, and turning it into the frozen `Config`.

Hydra needs mutable schemas to compose (it merges YAML files and overrides into them), so
`register_schemas()` derives a mutable twin of each frozen class and stores it in Hydra's
ConfigStore; a typo anywhere then fails at compose time naming the key. After composition
`from_omegaconf()` turns the composed tree back into the frozen classes and validates it.
"""

import dataclasses
import typing
from dataclasses import field
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from nnxtrain.config.checks import validate
from nnxtrain.config.schema import GROUPS, Config
from nnxtrain.errors import ConfigError

T = TypeVar("T")


def _mutable_twin(cls: type, cache: dict[type, type]) -> type:
    """A non-frozen copy of a frozen config dataclass, for Hydra's ConfigStore."""
    if cls in cache:
        return cache[cls]
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        ftype = hints[f.name]
        if dataclasses.is_dataclass(ftype):
            twin = _mutable_twin(typing.cast(type, ftype), cache)
            fields.append((f.name, twin, field(default_factory=twin)))
        elif f.default_factory is not dataclasses.MISSING:
            fields.append((f.name, ftype, field(default_factory=f.default_factory)))
        else:
            fields.append((f.name, ftype, field(default=f.default)))
    twin = dataclasses.make_dataclass(cls.__name__ + "Schema", fields)
    cache[cls] = twin
    return twin


def register_schemas() -> None:
    """Stores the schemas in Hydra's ConfigStore (`nnxtrain_schema`, `<group>/schema`)."""
    from hydra.core.config_store import ConfigStore

    cache: dict[type, type] = {}
    store = ConfigStore.instance()
    store.store(name="nnxtrain_schema", node=_mutable_twin(Config, cache))
    for group, cls in GROUPS.items():
        store.store(group=group, name="schema", node=_mutable_twin(cls, cache))


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Builds a frozen config dataclass from plain data, naming any unknown key in full
    (`run.stepz`, not `stepz`); `prefix` is the dotted path of `data` in the whole config."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(typing.cast(Any, cls))}
    for key in data:
        if key not in names:
            raise ConfigError(
                prefix + key, f"unknown key for {cls.__name__}", f"use one of {sorted(names)}"
            )
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        ftype = hints[key]
        if dataclasses.is_dataclass(ftype) and isinstance(value, dict):
            kwargs[key] = from_dict(typing.cast(type, ftype), value, f"{prefix}{key}.")
        else:
            kwargs[key] = value
    return cls(**kwargs)


def from_omegaconf(cfg: DictConfig) -> Config:
    """Resolves a composed Hydra config into the frozen `Config` (hydra keys dropped), and
    validates it. With run.init_from the checks wait for `nnxtrain.interop.init_from.resolve`,
    which takes the model's shape from PATH: a config reads no model files."""
    try:
        data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        raise ConfigError(str(e.full_key), "has no value (???)", f"set {e.full_key}=VALUE") from e
    except OmegaConfBaseException as e:  # an interpolation that does not resolve
        problem = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            str(getattr(e, "full_key", None) or "config"),
            problem.rstrip("."),
            "correct the ${...} interpolation or give a plain value",
        ) from e
    assert isinstance(data, dict)
    data = {k: v for k, v in data.items() if k in GROUPS or k == "callbacks"}
    config = from_dict(Config, typing.cast(dict[str, Any], data))
    if config.run.init_from:  # checked once PATH gave the model's shape (interop.init_from)
        return config
    return validate(config)


def compose(overrides: list[str] | None = None, config_name: str = "config") -> Config:
    """Composes the shipped configs with overrides, without running. run.init_from is left
    as given: `nnxtrain.compose` (`nnxtrain.interop.init_from.compose`) also resolves it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="nnxtrain.conf", version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides or []))
    return from_omegaconf(cfg)
