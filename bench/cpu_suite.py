"""The CPU bench suite: every figure is a ratio of two things measured in this one run.

    python -m bench.cpu_suite [--steps 40] [--reps 3] [--skip startup] [--host-devices -1]

1. trainer vs bare: Trainer.fit() (default plugins) against a hand-written jitted loop,
   same model and batches (target <= 1.03);
2. MFU on CPU: the accounting's FLOPs per step (all devices together) / the median true
   step time, divided by this machine's float32 matmul FLOP/s measured now (all cores), for
   the default model and a small char-level model (4 layers, 4 heads, emb 128, seq_len 64,
   batch 12; target >= 50%);
3. start-up: time to the first completed step of a fresh `nnxtrain` process, cold (empty
   compilation cache) and warm (cache filled by the cold run); target warm <= 0.3 x cold.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from bench.trainer_vs_bare import bare_loop, trainer_loop
from nnxtrain import Callback, StepEndEvent, Trainer, compose
from nnxtrain.distributed import start_jax

CHAR_MODEL = [
    "model.name=char",
    "model.vocab_size=65",
    "model.emb_dim=128",
    "model.num_layers=4",
    "model.num_heads=4",
    "model.num_kv_heads=4",
    "model.head_dim=32",
    "model.mlp_dim=512",
    "run.batch_size=12",
    "run.seq_len=64",
]


def matmul_flops(n: int = 1024, reps: int = 20) -> float:
    """This machine's float32 matmul FLOP/s now: the best of 3 timings of `reps` n^3 matmuls,
    on device 0 alone and on every device at once (whichever keeps all cores busier)."""
    f = jax.jit(lambda x: x @ x)
    best = 0.0
    for devices in ([jax.devices()[0]], jax.devices()):
        arrays = [jax.device_put(jnp.ones((n, n), jnp.float32), d) for d in devices]
        jax.block_until_ready([f(a) for a in arrays])
        for _ in range(3):
            t0 = time.perf_counter()
            out = [f(a) for _ in range(reps) for a in arrays]
            jax.block_until_ready(out)
            best = max(best, len(out) * 2 * n**3 / (time.perf_counter() - t0))
    return best


class _StepTimes(Callback):
    """Collects true step seconds (completion to completion) after a warm-up."""

    def __init__(self, skip: int = 5):
        self.skip = skip
        self.records: list[Any] = []

    def on_step_end(self, trainer: Trainer, event: StepEndEvent) -> None:
        if event.step > self.skip:
            self.records.append(event.record)  # read at the end: nothing waits here

    def seconds(self) -> list[float]:
        return [r().seconds for r in self.records]


def model_flops_per_sec(overrides: list[str], steps: int, run_dir: str) -> tuple[float, float]:
    """(model FLOP/s of all devices together, median step seconds) of Trainer.fit() with no
    plugins."""
    cfg = compose(
        [
            *overrides,
            f"run.steps={steps}",
            f"run.dir={run_dir}",
            "run.eval_every=0",
            "callbacks=none",
        ]
    )
    times = _StepTimes()
    trainer = Trainer(cfg, [times])
    trainer.fit()
    assert trainer.flops is not None
    median = statistics.median(times.seconds())
    return trainer.flops.flops_per_step_per_device * trainer.mesh.size / median, median


def startup_seconds(cache: str, run_dir: str) -> tuple[float, float]:
    """(process wall seconds, trainer fit-to-first-step seconds) of a 1-step CLI run."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            str(Path(sys.executable).with_name("nnxtrain")),
            "run.steps=1",
            f"run.dir={run_dir}",
            f"hydra.run.dir={run_dir}",
            f"run.compile_cache={cache}",
            "callbacks=none",
            "run.eval_every=0",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    wall = time.perf_counter() - t0
    del proc
    info = json.loads((Path(run_dir) / "run_info.json").read_text())
    return wall, float(info["seconds_to_first_step"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], choices=["overhead", "mfu", "startup"])
    parser.add_argument(
        "--host-devices", type=int, default=-1, help="run.host_devices for parts 1 and 2"
    )
    args = parser.parse_args()
    devices = f"run.host_devices={args.host_devices}"
    start_jax(compose([devices]))  # before any JAX work: the devices of a default run
    lines = [f"backend {jax.default_backend()}, {jax.device_count()} device(s) ({devices})"]
    with tempfile.TemporaryDirectory() as tmp:
        if "overhead" not in args.skip:
            cfg = compose([devices, f"run.steps={args.steps}"])
            bare, trainer = [], []
            for rep in range(args.reps):
                bare.append(bare_loop(cfg, args.steps))
                trainer.append(trainer_loop([devices], args.steps, f"{tmp}/ovh{rep}"))
            b, t = statistics.median(bare), statistics.median(trainer)
            lines.append(
                f"trainer vs bare (default model): {t * 1e3:.1f} / {b * 1e3:.1f} ms/step"
                f" = {t / b:.3f}  (target <= 1.03)"
            )
        if "mfu" not in args.skip:
            for name, overrides in (("default", []), ("char", CHAR_MODEL)):
                peak = matmul_flops()
                achieved, median = model_flops_per_sec(
                    [devices, *overrides], args.steps + 5, f"{tmp}/{name}"
                )
                peak = max(peak, matmul_flops())  # best of before and after the run
                lines.append(
                    f"MFU {name} model: {achieved / 1e9:.1f} GFLOP/s model / {peak / 1e9:.1f} "
                    f"GFLOP/s matmul = {achieved / peak:.1%}  (median step {median * 1e3:.1f} ms;"
                    f" target >= 50% on char)"
                )
        if "startup" not in args.skip:
            cache = f"{tmp}/cache"
            cold = startup_seconds(cache, f"{tmp}/cold")
            warm = startup_seconds(cache, f"{tmp}/warm")
            lines.append(
                f"start-up, process wall: cold {cold[0]:.2f} s, warm {warm[0]:.2f} s "
                f"= {warm[0] / cold[0]:.2f}"
            )
            lines.append(
                f"start-up, fit() to first completed step: cold {cold[1]:.2f} s, warm "
                f"{warm[1]:.2f} s = {warm[1] / cold[1]:.2f}  (target <= 0.3)"
            )
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
