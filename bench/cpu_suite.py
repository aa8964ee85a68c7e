"""The CPU bench suite: every figure is a ratio of two things measured in this one run.

    python -m bench.cpu_suite [--steps 40] [--reps 3] [--skip startup] [--host-devices -1]
                              [--models default char]

1. trainer vs bare: Trainer.fit() (default plugins) against a hand-written jitted loop,
   same model and batches (target <= 1.03);
2. MFU on CPU: the accounting's FLOPs per step (all devices together) / the median true
   step time, divided by this machine's float32 matmul peak: the best FLOP/s of 1024²
   matmuls in fresh processes (`bench.matmul_peak`: JAX's default single CPU device, and
   the multi-device layout), measured before, between and after the models. For the
   default model and a small char-level model (4 layers, 4 heads, emb 128, seq_len 64,
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

from bench.matmul_peak import DEFAULT_LAYOUTS, peak_flops
from bench.trainer_vs_bare import bare_loop, trainer_loop
from nnxtrain import Callback, StepEndEvent, Trainer, compose
from nnxtrain.parallel.distributed import start_jax

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
MODELS = {"default": [], "char": CHAR_MODEL}


def _layout(devices: int, which: str) -> str:
    """A peak measurement's label: its process's CPU devices and the devices it used."""
    if devices == 0:
        return "1-device process (JAX default)"
    return f"{devices}-device process, " + ("device 0 alone" if which == "one" else "all at once")


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
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
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
            # The machine's peak, in fresh processes before, between and after the models.
            layouts = tuple(sorted({*DEFAULT_LAYOUTS, jax.device_count()} - {1}))
            peaks = [peak_flops(layouts)]
            achieved = {}
            for name in args.models:
                overrides = [devices, *MODELS[name]]
                achieved[name] = model_flops_per_sec(overrides, args.steps + 5, f"{tmp}/{name}")
                peaks.append(peak_flops(layouts))
            best = {k: max(p[k] for p in peaks) for k in peaks[0]}
            peak = max(best.values())
            lines.append(
                "float32 1024² matmul peak, best of fresh processes before, between and after "
                "the models: "
                + "; ".join(f"{_layout(*k)} {v / 1e9:.1f}" for k, v in best.items())
                + " GFLOP/s"
            )
            for name, (flops, median) in achieved.items():
                lines.append(
                    f"MFU {name} model: {flops / 1e9:.1f} GFLOP/s model / {peak / 1e9:.1f} "
                    f"GFLOP/s peak = {flops / peak:.1%}  (median step {median * 1e3:.1f} ms;"
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
