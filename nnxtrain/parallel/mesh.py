"""The device mesh from config: axes `data`, `fsdp`, `tensor`, and `expert` when
mesh.expert != 1 (a mixture of experts' expert parallelism); -1 takes the rest.

    mesh = build_mesh(cfg.mesh)                 # uses jax.devices()
    batch_sharding(mesh)                        # batch split over data and fsdp
    cfg = resolve_batch(cfg, mesh)              # run.batch_size=-1 -> one row per device

Checks run before anything is allocated and fail with the key and the fix.
"""

import dataclasses
import math
from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from nnxtrain.config import Config, MeshConfig
from nnxtrain.errors import ConfigError
from nnxtrain.parallel.sharding import MESH_AXES


def mesh_axes(cfg: MeshConfig) -> tuple[str, ...]:
    """The mesh's axes: data, fsdp, tensor, and expert unless mesh.expert is 1."""
    return MESH_AXES if cfg.expert != 1 else MESH_AXES[:3]


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, ...]:
    """Axis sizes (data, fsdp, tensor[, expert]: `mesh_axes`) with at most one -1 filled
    from `num_devices`.

    Each size is already >= 1 or -1 (`nnxtrain.config.validate` checks that, before the
    CPU device count is chosen from the sizes)."""
    axes = mesh_axes(cfg)
    sizes = [getattr(cfg, a) for a in axes]
    keys = [f"mesh.{a}" for a in axes]
    fill = [i for i, s in enumerate(sizes) if s == -1]
    if len(fill) > 1:
        raise ConfigError(
            ", ".join(keys[i] for i in fill),
            "only one axis may be -1",
            "give explicit sizes to all but one axis",
        )
    known = math.prod(s for s in sizes if s != -1)
    if fill:
        if num_devices % known:
            raise ConfigError(
                keys[fill[0]],
                f"cannot fill: {devices(num_devices)} not "
                f"divisible by the other axes' product {known}",
                "choose axis sizes that divide the device count",
            )
        sizes[fill[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(
            "mesh",
            f"{'*'.join(axes)} = {'*'.join(map(str, sizes))} = "
            f"{math.prod(sizes)} but {devices(num_devices)} visible",
            "make the product equal the device count (or set one axis to -1)",
        )
    return tuple(sizes)


def build_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over all (or the given) devices with the configured axis sizes."""
    devices = list(devices if devices is not None else jax.devices())
    shape, axes = mesh_shape(cfg, len(devices)), mesh_axes(cfg)
    return jax.make_mesh(shape, axes, axis_types=(AxisType.Auto,) * len(axes), devices=devices)


def devices(n: int) -> str:
    """'1 device is', '8 devices are': counts in messages read as English."""
    return f"{n} device is" if n == 1 else f"{n} devices are"


def _batch_axes(mesh: Mesh) -> tuple[str, ...]:
    return tuple(a for a in ("data", "fsdp", "expert") if a in mesh.axis_names)


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split (data x fsdp x expert)."""
    return math.prod(int(mesh.shape[a]) for a in _batch_axes(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches [batch, length] are split over data and fsdp (and expert) along the batch
    axis."""
    return NamedSharding(mesh, PartitionSpec(_batch_axes(mesh), None))


def resolve_batch(cfg: Config, mesh: Mesh) -> Config:
    """`cfg` with run.batch_size=-1 resolved to the mesh's size; checks that the batch
    splits into run.grad_accum micro-batches that split over the data-parallel devices."""
    run, dp = cfg.run, data_parallel_size(mesh)
    batch = mesh.size if run.batch_size == -1 else run.batch_size
    if batch % run.grad_accum:
        raise ConfigError(
            "run.grad_accum",
            f"batch size {batch} is not divisible by run.grad_accum={run.grad_accum}",
            "pick a divisor of the batch",
        )
    if (batch // run.grad_accum) % dp:
        raise ConfigError(
            "run.batch_size",
            f"micro-batch of {batch // run.grad_accum} "
            f"sequences cannot be split over {'*'.join(_batch_axes(mesh))}={dp} devices",
            f"use a batch size that is a multiple of {dp * run.grad_accum}",
        )
    return dataclasses.replace(cfg, run=dataclasses.replace(run, batch_size=batch))
