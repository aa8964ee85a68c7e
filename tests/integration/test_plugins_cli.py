"""The memstats and sharding-printer plugins through the real CLI, on 8 simulated devices."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import shardings_table, xla_flags

pytestmark = pytest.mark.slow


def axes(cell: str) -> list[str]:
    return [a.strip() for a in cell.strip("()").split(",")]


def test_debug_callbacks_on_an_fsdp8_mesh(tmp_path: Path) -> None:
    env = {**os.environ, "XLA_FLAGS": xla_flags(8), "JAX_PLATFORMS": "cpu"}
    args = [
        "model=tiny",
        "mesh.fsdp=8",
        "run.steps=2",
        "run.batch_size=8",
        "run.seq_len=16",
        "run.eval_every=0",
        f"run.dir={tmp_path}",
        "callbacks=debug",
        "callbacks.memstats.max_rows=4",
        "+callbacks.split._target_=sharding_printer",  # a second printer, by short name
        "+callbacks.split.only_sharded=true",
        "+callbacks.split.console=false",
        "+callbacks.split.file=split.txt",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "nnxtrain.cli.train", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    params_text, _, activations_text = (
        (tmp_path / "shardings.txt").read_text().partition("\ntrain step activations (")
    )
    params, activations = shardings_table(params_text), shardings_table(activations_text)
    assert len(params) == 12 and len(activations) == 8
    embed_rows = 0
    for name, cells in params.items():
        for logical, physical in zip(axes(cells[2]), axes(cells[3]), strict=True):
            if logical == "embed":
                embed_rows += 1
                assert physical == "fsdp", (name, cells)
    assert embed_rows >= 8  # embedding, lm_head, q/k/v/o, three MLP matrices
    assert params["embed"][4] == "[64, 4]"  # one device's shard of the 64 x 32 embedding
    assert activations["embed/out"][3] == "(data+fsdp, None, None)"
    split = shardings_table((tmp_path / "split.txt").read_text())
    assert "layers/mlp/w_up" in split and "logits" in split
    assert not any("norm" in name for name in split)  # norms are replicated

    records = [json.loads(x) for x in (tmp_path / "memstats.jsonl").read_text().splitlines()]
    assert [r["event"] for r in records] == ["compiled", "after_init", "after_first_step", "end"]
    for r in records:
        assert len(r["devices"]) == 8
    assert all(d["in_use"] > 0 for d in records[1]["devices"])  # every device holds a shard
    assert "(min)" in proc.stdout and "(max)" in proc.stdout and "all 8" in proc.stdout
