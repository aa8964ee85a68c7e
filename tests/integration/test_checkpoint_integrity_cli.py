"""A checkpoint whose array data changed on disk, through the real CLI (issue 13): exit 2
and one line naming the checkpoint, the array and the fallback option; no traceback."""

import pytest
from conftest import flip_one_bit_in_the_largest_data_file, run_cli

pytestmark = pytest.mark.slow


def test_corrupt_array_data_exits_2_in_one_line(tmp_path):
    run = [
        "model=tiny",
        "mesh=single",
        "run.batch_size=4",
        "run.seq_len=16",
        "run.eval_every=0",
        "callbacks.checkpoint.every=4",
        f"run.dir={tmp_path / 'run'}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    first = run_cli([*run, "run.steps=8"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    flip_one_bit_in_the_largest_data_file(tmp_path / "run" / "checkpoints" / "8")
    proc = run_cli([*run, "run.steps=10"], cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert f"checkpoint {tmp_path}/run/checkpoints/8 is unreadable (corrupt data: " in lines[0]
    assert lines[0].endswith("set callbacks.checkpoint.fallback=true to restore the previous one")
