"""A checkpoint saved on an fsdp=8 mesh restores onto data=2 x fsdp=4 and onto one device.

Runs in a subprocess with 8 simulated CPU devices (XLA_FLAGS must precede JAX's start).
The restored arrays must equal the saved ones exactly, carry the new mesh's shardings,
and train on from there.

The runs are test_multidevice's (same config, fsdp8 and single meshes): in one session
the compilation cache then serves their train steps, and only data2_fsdp4 compiles. The
checkpoint restored is step 5's, so the restored runs train to the same step 10.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import xla_flags
from test_multidevice import TINY

pytestmark = pytest.mark.slow

SAVED = 5  # the checkpoint step restored; the runs go on to test_multidevice's 10 steps

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from nnxtrain import Callback, Trainer, compose
    from nnxtrain.plugins.checkpointer import Checkpointer

    class AtStart(Callback):
        def on_train_start(self, trainer, event):
            self.state = trainer.state
            self.host = jax.device_get(trainer.state)
            self.targets = trainer.state_shardings

    class AtStep(Callback):
        \"\"\"The state after step `step` on the host: what that step's checkpoint holds.\"\"\"
        def __init__(self, step):
            self.step = step
        def on_step_end(self, trainer, event):
            if event.step == self.step:
                self.host = jax.device_get(trainer.state)

    overrides, root, saved_step = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    base = [*overrides, "callbacks=none"]
    at = AtStep(saved_step)
    saved = Trainer(compose([*base, "mesh=fsdp", f"run.dir={root}/fsdp8"]),
                    [Checkpointer(every=saved_step), at]).fit()
    embed = saved.state.params["embed"].value
    out = {"saved_devices": len(embed.sharding.device_set), "saved_spec": str(embed.sharding.spec)}
    reference = jax.tree.leaves(at.host)
    for name, mesh, devices in [("data2_fsdp4", ["mesh=data_fsdp"], None),
                                ("single", ["mesh=single"], jax.devices()[:1])]:
        probe = AtStart()
        trainer = Trainer(
            compose([*base, *mesh, f"run.dir={root}/{name}"]),
            [Checkpointer(load_from=f"{root}/fsdp8/checkpoints/{saved_step}"), probe],
            devices=devices)
        result = trainer.fit()
        leaves = jax.tree.leaves(probe.state)
        out[name] = {
            "mesh": dict(trainer.mesh.shape),
            "equal": all(np.array_equal(a, b) for a, b in
                         zip(jax.tree.leaves(probe.host), reference, strict=True)),
            "shardings": all(x.sharding == s for x, s in
                             zip(leaves, jax.tree.leaves(probe.targets), strict=True)),
            "devices": len(leaves[1].sharding.device_set),
            "step": result.step,
            "loss": result.metrics["loss"],
        }
    print("RESULT=" + json.dumps(out))
    """
)


def test_fsdp8_checkpoint_restores_on_data2_fsdp4_and_on_one_device(tmp_path: Path) -> None:
    env = {**os.environ, "XLA_FLAGS": xla_flags(8), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(TINY), str(tmp_path), str(SAVED)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(f"checkpoint: started from step {SAVED} ") == 2
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT="))
    out = json.loads(line.removeprefix("RESULT="))
    assert out["saved_devices"] == 8 and "fsdp" in out["saved_spec"]
    assert out["data2_fsdp4"]["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert out["single"]["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
    for name, devices in (("data2_fsdp4", 8), ("single", 1)):
        got = out[name]
        assert got["equal"] and got["shardings"], got
        assert got["devices"] == devices and got["step"] == 10 and got["loss"] > 0
