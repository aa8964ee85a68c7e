"""The run report: the header a run prints first, what run_info.json holds, and the
lines a run ends with, saying where its results are.

    console.print(header(cfg, mesh, flops, num_params, floor))   # the run's first lines
    info = run_info(cfg, mesh, flops, plan, floor, compiled_steps)
    console.print(results(run_dir))                               # its last lines

The run directory writes it (`nnxtrain.run.directory.write_run_info`); the trainer adds the
"final" record and the goodput account as the run ends.
"""

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax

from nnxtrain.config import Config, lora_targets
from nnxtrain.parallel.target import parse_target
from nnxtrain.train.accounting import FlopsReport
from nnxtrain.train.compile import CompiledStep, StatePlan
from nnxtrain.train.fit import comms_record, fit_record


def run_info(
    cfg: Config,
    mesh: jax.sharding.Mesh,
    flops: FlopsReport,
    plan: StatePlan,
    floor: float | None,
    steps: Sequence[CompiledStep],
) -> dict[str, Any]:
    """What run_info.json holds until the run ends (then also "final"): the model, its
    FLOPs, the mesh, the compiled steps' memory and compile times; compiled for a
    mesh.target, whether the train step fits ("fit"); on more than one device, what the
    train step moves between them ("collectives", nnxtrain.train.fit.comms_record)."""
    info = {
        "dry_run": cfg.run.dry_run,
        "model": cfg.model.name,
        **flops.as_dict(),
        "num_params": plan.num_params,
        "loss_floor": floor,
        "mesh": dict(mesh.shape),
        "backend": mesh.devices.flat[0].platform,  # the devices compiled for
        "device_kind": mesh.devices.flat[0].device_kind,
        "dtype": cfg.model.dtype,
        "attention": cfg.model.attention,
        "batch_size": cfg.run.batch_size,
        "seq_len": cfg.run.seq_len,
        "jax_version": jax.__version__,
    }
    for step in steps:
        prefix = "" if step.name == "train" else f"{step.name}_"
        info[f"{prefix}compiled_memory"] = step.memory.as_dict()
        info[f"{prefix}lower_seconds"] = step.lower_seconds
        info[f"{prefix}compile_seconds"] = step.compile_seconds
    if cfg.mesh.target and steps:
        info["fit"] = fit_record(steps[0].memory, parse_target(cfg.mesh.target))
    if (cfg.mesh.target or mesh.size > 1) and steps:  # one device has no collectives
        # reading the HLO costs little: 0.5 s for llama1b's 1.7 MB, after a 175 s compile
        info["collectives"] = comms_record(cfg, steps[0], plan)
    return info


def header(
    cfg: Config,
    mesh: jax.sharding.Mesh,
    flops: FlopsReport,
    num_params: int,
    floor: float | None,
    trained: int = 0,
) -> str:
    """The run's first lines: model, mesh, batch, steps; parameters and FLOPs; loss floor;
    with LoRA, the parameters the optimizer trains (`trained`)."""
    first, s = mesh.devices.flat[0], "s" if mesh.size > 1 else ""
    devices = f"{mesh.size} {first.platform} device{s}"
    if cfg.mesh.target:  # e.g. "8 TPU v6 lite devices, compiled for, not attached"
        devices = f"{mesh.size} {first.device_kind} device{s}, compiled for, not attached"
    lines = [
        f"nnxtrain: model {cfg.model.name} | mesh "
        + " ".join(f"{k}={v}" for k, v in mesh.shape.items())
        + f" ({devices}) | {cfg.model.dtype} activations, {cfg.model.attention} attention | batch "
        f"{batch_rows(cfg)} x {cfg.run.seq_len} tokens{pairs(cfg)} | {cfg.run.steps} steps",
        dataclasses.replace(flops, num_params=num_params).summary(),
    ]
    if cfg.model.lora.rank > 0 and trained:
        lora = cfg.model.lora
        lines.append(
            f"LoRA r={lora.rank}, alpha {lora.alpha:g} on {', '.join(lora_targets(lora))}: "
            f"trains {trained:,} parameters ({100 * trained / num_params:.2f}%), the base frozen"
        )
    if floor is not None:
        lines.append(f"loss floor (entropy rate of the data source): {floor:.4f}")
    return "\n".join(lines)


def results(run_dir: str) -> str:
    """`results in RUN_DIR:` and the run dir's entries, folders first: whatever the run
    wrote there, the trainer's records and every plugin's files alike (hidden ones, such
    as the lock, left out)."""
    try:
        names = sorted(n for n in os.listdir(run_dir) if not n.startswith("."))
    except OSError:  # gone or unreadable: the path alone still says where to look
        return f"results in {run_dir}"
    folders = [f"{n}/" for n in names if os.path.isdir(os.path.join(run_dir, n))]
    files = [n for n in names if f"{n}/" not in folders]
    return f"results in {run_dir}:\n  " + "  ".join(folders + files)


def batch_rows(cfg: Config) -> int:
    """The rows of a step's batch: run.batch_size, or 2 per pair with data=preference."""
    return cfg.run.batch_size * (2 if cfg.data.name == "preference" else 1)


def pairs(cfg: Config) -> str:
    """The header's note on a DPO batch: its rows hold pairs."""
    return f" ({cfg.run.batch_size} pairs)" if cfg.data.name == "preference" else ""
