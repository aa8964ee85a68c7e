"""Bad input to the real CLI: exit code 2 and one line on stderr that names the key, never a
traceback. The cases run concurrently (each is a separate short-lived process)."""

import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import run_cli

pytestmark = pytest.mark.slow

BASE = ["model=tiny", "run.steps=2", "run.batch_size=2", "run.seq_len=8", "run.eval_every=0"]

# id -> (overrides, the key the error must name). "{tmp}" is the case's own directory.
CASES = {
    "unknown-key": (["run.stepz=1"], "run.stepz"),
    "unknown-appended-key": (["+run.stepz=1"], "run.stepz"),
    "unknown-model": (["model=nope"], "model"),
    "unknown-experiment": (["+experiment=nope"], "experiment"),
    "steps-0": (["run.steps=0"], "run.steps"),
    "batch-0": (["run.batch_size=0"], "run.batch_size"),
    "seq-len-0": (["run.seq_len=0"], "run.seq_len"),
    "seq-len-above-max-len": (["run.seq_len=129"], "run.seq_len"),  # tiny: max_len 128
    "kv-heads-3-of-4": (["model.num_kv_heads=3"], "model.num_kv_heads"),
    "bad-dtype": (["model.dtype=float8"], "model.dtype"),
    "bad-plugin-target": (["+callbacks.x._target_=no.such.Module"], "callbacks.x._target_"),
    "run-dir-in-proc": (["run.dir=/proc/nope"], "run.dir"),
    "run-dir-under-a-file": (["run.dir={tmp}/a_file/run"], "run.dir"),
    "run-dir-is-a-file": (["run.dir={tmp}/a_file"], "run.dir"),
    # Values of the wrong type used to stop Hydra with a 6-line report and exit 1.
    "steps-not-a-number": (["run.steps=abc"], "run.steps"),
    "log-every-a-float": (["run.log_every=2.5"], "run.log_every"),
    "lr-a-word-in-a-list": (["optim.lr=0.1,abc"], "optim.lr"),
    "lr-nan": (["optim.lr=nan"], "optim.lr"),
    "mesh-data-0": (["mesh.data=0"], "mesh.data"),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, subprocess.CompletedProcess[str]]:
    def one(case: str) -> subprocess.CompletedProcess[str]:
        tmp = tmp_path_factory.mktemp(case)
        (tmp / "a_file").write_text("a regular file, so nothing can be created under it\n")
        overrides = [o.replace("{tmp}", str(tmp)) for o in CASES[case][0]]
        return run_cli([*BASE, *overrides, f"hydra.run.dir={tmp / 'hydra'}"], cwd=tmp)

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip(CASES, pool.map(one, CASES), strict=True))


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_naming_the_key(case, results):
    proc, key = results[case], CASES[case][1]
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("nnxtrain: error: "), lines[0]
    assert key in lines[0], lines[0]
    assert "Fix:" in lines[0]
