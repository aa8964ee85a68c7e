"""Logical axis names and the rules that map them to mesh axes.

Every parameter carries logical axis names in its `out_sharding` metadata (for example
`("embed", "mlp")`), and important activations are annotated with `constrain(x, names)`.
One table, `DEFAULT_RULES`, maps each logical name to the mesh axes that split it (or to
None: replicated); `mesh.rules` in the config overrides entries.

Inside `use_rules(mesh, rules)`, `constrain` applies sharding constraints and records
every annotated activation (name, shape, logical and physical axes) so that plugins can
print them; outside it, `constrain` is the identity, so the model also runs bare.
`active_mesh` and `active_spec` give that mesh and rules to code that must place its
arrays itself (a Pallas kernel under `shard_map`).
"""

import contextlib
import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nnxtrain.errors import ConfigError

# Every mesh axis a rule may name; a mesh has `expert` only when mesh.expert != 1
# (`mesh.mesh_axes`), and a rule's axes that the mesh lacks are left out.
MESH_AXES = ("data", "fsdp", "tensor", "expert")

# Logical name -> mesh axes. Names follow MaxText so that its users can read them.
DEFAULT_RULES: dict[str, tuple[str, ...] | None] = {
    # the batch is split over the expert axis too: its devices hold different tokens
    "activation_batch": ("data", "fsdp", "expert"),
    "activation_length": None,
    "activation_embed": None,
    "activation_heads": ("tensor",),
    "activation_kv_heads": ("tensor",),
    "activation_kv": None,
    "activation_mlp": ("tensor",),
    "activation_vocab": ("tensor",),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "embed_vocab": ("fsdp",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "q_heads": ("tensor",),
    "kv_heads": ("tensor",),
    "kv": None,
    "kv_head_dim": None,
    "layers": None,
    "norm": None,
    "lora_rank": None,  # a LoRA adapter's rank: small, replicated (nnxtrain.model.lora)
    "expert": ("expert",),  # a mixture of experts' stacked experts (nnxtrain.model.moe)
}


def merge_rules(overrides: Mapping[str, Any]) -> dict[str, tuple[str, ...] | None]:
    """The default rules with `mesh.rules` overrides applied (a name, a list, or null)."""
    rules = dict(DEFAULT_RULES)
    for name, axes in overrides.items():
        if axes is None:
            rules[name] = None
            continue
        axes_t = tuple(axes) if isinstance(axes, list | tuple) else (axes,)
        for axis in axes_t:
            if axis not in MESH_AXES:
                raise ConfigError(
                    f"mesh.rules.{name}",
                    f"unknown mesh axis {axis!r}",
                    f"use axes from {MESH_AXES} or null",
                )
        if len(set(axes_t)) != len(axes_t):  # a mesh axis can split a dimension only once
            raise ConfigError(
                f"mesh.rules.{name}",
                f"names a mesh axis twice: {list(axes_t)}",
                "name each mesh axis at most once",
            )
        rules[name] = axes_t
    return rules


def logical_to_spec(
    names: Sequence[str | None],
    rules: Mapping[str, tuple[str, ...] | None],
    mesh_axes: Sequence[str] = MESH_AXES,
) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec over a mesh with `mesh_axes` (the rules'
    axes it lacks are left out); a mesh axis is used at most once."""
    used = set(MESH_AXES) - set(mesh_axes)
    parts: list[Any] = []
    for name in names:
        if name is None:
            parts.append(None)
            continue
        if name not in rules:
            raise ConfigError(
                f"mesh.rules.{name}",
                f"logical axis {name!r} has no rule",
                f"add mesh.rules.{name}=[fsdp] (or null to replicate)",
            )
        axes = tuple(a for a in (rules[name] or ()) if a not in used)
        used.update(axes)
        parts.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*parts)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state: Any, mesh: Mesh, rules: Mapping[str, tuple[str, ...] | None]) -> Any:
    """A NamedSharding for every leaf of an abstract nnx/optax state tree, from its logical
    names; checks that every dimension divides evenly over its mesh axes.

    Leaves without logical names (optimizer step counters, RNG keys) are replicated.
    """

    def one(path: Any, leaf: Any) -> Any:
        names = leaf.get_metadata().get("out_sharding") if _is_variable(leaf) else None
        spec = logical_to_spec(names, rules, mesh.axis_names) if names else PartitionSpec()
        shape = leaf.get_value().shape if _is_variable(leaf) else leaf.shape
        for dim, name, axes in zip(shape, names or (), spec, strict=False):
            axes_t = (axes,) if isinstance(axes, str) else tuple(axes or ())
            ways = math.prod(mesh.shape[a] for a in axes_t)
            if dim % ways:
                raise ConfigError(
                    f"mesh.rules.{name}",
                    f"parameter {jax.tree_util.keystr(path)} "
                    f"{tuple(shape)}: dimension {dim} ({name}) does not split "
                    f"{ways} ways over mesh axes {axes_t}",
                    f"change the mesh sizes or map {name} elsewhere "
                    f"(mesh.rules.{name}=null replicates it)",
                )
        sharding = NamedSharding(mesh, spec)
        return leaf.replace(sharding) if _is_variable(leaf) else sharding

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_variable)


@dataclass(frozen=True)
class ActivationRecord:
    """One annotated activation, as traced: where it is, its shape and its layout."""

    name: str
    shape: tuple[int, ...]
    logical: tuple[str | None, ...]
    physical: PartitionSpec


class _Context(threading.local):
    mesh: Mesh | None = None
    rules: Mapping[str, tuple[str, ...] | None] = DEFAULT_RULES
    records: dict[str, ActivationRecord] | None = None


_ctx = _Context()


@contextlib.contextmanager
def use_rules(
    mesh: Mesh, rules: Mapping[str, tuple[str, ...] | None]
) -> Iterator[dict[str, ActivationRecord]]:
    """Activates sharding constraints while tracing; yields the activation records."""
    saved = (_ctx.mesh, _ctx.rules, _ctx.records)
    _ctx.mesh, _ctx.rules, _ctx.records = mesh, rules, {}
    try:
        yield _ctx.records
    finally:
        _ctx.mesh, _ctx.rules, _ctx.records = saved


def active_mesh() -> Mesh | None:
    """The mesh of the enclosing `use_rules` (None when the model runs bare)."""
    return _ctx.mesh


def active_spec(logical: tuple[str | None, ...]) -> PartitionSpec:
    """The PartitionSpec of `logical` axes under the enclosing `use_rules`' rules."""
    axes = _ctx.mesh.axis_names if _ctx.mesh is not None else MESH_AXES
    return logical_to_spec(logical, _ctx.rules, axes)


def constrain(x: jax.Array, name: str, logical: tuple[str | None, ...]) -> jax.Array:
    """Constrains activation `x` to the layout of its logical axes (identity when bare)."""
    if _ctx.mesh is None:
        return x
    spec = logical_to_spec(logical, _ctx.rules, _ctx.mesh.axis_names)
    if _ctx.records is not None and name not in _ctx.records:
        _ctx.records[name] = ActivationRecord(name, tuple(x.shape), logical, spec)
    return jax.lax.with_sharding_constraint(x, NamedSharding(_ctx.mesh, spec))
