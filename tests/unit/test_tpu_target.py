"""`mesh.target`: the train step compiled for a TPU slice from this CPU host (libtpu
describes the devices; nothing is attached or allocated), with the fit report, dtype
`auto` following the target, and out-of-memory as one line. Skips, with the reason, where
libtpu (the `nnxtrain[tpu]` extra, part of `[dev]`) is not installed.
"""

import json
from pathlib import Path

import pytest
from conftest import assert_one_line_error, needs_libtpu, run_cli_in_process

from nnxtrain import ConfigError, Trainer, compose
from nnxtrain.parallel.target import parse_target

SMALL = ["model=small", "run.seq_len=128", "run.eval_every=0", "callbacks=none"]


@pytest.mark.parametrize(
    ("name", "topology", "devices", "hbm_gib"),
    [
        ("tpu:v6e-8", "v6e:2x4", 8, 32),
        ("v6e:2x4", "v6e:2x4", 8, 32),
        ("tpu:v5e-4", "v5e:2x2", 4, 16),
        ("tpu:v5p-8", "v5:2x2x1", 4, 95),  # v5p counts TensorCores: 2 per chip
        ("tpu:v4-16", "v4:2x2x2", 8, 32),
        ("tpu:v6e-1", "v6e:1x1", 1, 32),
    ],
)
def test_target_names_give_topologies_devices_and_hbm(name, topology, devices, hbm_gib):
    target = parse_target(name)
    assert (target.topology, target.num_devices) == (topology, devices)
    assert target.hbm_bytes == hbm_gib * 2**30


@pytest.mark.parametrize("name", ["gpu:h100-8", "tpu:v6e-6", "tpu:v7-8", "tpu:v5p:2x2", "cpu"])
def test_a_bad_target_is_one_line_naming_the_key(name):
    with pytest.raises(ConfigError, match=r"^mesh\.target: .*Fix: "):
        parse_target(name)


def test_a_target_cannot_train():
    with pytest.raises(ConfigError, match=r"mesh\.target: .*run\.dry_run=true"):
        compose(["mesh.target=tpu:v6e-8"])


def dry_run(tmp_path: Path, target: str, *extra: str) -> tuple[dict, str]:
    """A dry run compiled for `target`: its run_info.json and what it printed."""
    import io

    from rich.console import Console

    out = io.StringIO()
    cfg = compose(
        [*SMALL, f"mesh.target={target}", "run.dry_run=true", f"run.dir={tmp_path}", *extra]
    )
    result = Trainer(cfg, console=Console(file=out, width=400)).fit()
    assert result.reason == "dry run"
    return json.loads((tmp_path / "run_info.json").read_text()), out.getvalue()


@needs_libtpu
@pytest.mark.parametrize(
    ("target", "devices", "kind"),
    [("tpu:v6e-8", 8, "TPU v6 lite"), ("tpu:v5e-4", 4, "TPU v5 lite")],
)
def test_a_dry_run_compiles_for_the_target(tmp_path, target, devices, kind):
    info, printed = dry_run(tmp_path, target, "run.batch_size=-1")
    # the devices are the target's, and auto follows them: bf16 activations, splash
    assert info["backend"] == "tpu" and info["device_kind"] == kind
    assert info["dtype"] == "bfloat16"
    assert info["mesh"]["fsdp"] == devices
    assert f"({devices} {kind} devices, compiled for, not attached)" in printed
    # memory per device is reported, against the chip's HBM
    memory, fit = info["compiled_memory"], info["fit"]
    assert (
        memory["total"] == memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
    )
    assert 0 < memory["total"] == fit["total_bytes"]
    assert fit["hbm_bytes"] == parse_target(target).hbm_bytes and fit["fits"] is True
    assert "fits: " in printed and f"fit on {target}" in printed
    # libtpu's start-up warnings do not reach the user's console
    assert "TPU_ACCELERATOR_TYPE" not in printed


@needs_libtpu
def test_a_step_that_cannot_fit_exits_2_in_one_line(tmp_path):
    # 8192 tokens x 512 rows per device of seq x seq scores is far beyond 16 GiB of v5e
    args = [*SMALL, "mesh.target=tpu:v5e-4", "run.dry_run=true", "model.attention=xla"]
    args += ["run.batch_size=2048", "run.seq_len=4096", "model.max_len=4096"]
    proc = run_cli_in_process([*args, f"run.dir={tmp_path / 'run'}"], tmp_path)
    assert_one_line_error(proc, "run.batch_size")
    assert "does not fit in memory on 4 TPU v5 lite devices" in proc.stderr
