"""Which devices a run's steps are compiled for, whether a step fits their memory, and
what it moves between them.

    config, devices = compiled_for(config, None)   # mesh.target's devices; `auto` settled
    print(fit_report(train.memory, parse_target("tpu:v6e-8")))
    print("\n".join(comms_lines(config, train, plan)))

A dry run with `mesh.target` prints, per device, the train step's argument, output,
alias, temp and total bytes against the chip's HBM, then `fits` with the headroom, or
`does not fit` with the excess. `total` is argument + output - alias + temp: XLA's memory
analysis counts a donated buffer once as an argument and again as the output that reuses
it (`alias`), so the alias is taken off once; the state is resident across steps, so the
arguments are counted whole. Where XLA itself refuses to compile (RESOURCE_EXHAUSTED, as
on hardware), `nnxtrain.train.compile.OutOfMemory` is a one-line error instead.

Then the communication account: per step and device, the bytes each kind of collective
moves in the compiled train step (`nnxtrain.parallel.collectives`: an all-gather's
gathered output, a reduce-scatter's whole input, an all-reduce's buffer), what a ring
brings into each device for them, and beside the all-gathers and reduce-scatters what
FSDP needs: 2 x the gathered parameters' bytes and 1 x their gradients'. Where the two
differ by more than 10% a `check:` line says so: a parameter gathered more often than
FSDP needs, or gradients all-reduced instead of reduce-scattered, is a resharding to look
for (docs/sharding.md, "The communication account").
"""

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any

import jax

from nnxtrain.config import Config
from nnxtrain.model.auto import resolve_auto
from nnxtrain.model.layers import activation_dtype
from nnxtrain.parallel.collectives import KINDS, FsdpTheory, fsdp_theory
from nnxtrain.parallel.target import Target, compile_devices, parse_target
from nnxtrain.train.compile import CompiledMemory, CompiledStep, StatePlan
from nnxtrain.units import format_bytes

CONVENTION = "an all-gather's output, a reduce-scatter's input, an all-reduce's buffer"
CHECK_OFF = 0.10  # actual/theory further than this from 1 gets a `check:` line


def compiled_for(
    config: Config, devices: Sequence[jax.Device] | None
) -> tuple[Config, Sequence[jax.Device] | None]:
    """The devices the steps are compiled for (`devices` if given, else mesh.target's, else
    None: the local ones), and `config` with model.dtype and model.attention `auto` settled
    by their platform (bfloat16 and splash on TPU, float32 and matmul on CPU)."""
    devices = devices if devices is not None else compile_devices(config.mesh)
    if config.mesh.target:
        # JAX writes the target's programs to the persistent cache but cannot load them
        # back without that hardware attached: it warns and compiles again. The warning
        # says nothing the user can act on (docs/tpu.md, "Compile times").
        warnings.filterwarnings(
            "ignore", message=r"(?s)Error reading persistent compilation cache.*with a Client"
        )
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


def comms_theory(config: Config, plan: StatePlan) -> FsdpTheory:
    """What FSDP needs for the planned parameters in the run's compute dtype; an untied
    token embedding is read by row, not gathered (see `fsdp_theory`)."""
    looked_up = () if config.model.tie_embeddings else ("embed",)
    dtype = str(activation_dtype(config.model.dtype))
    return fsdp_theory(plan.abstract.params, dtype, looked_up)


def _ratio(actual: float, expected: float | None) -> float | None:
    return actual / expected if expected else None


def _off(ratio: float | None) -> bool:
    return ratio is not None and abs(ratio - 1) > CHECK_OFF


def comms_record(config: Config, train: CompiledStep, plan: StatePlan) -> dict[str, Any]:
    """run_info.json's "collectives": per kind of collective its bytes per step and device,
    executions, bytes a ring receives and, where FSDP needs it, the theory and the ratio;
    the total received against FSDP's; the theory's inputs; the checks."""
    account, theory = train.collectives, comms_theory(config, plan)
    record: dict[str, Any] = {"convention": CONVENTION}
    for kind in KINDS:
        expected = theory.expected(kind)
        if account.of(kind) or expected is not None:
            record[kind] = {
                "bytes": account.bytes(kind),
                "executions": account.executions(kind),
                "received_bytes": account.received(kind),
                "theory_bytes": expected,
                "ratio": _ratio(account.bytes(kind), expected),
            }
    received = sum(account.received(kind) for kind in KINDS)
    record["total"] = {
        "received_bytes": received,
        "theory_received_bytes": theory.received or None,
        "ratio": _ratio(received, theory.received),
    }
    record["theory"] = dataclasses.asdict(theory)
    record["unknown_loops"] = account.unknown_loops
    checks = []
    if _off(record["total"]["ratio"]):
        checks.append(f"each device receives {record['total']['ratio']:.2f}x what FSDP needs")
    # where collective-permutes carry gathers and reduce-scatters (XLA's windowed einsums),
    # those two kinds alone say nothing: the total does
    for kind in () if account.of("collective-permute") else ("all-gather", "reduce-scatter"):
        ratio = record.get(kind, {}).get("ratio")
        if _off(ratio):
            checks.append(f"{kind} moves {ratio:.2f}x what FSDP needs")
    if account.unknown_loops:
        checks.append(f"{account.unknown_loops} loops of unknown trip count counted once")
    record["checks"] = checks
    return record


def comms_lines(config: Config, train: CompiledStep, plan: StatePlan) -> list[str]:
    """The communication account: a line per kind of collective the step runs, with FSDP's
    needs beside all-gather, reduce-scatter and the total, then a `check:` line per
    mismatch."""
    record = comms_record(config, train, plan)
    theory, total = record["theory"], record["total"]
    what = f"{format_bytes(theory['param_bytes'])} {theory['dtype']} parameters"
    lines = [f"collectives per step and device (bytes: {CONVENTION}; received: by a ring):"]
    for kind in KINDS:
        if kind in record:
            row = record[kind]
            line = (
                f"  {kind:<18} {format_bytes(row['bytes']):>12} in {row['executions']:>5} runs"
                f", {format_bytes(row['received_bytes']):>12} received"
            )
            if row["theory_bytes"] is not None:
                times = "2 x" if kind == "all-gather" else "1 x"
                line += f" | FSDP {format_bytes(row['theory_bytes'])} ({times} {what})"
                line += f": ratio {row['ratio']:.2f}"
            lines.append(line)
    line = f"  {'total':<47}{format_bytes(total['received_bytes']):>12} received"
    if total["ratio"] is not None:
        line += f" | FSDP {format_bytes(total['theory_received_bytes'])} received"
        line += f" (3 x {what} x {theory['devices'] - 1}/{theory['devices']})"
        line += f": ratio {total['ratio']:.2f}"
    lines.append(line)
    if "collective-permute" in record and total["ratio"] is not None:
        lines.append(
            "note: collective-permutes carry gathers and reduce-scatters here (XLA's "
            "windowed einsums, overlapped with the matmuls): compare the total"
        )
    lines += [f"check: {check} (docs/sharding.md)" for check in record["checks"]]
    return lines


def fit_lines(config: Config, train: CompiledStep, plan: StatePlan) -> list[str]:
    """A dry run for mesh.target reports the fit and the communication account (none
    without a target)."""
    if not config.mesh.target:
        return []
    fit = fit_report(train.memory, parse_target(config.mesh.target))
    return [fit, *comms_lines(config, train, plan)]
