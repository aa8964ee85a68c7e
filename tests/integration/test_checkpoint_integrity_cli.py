"""A checkpoint whose array data changed on disk, through the real CLI (issue 13): exit 2
and one line naming the checkpoint, the array and the fallback option; no traceback.

The damaged checkpoint is a copy of the session's `short_run` (tests/conftest.py), whose
final checkpoint is step 20; the rerun asks for more steps, so it resumes from it."""

import shutil

import pytest
from conftest import SHORT_RUN, flip_one_bit_in_the_largest_data_file, run_cli

pytestmark = pytest.mark.slow


def test_corrupt_array_data_exits_2_in_one_line(tmp_path, short_run):
    first, short_dir = short_run
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "run"
    shutil.copytree(short_dir, run_dir)
    flip_one_bit_in_the_largest_data_file(run_dir / "checkpoints" / "20")
    args = [a for a in SHORT_RUN if not a.startswith("run.steps=")]
    proc = run_cli([*args, "run.steps=22", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert f"checkpoint {run_dir}/checkpoints/20 is unreadable (corrupt data: " in lines[0]
    assert lines[0].endswith("set callbacks.checkpoint.fallback=true to restore the previous one")
