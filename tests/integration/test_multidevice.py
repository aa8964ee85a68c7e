"""Same math on any mesh, and across processes: 8 simulated CPU devices in subprocesses.

Meshes split the batch's sums differently, so the figures agree to float32 rounding, not
bitwise, and only before the optimizer: Adam divides by sqrt(v), which turns a rounding
difference in a gradient entry near zero into a different update, and training then
amplifies it in a way that depends on the machine. So the tests compare the loss and the
gradient norm of steps 1 and 2, which both run at the initial parameters (the warmup's
learning rate is 0 at the first update), and check only that every mesh then learns.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port, rounding_tolerance

pytestmark = pytest.mark.slow

TINY = ["model=tiny", "run.steps=10", "run.batch_size=16", "run.seq_len=32", "run.eval_every=0"]
TINY += ["optim.warmup_steps=5"]  # lr 0 at the first update: steps 1 and 2 share parameters

# Tolerances from conftest.rounding_tolerance (n terms summed in another order: n·eps of
# the sum of their magnitudes). The loss sums B·L = 512 token terms, each from contractions
# of at most 64 terms that a tensor-parallel mesh splits: n <= 512 + 64 < 1024, and for
# positive terms the sum of magnitudes is the sum itself. A gradient entry sums 512 token
# terms of either sign, whose magnitudes add up to about sqrt(512) (< 23) times the sum's;
# the gradient norm inherits that factor. Measured: 1 to 3 ulps (about 1e-7) on both.
LOSS_RTOL = rounding_tolerance(1024)  # 1.2e-4
GRAD_NORM_RTOL = 23 * rounding_tolerance(1024)  # 2.8e-3

MESHES_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    from nnxtrain import Callback, Trainer, compose

    class Losses(Callback):
        def __init__(self):
            self.losses = []
        def on_step_end(self, trainer, event):
            self.losses.append([event.metrics["loss"], event.metrics["grad_norm"]])

    overrides, run_dir = json.loads(sys.argv[1]), sys.argv[2]
    out = {}
    for name, mesh, devices in [
        ("single", ["mesh=single"], jax.devices()[:1]),
        ("data8", ["mesh=data"], None),
        ("fsdp8", ["mesh=fsdp"], None),
        ("d2f2t2", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"], None),
    ]:
        cfg = compose([*overrides, *mesh, "callbacks=none", f"run.dir={run_dir}/{name}",
                       "run.host_devices=8"])
        cb = Losses()
        Trainer(cfg, [cb], devices=devices).fit()
        out[name] = cb.losses
    print("LOSSES=" + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def mesh_losses(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """[steps, (loss, grad_norm)] of the same run on each mesh, in one process with 8 CPU
    devices. Its fsdp8 run is also the one-process reference of the two-process run."""
    proc = subprocess.run(
        [sys.executable, "-c", MESHES_SCRIPT, json.dumps(TINY), str(tmp_path_factory.mktemp("m"))],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("LOSSES="))
    return {name: np.array(x) for name, x in json.loads(line.removeprefix("LOSSES=")).items()}


def test_same_losses_on_every_mesh(mesh_losses: dict[str, np.ndarray]) -> None:
    others = {name: x for name, x in mesh_losses.items() if name != "single"}
    assert others.keys() == {"data8", "fsdp8", "d2f2t2"}
    assert_same_math(mesh_losses["single"], others)


def assert_same_math(reference: np.ndarray, others: dict[str, np.ndarray]) -> None:
    """[steps, (loss, grad_norm)] of every run: equal to rounding at steps 1 and 2, and each
    run's loss fell by step 10."""
    assert reference.shape == (10, 2)
    for name, got in {"reference": reference, **others}.items():
        assert got.shape == reference.shape, name
        assert got[-1, 0] < got[0, 0], f"{name} did not learn: {got[:, 0]}"
    for name, got in others.items():
        np.testing.assert_allclose(got[:2, 0], reference[:2, 0], rtol=LOSS_RTOL, err_msg=name)
        np.testing.assert_allclose(got[:2, 1], reference[:2, 1], rtol=GRAD_NORM_RTOL, err_msg=name)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    exe = Path(sys.executable).with_name("nnxtrain")
    return subprocess.Popen(
        [str(exe), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )


def _losses(run_dir: Path) -> np.ndarray:
    """[steps, (loss, grad_norm)] from metrics.jsonl (one line per step)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return np.array([[r["loss"], r["grad_norm"]] for r in map(json.loads, lines) if "loss" in r])


# The two-process run's command line without its run dirs and coordinator: also the runs
# of test_preemption_multiprocess, which the compilation cache then serves.
TWO_PROCESSES = [*TINY, "run.log_every=1", "mesh=fsdp", "run.host_devices=4"]
TWO_PROCESSES += ["mesh.num_processes=2", "mesh.init_timeout=120"]


def run_two_processes(root: Path) -> tuple[list[int], list[str], Path]:
    """TWO_PROCESSES through the CLI, 2 processes x 4 devices, uninterrupted: their exit
    codes, their output and the run dir (conftest's session fixture `two_process_run`)."""
    port = free_port()
    procs = [
        _cli(
            *TWO_PROCESSES,
            f"mesh.coordinator=127.0.0.1:{port}",
            f"mesh.process_id={i}",
            f"run.dir={root}/two",
            f"hydra.run.dir={root}/h2_{i}",
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    return [p.returncode for p in procs], outs, root / "two"


def test_two_processes_match_one(
    two_process_run: tuple[list[int], list[str], Path], mesh_losses: dict[str, np.ndarray]
) -> None:
    """2 processes x 4 devices against the same fsdp run in one process with 8 devices
    (`mesh_losses`' fsdp8: the same config, the trainer in-process instead of the CLI)."""
    codes, outs, run_dir = two_process_run
    for code, out in zip(codes, outs, strict=True):
        assert code == 0, out[-3000:]
    # Console lines come from process 0 only.
    assert "step 10/10" in outs[0] and "step 10/10" not in outs[1]
    assert_same_math(mesh_losses["fsdp8"], {"two processes": _losses(run_dir)})


def test_unreachable_coordinator_is_one_line(tmp_path: Path) -> None:
    proc = _cli(
        *TINY,
        "run.host_devices=4",
        f"mesh.coordinator=127.0.0.1:{free_port()}",
        "mesh.num_processes=2",
        "mesh.process_id=1",
        "mesh.init_timeout=3",
        f"hydra.run.dir={tmp_path}/h",
    )
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out[-2000:]
    assert "mesh.coordinator" in out and "Traceback" not in out


def test_host_devices_dry_run_on_target_mesh(tmp_path: Path) -> None:
    proc = _cli(
        "model=tiny",
        "run.dry_run=true",
        "run.host_devices=8",
        "mesh.fsdp=8",
        "run.batch_size=8",
        "run.seq_len=32",
        f"hydra.run.dir={tmp_path}",
    )
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert info["num_devices"] == 8
    assert set(info["compiled_memory"]) == {"argument", "output", "alias", "temp", "total"}
    assert info["compiled_memory"]["argument"] > 0


def test_indivisible_dimension_names_the_parameter(tmp_path: Path) -> None:
    # tiny has 2 kv heads: tensor=8 cannot split them (nor the 4 query heads) 8 ways.
    proc = _cli(
        "model=tiny",
        "run.dry_run=true",
        "run.host_devices=8",
        "mesh=tensor",
        "run.batch_size=8",
        "run.seq_len=32",
        f"hydra.run.dir={tmp_path}",
    )
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out[-2000:]
    err = [ln for ln in out.splitlines() if ln.startswith("nnxtrain: error:")]
    assert len(err) == 1 and "does not split 8 ways" in err[0] and "Traceback" not in out
