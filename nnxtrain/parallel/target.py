"""Compile targets: the devices of hardware that is not attached, for ahead-of-time compiles.

    target = parse_target("tpu:v6e-8")        # or "tpu:v6e:2x4", "v5p-8", "v5e:2x2"
    devices = target_devices(target)           # 8 `TPU v6 lite` devices, from a CPU host
    target.hbm_bytes                           # 32 GiB per chip

`mesh.target` names the hardware; with `run.dry_run=true` the train step is compiled for
its devices instead of the local ones, so memory, FLOPs and collectives are those of the
real program. libtpu (`pip install 'nnxtrain[tpu]'`) describes a TPU topology without a
TPU. Names follow Cloud TPU's: `v5e-8` and `v6e-8` count chips (one TensorCore each);
`v4-8` and `v5p-8` count TensorCores, two per chip, which JAX drives as one megacore
device, so `v5p-8` is 4 devices.
"""

import os
import re
from dataclasses import dataclass

import jax

from nnxtrain.config import MeshConfig
from nnxtrain.errors import ConfigError

KEY = "mesh.target"

# HBM per chip (one JAX device), in GiB, from Cloud TPU's system architecture pages
# (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e).
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
# What get_topology_desc calls each generation, and whether it counts cores (megacore).
TOPOLOGY_PREFIX = {"v4": "v4", "v5e": "v5e", "v5p": "v5", "v6e": "v6e"}
MEGACORE = {"v4", "v5p"}
# Chip grids of the usual slice sizes (Cloud TPU's topologies), by chip count.
GRID_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
GRID_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8"}
# libtpu asks the cloud's metadata server what it runs on, and prints a dozen warnings when
# there is none; these say it up front. Set only where unset, so a TPU VM keeps its own.
QUIET_LIBTPU = {
    "TPU_SKIP_MDS_QUERY": "1",
    "TPU_ACCELERATOR_TYPE": "v6e-8",
    "TPU_WORKER_HOSTNAMES": "localhost",
    "TPU_WORKER_ID": "0",
    # several compiles may run side by side (the max-batch search): each loads libtpu
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
}
USAGE = "use tpu:<v4|v5e|v5p|v6e>-<size> (e.g. tpu:v6e-8) or a topology (e.g. tpu:v6e:2x4)"


@dataclass(frozen=True)
class Target:
    """One slice of hardware to compile for."""

    name: str  # as given, e.g. "tpu:v6e-8"
    platform: str  # "tpu"
    generation: str  # "v4", "v5e", "v5p", "v6e"
    topology: str  # chip grid as get_topology_desc names it, e.g. "v6e:2x4"
    num_devices: int

    @property
    def hbm_bytes(self) -> int:
        """HBM of one device (chip), in bytes."""
        return HBM_GIB[self.generation] * 2**30


def parse_target(name: str) -> Target:
    """The Target `name` describes; a one-line ConfigError naming mesh.target otherwise."""
    spec = name.strip().lower()
    platform, _, rest = (
        spec.partition(":") if spec.startswith(("tpu:", "gpu:")) else ("tpu", "", spec)
    )
    if platform != "tpu":
        raise ConfigError(KEY, f"{name!r}: only TPU targets compile from this host", USAGE)
    sized = re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", rest)
    grid = re.fullmatch(r"(v4|v5e|v5p|v5|v6e):(\d+(?:x\d+){1,2})", rest)
    if sized:
        gen, size = sized.group(1), int(sized.group(2))
        chips = size // 2 if gen in MEGACORE else size
        grids = GRID_3D if gen in MEGACORE else GRID_2D
        if chips not in grids or (gen in MEGACORE and size % 2):
            sizes = sorted(n * (2 if gen in MEGACORE else 1) for n in grids)
            raise ConfigError(
                KEY, f"{name!r}: no {gen} slice of size {size}", f"use one of {sizes}"
            )
        topology = f"{TOPOLOGY_PREFIX[gen]}:{grids[chips]}"
    elif grid:
        gen = "v5p" if grid.group(1) in ("v5", "v5p") else grid.group(1)
        dims = [int(d) for d in grid.group(2).split("x")]
        chips = 1
        for d in dims:
            chips *= d
        if len(dims) != (3 if gen in MEGACORE else 2) or chips < 1:
            raise ConfigError(
                KEY, f"{name!r}: {gen} grids have {3 if gen in MEGACORE else 2} dimensions", USAGE
            )
        topology = f"{TOPOLOGY_PREFIX[gen]}:{grid.group(2)}"
    else:
        raise ConfigError(KEY, f"{name!r} is not a target nnxtrain knows", USAGE)
    return Target(name, "tpu", gen, topology, chips)


def quiet_libtpu(force: bool = False) -> None:
    """Keeps libtpu's start-up warnings (a dozen lines about TPU_ACCELERATOR_TYPE and worker
    hostnames) from a host with no TPU chip: sets QUIET_LIBTPU's variables where unset, if
    no chip is attached (or `force`, to describe a target). Must run before JAX starts its
    backends. A TPU VM, whose chips libtpu must find, is left as it is."""
    if not force:
        try:  # the PCI scan JAX itself makes at import to decide whether chips are attached
            from jax._src.hardware_utils import num_available_tpu_chips_and_device_id

            if num_available_tpu_chips_and_device_id()[0] > 0:
                return
        except Exception:  # a JAX without it: leave libtpu alone rather than guess
            return
    for var, value in QUIET_LIBTPU.items():
        os.environ.setdefault(var, value)


def target_devices(target: Target) -> list[jax.Device]:
    """The devices of `target`, described by libtpu (nothing is attached or allocated)."""
    try:
        from jax.experimental import topologies
    except ImportError as e:  # pragma: no cover - part of jax
        raise ConfigError(KEY, f"this jax cannot describe topologies ({e})", "upgrade jax") from e
    quiet_libtpu(force=True)
    kwargs: dict[str, object] = {}
    if target.generation in MEGACORE:
        kwargs["chip_config_name"] = "megacore"
    if target.num_devices == 1:  # a single chip is its own host
        kwargs["chips_per_host_bounds"] = (1, 1, 1)
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=target.topology, **kwargs)
    except Exception as e:
        text = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if "support not installed" in text or "libtpu" in text.lower():
            raise ConfigError(
                KEY,
                f"{target.name} needs libtpu, which is not installed",
                "pip install 'nnxtrain[tpu]'",
            ) from e
        raise ConfigError(KEY, f"{target.name}: {text[:200]}", USAGE) from e
    return list(desc.devices)


def compile_devices(cfg: MeshConfig) -> list[jax.Device] | None:
    """The devices of `mesh.target`, or None (the local devices) when it is unset."""
    return target_devices(parse_target(cfg.target)) if cfg.target else None
