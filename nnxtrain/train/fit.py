"""Which devices a run's steps are compiled for, and whether a step fits their memory.

    config, devices = compiled_for(config, None)   # mesh.target's devices; `auto` settled
    print(fit_report(train.memory, parse_target("tpu:v6e-8")))

A dry run with `mesh.target` prints, per device, the train step's argument, output,
alias, temp and total bytes against the chip's HBM, then `fits` with the headroom, or
`does not fit` with the excess. `total` is argument + output - alias + temp: XLA's memory
analysis counts a donated buffer once as an argument and again as the output that reuses
it (`alias`), so the alias is taken off once; the state is resident across steps, so the
arguments are counted whole. Where XLA itself refuses to compile (RESOURCE_EXHAUSTED, as
on hardware), `nnxtrain.train.compile.OutOfMemory` is a one-line error instead.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax

from nnxtrain.config import Config
from nnxtrain.model.auto import resolve_auto
from nnxtrain.parallel.target import Target, compile_devices, parse_target
from nnxtrain.train.compile import CompiledMemory
from nnxtrain.units import format_bytes


def compiled_for(
    config: Config, devices: Sequence[jax.Device] | None
) -> tuple[Config, Sequence[jax.Device] | None]:
    """The devices the steps are compiled for (`devices` if given, else mesh.target's, else
    None: the local ones), and `config` with model.dtype and model.attention `auto` settled
    by their platform (bfloat16 and splash on TPU, float32 and matmul on CPU)."""
    devices = devices if devices is not None else compile_devices(config.mesh)
    platform = (devices or jax.devices())[0].platform
    return dataclasses.replace(config, model=resolve_auto(config.model, platform)), devices


def fits(memory: CompiledMemory, target: Target) -> bool:
    """Whether the step's total per device is within one device's HBM."""
    return memory.total <= target.hbm_bytes


def fit_record(memory: CompiledMemory, target: Target) -> dict[str, Any]:
    """run_info.json's "fit": the target, its HBM per device, the verdict and headroom."""
    return {
        "target": target.name,
        "topology": target.topology,
        "devices": target.num_devices,
        "hbm_bytes": target.hbm_bytes,
        "total_bytes": memory.total,
        "fits": fits(memory, target),
        "headroom_bytes": target.hbm_bytes - memory.total,
    }


def fit_report(memory: CompiledMemory, target: Target) -> str:
    """Two lines: the step's memory per device against HBM, then the verdict."""
    hbm, share = target.hbm_bytes, memory.total / target.hbm_bytes
    parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in memory.as_dict().items() if k != "total")
    lines = [
        f"fit on {target.name} ({target.num_devices} devices, {format_bytes(hbm)} HBM each): "
        f"per device {parts}; total {format_bytes(memory.total)} = {share:.1%} of HBM"
    ]
    if fits(memory, target):
        lines.append(f"fits: {format_bytes(hbm - memory.total)} headroom per device")
    else:
        lines.append(
            f"does not fit: {format_bytes(memory.total - hbm)} over per device "
            "(lower run.batch_size or run.seq_len, set model.remat=full, or raise run.grad_accum)"
        )
    return "\n".join(lines)


def fit_lines(config: Config, memory: CompiledMemory) -> list[str]:
    """The fit report's lines for a run with mesh.target (none without one)."""
    return [fit_report(memory, parse_target(config.mesh.target))] if config.mesh.target else []
