# ruff: noqa: E501  (the HLO below is written one instruction a line, as XLA prints it)
"""The communication account (issue 23): the collectives a compiled step runs, read from its
HLO text, counted per step and device, and compared with what FSDP needs.

The parser is tested on small handwritten HLO modules shaped like what XLA prints (async
pairs, tuples, while loops with and without `known_trip_count`, XLA:TPU's reduce-scatter
fusion, a Pallas kernel's multi-line custom-call); FSDP's theory on an abstract mesh; the
checks on handmade accounts; then a train step compiled for a v6e-8 slice with fsdp=8
moves what FSDP needs within 5%, and gradient accumulation's second gather and
reduce-scatter are flagged. Those two compiles skip, with the reason, where libtpu is not
installed.
"""

import io
import json
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest
from conftest import needs_libtpu
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P
from rich.console import Console

from nnxtrain import Trainer, compose
from nnxtrain.parallel.collectives import (
    Collective,
    CollectiveAccount,
    FsdpTheory,
    array_bytes,
    fsdp_theory,
    group_size,
    parse_collectives,
    parse_module,
)
from nnxtrain.train import fit

MIB = 2**20


def module(*computations: str, partitions: int = 8) -> str:
    return f"HloModule m, num_partitions={partitions}\n\n" + "\n\n".join(computations) + "\n"


def test_array_bytes_sums_a_tuple_and_ignores_layouts():
    assert array_bytes("bf16[4,32,128]{1,2,0:T(8,128)(2,1)S(1)}") == 4 * 32 * 128 * 2
    assert array_bytes("(f32[]{:T(128)}, s32[8,1,128]{2,1,0}, /*index=2*/pred[3])") == 4 + 4096 + 3
    assert array_bytes("f8e4m3fn[16]") == 16 and array_bytes("u4[3]") == 2  # bytes round up


@pytest.mark.parametrize(
    ("attrs", "size"),
    [
        ("replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}", 4),
        ("replica_groups=[2,4]<=[8], dimensions={0}", 4),
        ("replica_groups=[4,2]<=[2,4]T(1,0), dimensions={0}", 2),
        ("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, dimensions={0}", 4),
        ("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0','axis_1'}, x=1", 8),
        ("replica_groups={}, dimensions={0}", 8),  # empty: every device
    ],
)
def test_group_size_reads_every_replica_group_form(attrs, size):
    assert group_size(attrs, devices=8) == size


def test_async_pairs_count_once_with_the_done_halfs_shape_and_the_starts_groups():
    text = module(
        """ENTRY %main (p0: bf16[16,256]) -> bf16[128,256] {
  %p0 = bf16[16,256]{1,0} parameter(0)
  %ag-start = (bf16[16,256]{1,0}, bf16[128,256]{1,0}) all-gather-start(%p0), channel_id=1, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %ag-done = bf16[128,256]{1,0} all-gather-done(%ag-start)
  %ar-start = bf16[128,256]{1,0} all-reduce-start(%ag-done), replica_groups=[4,2]<=[8], to_apply=%add
  ROOT %ar-done = bf16[128,256]{1,0} all-reduce-done(%ar-start)
}"""
    )
    account = parse_collectives(text)
    assert [(op.kind, op.bytes, op.group) for op in account.ops] == [
        ("all-gather", 128 * 256 * 2, 8),
        ("all-reduce", 128 * 256 * 2, 2),
    ]
    # a ring brings (n-1)/n of the gathered buffer in, and an all-reduce twice that
    assert account.received("all-gather") == 128 * 256 * 2 * 7 // 8
    assert account.received("all-reduce") == 2 * 128 * 256 * 2 // 2


def test_a_tuple_shaped_all_reduce_counts_all_its_elements():
    text = module(
        """ENTRY %main (a: f32[128], b: bf16[64,64]) -> (f32[128], bf16[64,64]) {
  %a = f32[128]{0} parameter(0)
  %b = bf16[64,64]{1,0} parameter(1)
  ROOT %all-reduce.1 = (f32[128]{0}, /*index=1*/bf16[64,64]{1,0}) all-reduce(%a, %b), replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
}"""
    )
    assert parse_collectives(text).bytes("all-reduce") == 128 * 4 + 64 * 64 * 2


def test_a_reduce_scatter_counts_its_whole_input():
    text = module(
        """ENTRY %main (g: f32[128,64]) -> f32[32,64] {
  %g = f32[128,64]{1,0} parameter(0)
  ROOT %reduce-scatter.3 = f32[32,64]{1,0} reduce-scatter(%g), replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}, to_apply=%add
}"""
    )
    assert parse_collectives(text).bytes("reduce-scatter") == 128 * 64 * 4


# XLA:TPU's loops: no known_trip_count; the condition compares the counter (tuple element
# 0, started from a copied constant) with a constant. The body gathers one layer's weight
# inside a fusion, and TPU's reduce-scatter is a fusion `all-reduce-scatter.N`.
TPU_LOOP = module(
    """%gather_fusion (w: bf16[1,16,64]) -> bf16[1,128,64] {
  %w = bf16[1,16,64]{2,1,0} parameter(0)
  ROOT %all-gather.7 = bf16[1,128,64]{2,1,0:T(8,128)(2,1)} all-gather(%w), channel_id=3, replica_groups=mesh['axis_0'=8,'axis_1'=1] {'axis_0'}, dimensions={1}
}""",
    """%all-reduce-scatter.2 (input.1: bf16[128,64]) -> bf16[16,64] {
  %input.1 = bf16[128,64]{1,0} parameter(0)
  %all-reduce.5 = bf16[128,64]{1,0} all-reduce(%input.1), channel_id=9, replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
  %partition-id.1 = u32[] partition-id()
  %constant.9 = u32[] constant(16)
  %multiply.1 = u32[] multiply(%partition-id.1, %constant.9)
  %constant.10 = u32[] constant(0)
  ROOT %dynamic-slice.1 = bf16[16,64]{1,0} dynamic-slice(%all-reduce.5, %multiply.1, %constant.10), dynamic_slice_sizes={16,64}
}""",
    """%body (param.1: (s32[], bf16[4,16,64])) -> (s32[], bf16[4,16,64]) {
  %param.1 = (s32[]{:T(128)}, bf16[4,16,64]{2,1,0}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%param.1), index=0
  %ws = bf16[4,16,64]{2,1,0} get-tuple-element(%param.1), index=1
  %w = bf16[1,16,64]{2,1,0} dynamic-slice(%ws, %i), dynamic_slice_sizes={1,16,64}
  %fusion.1 = bf16[1,128,64]{2,1,0} fusion(%w), kind=kCustom, calls=%gather_fusion
  %one = s32[] constant(STEP)
  %next = s32[] add(%i, %one)
  ROOT %tuple.2 = (s32[]{:T(128)}, bf16[4,16,64]{2,1,0}) tuple(%next, %ws)
}""",
    """%cond (param.2: (s32[], bf16[4,16,64])) -> pred[] {
  %constant.401 = s32[]{:T(128)} constant(LIMIT)
  %param.2 = (s32[]{:T(128)}, bf16[4,16,64]{2,1,0}) parameter(0)
  %counter = s32[]{:T(128)} get-tuple-element(%param.2), index=0
  ROOT %lt.55 = pred[]{:T(512)} compare(%counter, %constant.401), direction=LT, metadata={op_name="jit(train_step)/while/cond/lt"}
}""",
    """ENTRY %main.1_spmd (ws: bf16[4,16,64], g: bf16[128,64]) -> (s32[], bf16[4,16,64]) {
  %ws = bf16[4,16,64]{2,1,0} parameter(0)
  %g = bf16[128,64]{1,0} parameter(1)
  %fusion.17 = bf16[16,64]{1,0} fusion(%g), kind=kCustom, calls=%all-reduce-scatter.2
  %constant.414 = s32[] constant(START)
  %copy.413 = s32[]{:T(128)} copy(%constant.414)
  %tuple.255 = (s32[]{:T(128)}, bf16[4,16,64]{2,1,0}) tuple(%copy.413, %ws)
  ROOT %while.116 = (s32[]{:T(128)}, bf16[4,16,64]{2,1,0}) while(%tuple.255), condition=%cond, body=%body, metadata={op_name="jit(train_step)/while"}
}""",
)


def tpu_loop(start: int = 0, limit: int = 4, step: int = 1) -> str:
    return (
        TPU_LOOP.replace("START", str(start))
        .replace("LIMIT", str(limit))
        .replace("STEP", str(step))
    )


@pytest.mark.parametrize(
    ("start", "limit", "step", "trips"),
    # XLA:TPU's windowed einsums run two steps of the ring per iteration, counter += 2
    [(0, 4, 1, 4), (1, 4, 1, 3), (0, 16, 1, 16), (0, 4, 2, 2), (0, 5, 2, 3)],
)
def test_a_tpu_loop_counts_its_body_once_per_iteration(start, limit, step, trips):
    text = tpu_loop(start, limit, step)
    account = parse_collectives(text)
    assert account.unknown_loops == 0
    assert account.executions("all-gather") == trips
    assert account.bytes("all-gather") == trips * 128 * 64 * 2
    # the all-reduce inside TPU's reduce-scatter fusion is a reduce-scatter of its input
    assert account.bytes("reduce-scatter") == 128 * 64 * 2
    assert account.bytes("all-reduce") == 0


def test_known_trip_counts_multiply_through_nested_loops():
    text = module(
        """%inner (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %cp = f32[8]{0} collective-permute(%x), channel_id=2, source_target_pairs={{0,1},{1,0}}
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %cp)
}""",
        """%outer (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %ag = f32[64]{0} all-gather(%x), replica_groups=[1,8]<=[8], dimensions={0}
  ROOT %w = (s32[], f32[8]{0}) while(%p), condition=%c, body=%inner, backend_config={"known_trip_count":{"n":"5"}}
}""",
        """ENTRY %main (x: f32[8]) -> (s32[], f32[8]) {
  %x = f32[8]{0} parameter(0)
  %t = (s32[], f32[8]{0}) tuple(%z, %x)
  ROOT %w = (s32[], f32[8]{0}) while(%t), condition=%c, body=%outer, backend_config={"known_trip_count":{"n":"3"}}
}""",
    )
    account = parse_collectives(text)
    assert account.executions("all-gather") == 3 and account.bytes("all-gather") == 3 * 64 * 4
    assert account.executions("collective-permute") == 15
    assert account.bytes("collective-permute") == 15 * 8 * 4


def test_a_loop_whose_count_cannot_be_read_counts_once_and_is_reported():
    text = tpu_loop().replace("constant(4)", "parameter(1)")
    account = parse_collectives(text)
    assert account.unknown_loops == 1
    assert account.executions("all-gather") == 1


def test_a_multi_line_instruction_keeps_its_computation_whole():
    """A Pallas kernel's custom-call prints its JSON over several lines, some starting
    with `}`; the collectives after it still belong to the loop body."""
    kernel = """  %kernel = (f32[8]{0}) custom-call(%w), custom_call_target="tpu_custom_call", frontend_attributes={kernel_metadata={
"xprof_metadata":"{\\"block_q\\": 128}"
}}, backend_config={"custom_call_config": {}}
"""
    text = tpu_loop().replace("  %fusion.1 = ", kernel + "  %fusion.1 = ")
    computations, entry, devices = parse_module(text)
    assert entry == "main.1_spmd" and devices == 8
    kernel_instruction = next(i for i in computations["body"] if i.name == "kernel")
    assert "custom_call_config" in kernel_instruction.attrs  # its last line is its own
    assert parse_collectives(text).executions("all-gather") == 4


def test_fsdps_theory_counts_the_gathered_parameters_in_the_narrower_dtype():
    mesh = AbstractMesh((1, 4, 2), ("data", "fsdp", "tensor"))

    def param(shape, spec, dtype=jnp.float32):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    params = {
        "embed": param((64, 32), P("tensor", "fsdp")),  # looked up by row: never gathered
        "w": param((64, 32), P("fsdp", "tensor")),  # gathered over fsdp, kept split over tensor
        "v": param((8, 32), P(None, "fsdp"), jnp.bfloat16),
        "norm": param((32,), P()),  # replicated
        "head": param((32, 16), P("tensor", None)),  # not sharded over fsdp
    }
    theory = fsdp_theory(params, "bfloat16", looked_up=("embed",))
    assert theory == FsdpTheory((64 * 32 // 2 + 8 * 32) * 2, "bfloat16", 4)
    # computed in float32, a float32 parameter is gathered whole, a bfloat16 one stays narrow
    assert fsdp_theory(params, "float32", ("embed",)).param_bytes == 64 * 32 // 2 * 4 + 8 * 32 * 2
    assert theory.expected("all-gather") == 2 * theory.param_bytes
    assert theory.expected("all-reduce") is None
    assert theory.received == round(3 * theory.param_bytes * 3 / 4)


def account_of(monkeypatch, theory: FsdpTheory, *ops: Collective) -> tuple[dict, list[str]]:
    """comms_record and comms_lines for a step that runs `ops`, against `theory`."""
    monkeypatch.setattr(fit, "comms_theory", lambda config, plan: theory)
    step = SimpleNamespace(collectives=CollectiveAccount(ops))
    config = compose(["model=small"])
    return fit.comms_record(config, step, None), fit.comms_lines(config, step, None)


GATHERED = 1_000_000  # parameter bytes FSDP gathers


def test_an_account_that_matches_fsdp_has_no_checks(monkeypatch):
    record, lines = account_of(
        monkeypatch,
        FsdpTheory(GATHERED, "bfloat16", 8),
        Collective("all-gather", "ag", GATHERED, 8, 2),
        Collective("reduce-scatter", "rs", GATHERED, 8, 1),
    )
    assert record["all-gather"]["ratio"] == 1 and record["reduce-scatter"]["ratio"] == 1
    assert (
        record["total"]["received_bytes"] == 3 * GATHERED * 7 // 8 and record["total"]["ratio"] == 1
    )
    assert record["checks"] == [] and not any(line.startswith("check:") for line in lines)


def test_gradients_all_reduced_instead_of_reduce_scattered_are_flagged(monkeypatch):
    record, lines = account_of(
        monkeypatch,
        FsdpTheory(GATHERED, "bfloat16", 8),
        Collective("all-gather", "ag", GATHERED, 8, 2),
        Collective("all-reduce", "ar", GATHERED, 8, 1),
    )
    assert record["reduce-scatter"] == {
        "bytes": 0,
        "executions": 0,
        "received_bytes": 0,
        "theory_bytes": GATHERED,
        "ratio": 0.0,
    }
    # an all-reduce receives twice what a reduce-scatter does: 4/3 of FSDP's total
    assert record["checks"] == [
        "each device receives 1.33x what FSDP needs",
        "reduce-scatter moves 0.00x what FSDP needs",
    ]
    assert "check: reduce-scatter moves 0.00x what FSDP needs (docs/sharding.md)" in lines


def test_windowed_einsums_are_compared_by_their_total(monkeypatch):
    """Collective-permutes carrying the gathers (9 shards of 1/8 where a ring receives 7):
    the all-gather line alone is no check, the total is."""
    shard = GATHERED // 8
    record, lines = account_of(
        monkeypatch,
        FsdpTheory(GATHERED, "bfloat16", 8),
        Collective("collective-permute", "cp", shard, 1, 3 * 9),
    )
    assert record["all-gather"]["ratio"] == 0
    assert record["checks"] == ["each device receives 1.29x what FSDP needs"]
    assert any(line.startswith("note: collective-permutes carry") for line in lines)


def test_without_fsdp_there_is_no_theory_and_no_check(monkeypatch):
    record, lines = account_of(
        monkeypatch, FsdpTheory(0, "bfloat16", 1), Collective("all-reduce", "ar", GATHERED, 8, 1)
    )
    assert "all-gather" not in record and record["all-reduce"]["bytes"] == GATHERED
    assert record["total"]["ratio"] is None and record["checks"] == []
    assert "FSDP" not in "\n".join(lines)


SMALL_FSDP = [
    "model=small",
    "mesh=fsdp",
    "mesh.target=tpu:v6e-8",
    "run.dry_run=true",
    "run.seq_len=128",
    "run.eval_every=0",
    "callbacks=none",
    "model.scan_layers=true",  # as on a TPU; a CPU host's default (`null`) unrolls
]


def dry_run(tmp_path: Path, *extra: str) -> tuple[dict, str]:
    """A dry run of model=small for a v6e-8 slice: its run_info and what it printed."""
    out = io.StringIO()
    cfg = compose([*SMALL_FSDP, f"run.dir={tmp_path}", *extra])
    Trainer(cfg, console=Console(file=out, width=400)).fit()
    return json.loads((tmp_path / "run_info.json").read_text()), out.getvalue()


@needs_libtpu
def test_an_fsdp8_step_moves_what_fsdp_needs_within_5_percent(tmp_path):
    info, printed = dry_run(tmp_path, "run.batch_size=8")
    comms = info["collectives"]
    # model=small's parameters sharded over fsdp, whole, in bfloat16: every one but the
    # norms (replicated) and the token embedding (looked up by row, not gathered)
    theory = comms["theory"]
    assert theory == {"param_bytes": 819_200 * 2, "dtype": "bfloat16", "devices": 8}
    gathered, scattered = comms["all-gather"], comms["reduce-scatter"]
    assert gathered["bytes"] == pytest.approx(2 * theory["param_bytes"], rel=0.05)
    assert scattered["bytes"] == pytest.approx(theory["param_bytes"], rel=0.05)
    assert gathered["theory_bytes"] == 2 * theory["param_bytes"] and comms["checks"] == []
    # the scanned layers' gathers run once per layer, forward and backward
    assert gathered["executions"] > 2 * 4 * 7
    assert "collectives per step and device" in printed and "check:" not in printed


@needs_libtpu
def test_gradient_accumulation_gathers_and_scatters_per_micro_batch_and_is_flagged(tmp_path):
    info, printed = dry_run(tmp_path, "run.batch_size=16", "run.grad_accum=2")
    comms = info["collectives"]
    assert comms["all-gather"]["ratio"] == pytest.approx(2, rel=0.05)
    assert comms["reduce-scatter"]["ratio"] == pytest.approx(2, rel=0.05)
    assert "check: all-gather moves 1.9" in printed
    assert "check: reduce-scatter moves 2.00x what FSDP needs" in printed
